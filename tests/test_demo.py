"""`clicklens demo` (what `make demo` runs): skips finished stages, serves, queries in both languages."""

from tests.conftest import free_ports, run_verb


def test_demo_serves_the_export_and_answers_queries(demo_exported, capsys):
    grpc_port, http_port = free_ports(2)
    # Every stage's output exists in the shared workdir, so the demo goes straight to serving.
    run_verb("demo", demo_exported.root, "--no-wait",
             overrides=[f"serving.grpc_port={grpc_port}", f"serving.http_port={http_port}"])
    out = capsys.readouterr().out
    assert "$ clicklens query 'red circle'" in out
    assert "$ clicklens query '红色 圆形'" in out
    assert "$ clicklens query --image" in out
    # Each query printed the model that answered and ten ranked, annotated image ids.
    assert out.count("retrieval_scann v1: top 10 for") == 7
    ranked = [line for line in out.splitlines() if line.strip()[:2].strip().isdigit() and " img_" in line]
    assert len(ranked) == 70
    assert f"Search page: http://127.0.0.1:{http_port}/" in out


def test_the_demo_chain_trains_on_cold_images_and_measures_them_apart(demo_trained, small_config):
    """generate-demo-data -> pipeline -> train: never-shown images reach the graph and the cold-start table."""
    import json
    import pathlib

    manifest = json.loads((pathlib.Path(demo_trained.raw) / "manifest.json").read_text(encoding="utf-8"))
    report = json.loads(pathlib.Path(demo_trained.report).read_text(encoding="utf-8"))
    assert report["graph"]["cold_images"] == len(manifest["cold_images"]) > 0
    assert report["graph"]["cold_images_reached"] >= 0.9 * report["graph"]["cold_images"]
    assert report["examples"]["image_only"] >= report["graph"]["cold_images_reached"]
    cold = json.loads(pathlib.Path(demo_trained.metrics).read_text(encoding="utf-8"))["cold_start"]
    assert cold["num_images"]["cold"] == len(manifest["cold_images"])
    cell = cold["train_queries"]["cold"]
    assert cell["num_queries"] > 0 and cell["pixel_knn"] is not None
    for model in ("trained", "pixel_knn", "random"):
        assert 0.0 <= cell[model]["recall@10"] <= 1.0


def test_the_demo_pretrains_before_training_when_the_tower_starts_pretrained(tmp_path):
    """With model.image_init=pretrained the demo makes the pretrained tower before it trains."""
    from clicklens import demo
    from clicklens.config import load_config
    from clicklens.workdir import Workdir
    from tests.conftest import DEMO_CONFIG

    workdir = Workdir(str(tmp_path))
    pretrained = load_config(DEMO_CONFIG, ["model.image_init=pretrained"])
    assert [verb for verb, _ in demo.stages(pretrained, workdir)] == [
        "generate-demo-data", "pipeline", "pretrain", "train", "export"]
    assert dict(demo.stages(pretrained, workdir))["pretrain"] == workdir.pretrain_report  # written last
    # From random weights (the demo config's), or from a tower kept elsewhere, there is nothing to pretrain.
    for overrides in ([], ["model.image_init=pretrained", "model.image_init_path=/weights/tower"]):
        verbs = [verb for verb, _ in demo.stages(load_config(DEMO_CONFIG, overrides), workdir)]
        assert verbs == ["generate-demo-data", "pipeline", "train", "export"]
