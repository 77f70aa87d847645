"""The models a server serves, and their versions, loaded and hot-swapped from disk.

Each model in models.config has a base path with integer version directories
(`<base_path>/<version>/saved_model.pb`, listed by `clicklens.servables.version_dirs`).  A background thread looks for
versions every `poll_seconds`, loads the ones the model's version policy asks
for (replaying their warmup requests before they take traffic), and only then
swaps them in and retires old ones, so requests never see a half-loaded model
and a request in flight keeps its own reference to the version it started on.
Directories whose names are not integers (e.g. an export's temporary
directory) are ignored; zero-padded names (`00000123`) are version 123, as in
TF Serving.

A model's `version_labels` (models.config) name versions: a request may ask
for a label instead of a number.  As in TF Serving, a label may only name an
AVAILABLE version unless `allow_version_labels_for_unavailable_models`, and an
unknown label is INVALID_ARGUMENT.

`reconfigure` swaps in a new list of models (TF Serving's
HandleReloadConfigRequest and --model_config_file polling): models that left
the list are unloaded, new ones are loaded before it returns.  Load retries
follow either `clicklens serve`'s rule (one attempt per poll) or, with a
`load_retry_seconds`, tensorflow_model_server's (--max_num_load_retries
attempts after the first, --load_retry_interval_micros apart, within one load).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import grpc

from clicklens import compat  # noqa: F401  (must precede TensorFlow)
import tensorflow as tf
from tensorflow_serving.apis import get_model_status_pb2, prediction_log_pb2

from clicklens import servables
from clicklens.errors import ClicklensError
from clicklens.models_config import ModelConfig
from clicklens.workdir import join
from serving import saved_models
from serving.metrics import Metrics
from serving.predict import ServingError, predict_proto

logger = logging.getLogger(__name__)

UNKNOWN_MODEL_LABEL = "<unknown>"  # the metrics' model_name of requests naming no served model

MAX_LOAD_ATTEMPTS = 5  # `clicklens serve`: attempts per version (tensorflow_model_server: 1 + --max_num_load_retries)
MAX_WARMUP_RECORDS = 1000  # TF Serving replays at most this many

State = get_model_status_pb2.ModelVersionStatus.State


@dataclasses.dataclass
class LoadedVersion:
    """One model version that can take requests."""

    name: str
    version: int
    path: str
    model: object  # the tf.saved_model.load result
    signature_defs: Dict[str, object]


@dataclasses.dataclass
class VersionStatus:
    state: int = State.START
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""
    attempts: int = 0
    failed_files: Optional[Tuple] = None  # folder_files() when loading gave up: a change on disk retries it


def folder_files(path: str) -> Tuple:
    """(file, size, modification time) of every file under a version folder: what tells a fixed folder."""
    found = []
    for root, _, files in tf.io.gfile.walk(path):
        for name in files:
            stat = tf.io.gfile.stat(join(root, name))
            found.append((join(root, name), stat.length, stat.mtime_nsec))
    return tuple(sorted(found))


def aspired_versions(config: ModelConfig, on_disk: Sequence[int]) -> List[int]:
    """The versions a model's version policy asks to serve (TF Serving's default: the latest one)."""
    policy = config.model_version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return list(on_disk)
    if which == "specific":
        return [v for v in on_disk if v in set(policy.specific.versions)]
    num = policy.latest.num_versions if which == "latest" else 1
    return list(on_disk)[-max(num, 1):]


def replay_warmup(loaded: LoadedVersion, max_batch: int, num_threads: int = 1) -> int:
    """Runs the version's assets.extra warmup requests (as TF Serving does); returns how many ran.

    With `num_threads` > 1 (TF Serving's ModelWarmupOptions.num_model_warmup_threads) that many run at once:
    a first call's cost is mostly TensorFlow optimizing and instantiating the signature's graph, outside the
    GIL, so the requests of two signatures warm up side by side on two cores.
    """
    path = join(loaded.path, servables.WARMUP_FILE)
    if not tf.io.gfile.exists(path):
        return 0
    requests = []
    for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if log.WhichOneof("log_type") != "predict_log":
            raise ValueError(f"{path}: only predict_log warmup records are supported")
        requests.append(log.predict_log.request)

    def replay(request) -> None:
        predict_proto(loaded.model, request, max_batch)

    if num_threads > 1 and len(requests) > 1:
        with ThreadPoolExecutor(min(num_threads, len(requests)), thread_name_prefix="model-warmup") as pool:
            list(pool.map(replay, requests))  # re-raises the first failure
    else:
        for request in requests:
            replay(request)
    return len(requests)


class ModelRegistry:
    """Serves the versions of the models in a models.config, reloading as versions appear."""

    def __init__(self, configs: Sequence[ModelConfig], poll_seconds: float = 2.0, max_batch: int = 256,
                 metrics: Optional[Metrics] = None, max_load_attempts: int = MAX_LOAD_ATTEMPTS,
                 load_retry_seconds: Optional[float] = None, warmup: bool = True, num_load_threads: int = 0,
                 num_warmup_threads: int = 1):
        """`poll_seconds` <= 0 polls once, at start (tensorflow_model_server's --file_system_poll_wait_seconds=0).
        `num_load_threads` > 0 loads versions on that many threads while polling goes on (its --num_load_threads);
        0 loads them one after another within the poll that found them.  `num_warmup_threads`: warmup requests
        of one version replayed at once (replay_warmup)."""
        self._configs = {c.name: c for c in configs}
        self._labels: Dict[str, Dict[str, int]] = {c.name: dict(c.version_labels) for c in configs}
        self._poll_seconds = poll_seconds
        self._max_attempts = max(1, max_load_attempts)
        self._retry_seconds = load_retry_seconds
        self._warmup = warmup
        self._warmup_threads = max(1, num_warmup_threads)
        self._max_batch = max_batch
        self._metrics = metrics or Metrics()
        self._listeners: List[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._serving: Dict[str, Dict[int, LoadedVersion]] = {name: {} for name in self._configs}
        self._status: Dict[str, Dict[int, VersionStatus]] = {name: {} for name in self._configs}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.changes = 0  # versions loaded or retired so far
        self.retirements = 0  # of which retired (or unloaded with their model)
        self._loader = (ThreadPoolExecutor(num_load_threads, thread_name_prefix="model-loader")
                        if num_load_threads > 0 else None)
        self._loading: Set[Tuple[str, int]] = set()  # versions on a loader thread now

    def loading(self) -> bool:
        """True while a version loads on a loader thread."""
        with self._lock:
            return bool(self._loading)

    @property
    def model_names(self) -> List[str]:
        return list(self._configs)

    def metric_label(self, name: str) -> str:
        """`name` as a metrics label: a served model's name, or one label for every other name (so requests
        for made-up names cannot grow the metrics page without bound)."""
        return name if name in self._configs else UNKNOWN_MODEL_LABEL

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Loads what is on disk now, then keeps polling in a background thread."""
        self.poll(wait=True)
        if self._poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="model-poller", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=True)

    def _poll_loop(self) -> None:
        # Polls start every poll_seconds, not poll_seconds after the last one ended: a poll that spent a second
        # loading one model's version is followed at once by the next, which finds what appeared meanwhile (as
        # tensorflow_model_server's file-system source keeps polling on its own thread while versions load).
        started = time.monotonic()
        while not self._stop.wait(max(0.0, started + self._poll_seconds - time.monotonic())):
            started = time.monotonic()
            try:
                self.poll()
            except Exception:  # a broken poll must not kill the poller; the next one retries
                logger.exception("polling for model versions failed")

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` after every poll (e.g. to update health statuses)."""
        self._listeners.append(listener)

    def poll(self, wait: bool = False) -> None:
        """One pass over every model: load new aspired versions, then retire unwanted ones.  With loader
        threads, the loads run there and the versions they replace are retired by a later poll; `wait`: return
        only once the loads this poll started have ended."""
        started: List[Future] = []
        with self._poll_lock:
            for name, config in list(self._configs.items()):
                if self._stop.is_set():
                    return
                started += self._poll_model(name, config)
        for future in started if wait else ():
            future.result()
        for listener in self._listeners:
            listener()

    def _poll_model(self, name: str, config: ModelConfig) -> List[Future]:
        folders = servables.version_dirs(config.base_path)
        on_disk = list(folders)
        aspired = aspired_versions(config, on_disk)
        status = self._status[name]
        started = []
        for version in aspired:
            if version in self._serving[name] or (name, version) in self._loading:
                continue
            st = status.setdefault(version, VersionStatus())
            if st.attempts >= self._max_attempts:
                if folder_files(folders[version]) == st.failed_files:
                    continue
                logger.info("model %s version %d changed on disk since it failed to load: loading it again",
                            name, version)
                st.attempts = 0
            if self._loader is None:
                self._install(name, version, self._load(name, version, folders[version], st), st)
                continue
            st.state = State.LOADING  # from now on, not when the loader thread gets to it
            with self._lock:
                self._loading.add((name, version))
            started.append(self._loader.submit(self._load_on_thread, name, version, folders[version], st))
        # Retire versions no longer aspired, but never the last available one
        # while nothing aspired is available (availability-preserving, as TF Serving).
        serving = self._serving[name]
        aspired_available = any(v in serving for v in aspired)
        retire = [v for v in serving if v not in aspired and (aspired_available or v not in on_disk)]
        if retire:
            for version in retire:
                status[version].state = State.UNLOADING
            with self._lock:
                self._serving[name] = {v: lv for v, lv in serving.items() if v not in retire}
            self.changes += 1
            self.retirements += 1
            for version in retire:
                status[version].state = State.END
                logger.info("model %s version %d is unloaded", name, version)
        # A version deleted from disk and not served is forgotten (GetModelStatus no longer lists it).
        gone = [v for v in status if v not in on_disk and v not in self._serving[name]
                and (name, v) not in self._loading]
        if gone:
            self._status[name] = {v: st for v, st in status.items() if v not in gone}
        return started

    def _install(self, name: str, version: int, loaded: Optional[LoadedVersion], st: VersionStatus) -> None:
        if loaded is None:
            return
        with self._lock:
            if name not in self._serving:  # the model left the config while this version loaded
                return
            self._serving[name] = {**self._serving[name], version: loaded}
            self.changes += 1
        st.state = State.AVAILABLE
        logger.info("model %s version %d is available", name, version)

    def _load_on_thread(self, name: str, version: int, path: str, st: VersionStatus) -> None:
        try:
            self._install(name, version, self._load(name, version, path, st), st)
        finally:
            with self._lock:
                self._loading.discard((name, version))
        for listener in self._listeners:
            listener()

    def reconfigure(self, configs: Sequence[ModelConfig]) -> List[str]:
        """Serves `configs` from now on: models no longer listed are unloaded (their versions stay in
        GetModelStatus as END), new models and changed policies or labels take effect, and what they ask for is
        loaded before this returns.  Returns the new models that have no AVAILABLE version after loading."""
        configs = {c.name: c for c in configs}
        with self._poll_lock:
            added = [name for name in configs if name not in self._configs]
            removed = [name for name in self._configs if name not in configs]
            with self._lock:
                for name in removed:
                    for version in self._serving.pop(name):
                        self._status[name][version].state = State.END
                        logger.info("model %s version %d is unloaded (the model left the config)", name, version)
                for name in added:
                    self._serving[name] = {}
                    self._status.setdefault(name, {})
                self._configs = configs
                self._labels = {c.name: dict(c.version_labels) for c in configs.values()}
            if removed:
                self.changes += 1
                self.retirements += 1
        self.poll(wait=True)
        return [name for name in added if not self.is_available(name)]

    def failed_models(self) -> List[str]:
        """Models with no AVAILABLE version and a version that gave up loading (every attempt failed)."""
        failed = []
        for name in self.model_names:
            statuses = list(self._status.get(name, {}).values())
            if not self.is_available(name) and any(
                    st.state == State.END and st.error_code != grpc.StatusCode.OK for st in statuses):
                failed.append(name)
        return failed

    def _load(self, name: str, version: int, path: str, st: VersionStatus) -> Optional[LoadedVersion]:
        """Loads a version: one attempt, or (with load_retry_seconds) every attempt left, that far apart."""
        loaded = self._load_once(name, version, path, st)
        while loaded is None and self._retry_seconds is not None and st.attempts < self._max_attempts:
            if self._stop.wait(self._retry_seconds):
                break
            loaded = self._load_once(name, version, path, st)
        return loaded

    def _load_once(self, name: str, version: int, path: str, st: VersionStatus) -> Optional[LoadedVersion]:
        st.state = State.LOADING
        st.attempts += 1
        logger.info("loading model %s version %d from %s", name, version, path)
        try:
            model = saved_models.load(path)
            loaded = LoadedVersion(name, version, path, model, saved_models.signature_defs(path))
            start = time.perf_counter()
            try:
                warmed = replay_warmup(loaded, self._max_batch, self._warmup_threads) if self._warmup else 0
            except Exception as err:
                code = err.code if isinstance(err, ServingError) else grpc.StatusCode.UNKNOWN
                self._metrics.warmup(path, code, time.perf_counter() - start, 0)
                raise
            self._metrics.warmup(path, grpc.StatusCode.OK, time.perf_counter() - start, warmed)
            logger.info("model %s version %d: replayed %d warmup requests", name, version, warmed)
            # A ScaNN searcher is not freed with the model's Python objects: it is destroyed when the last
            # reference to this version goes, i.e. once it is retired and its last request has finished.
            weakref.finalize(loaded, saved_models.destroy_resources,
                             saved_models.searcher_handles(model)).atexit = False
            st.error_code, st.error_message = grpc.StatusCode.OK, ""
            return loaded
        except Exception as err:  # any load failure is reported through GetModelStatus
            logger.warning("model %s version %d failed to load (attempt %d/%d): %s",
                           name, version, st.attempts, self._max_attempts, err)
            code = err.code if isinstance(err, ServingError) else grpc.StatusCode.UNKNOWN
            st.state = State.END if st.attempts >= self._max_attempts else State.START
            st.error_code, st.error_message = code, f"failed to load: {err}"
            if st.attempts >= self._max_attempts:
                st.failed_files = folder_files(path)
                logger.error("model %s version %d: gave up after %d attempts; it is tried again once the files in "
                             "%s change (re-export it, or remove the folder)", name, version, st.attempts, path)
            return None

    # -- lookups -------------------------------------------------------------

    def version_for_label(self, name: str, label: str) -> int:
        """The version a label names; INVALID_ARGUMENT for a label the model does not have (as TF Serving)."""
        version = self._labels.get(name, {}).get(label)
        if version is None:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}")
        return version

    def check_version_labels(self, allow_unavailable: bool = False) -> None:
        """ClicklensError unless every label names an AVAILABLE version (TF Serving's FAILED_PRECONDITION)."""
        if allow_unavailable:
            return
        with self._lock:
            serving = {name: set(versions) for name, versions in self._serving.items()}
        for name, labels in self._labels.items():
            for label, version in sorted(labels.items()):
                if version not in serving[name]:
                    raise ClicklensError(
                        f"models.config: model {name}: version_labels {label!r}: Request to assign label to version "
                        f"{version} of model {name}, which is not currently available for inference "
                        "(set serving.allow_version_labels_for_unavailable_models to allow it)")

    @property
    def polls(self) -> bool:
        """True when new versions are looked for while serving, not only at start."""
        return self._poll_seconds > 0

    def base_path(self, name: str) -> str:
        """The folder whose numbered subfolders are the versions of model `name`."""
        return self._configs[name].base_path

    def is_available(self, name: str) -> bool:
        """True when the model has at least one AVAILABLE version."""
        with self._lock:
            return bool(self._serving.get(name))

    def get(self, name: str, version: Optional[int] = None, label: Optional[str] = None) -> LoadedVersion:
        """The requested version, by number or label (default: the latest available); NOT_FOUND otherwise."""
        if label is not None:
            version = self.version_for_label(name, label)
        if name not in self._configs:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
        with self._lock:
            versions = self._serving[name]
        if version is None:
            if not versions:  # TF Serving's exact words: readiness probes written for it match on them
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})")
            return versions[max(versions)]
        if version not in versions:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: Specific({name}, {version})")
        return versions[version]

    def status(self, name: str, version: Optional[int] = None,
               label: Optional[str] = None) -> List[Tuple[int, VersionStatus]]:
        """(version, status) pairs of a model, newest first (one version, by number or label, if given);
        NOT_FOUND for an unknown model or version."""
        if label is not None:
            version = self.version_for_label(name, label)
        if name not in self._status:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        statuses = dict(self._status[name])
        if version is not None:
            if version not in statuses:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
            return [(version, statuses[version])]
        if not statuses:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        return sorted(statuses.items(), reverse=True)
