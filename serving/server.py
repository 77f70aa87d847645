"""`clicklens serve`: TF Serving's gRPC and REST APIs over W/export (docs/ARCHITECTURE.md, "Serving").

A stand-in for tensorflow_model_server, which cannot be installed here and has
no ScaNN ops in its stock build: it reads the same models.config, serves the
same SavedModels with the same protos and status codes, so clients written
against it work unchanged against a real TF Serving.  Batching
(serving.batching), Prometheus metrics (serving.monitoring), gRPC health and
/ready, and models.config's version_labels behave as TF Serving's do.

`clicklens serve` also takes tensorflow_model_server's flags, as does the
`clicklens-model-server` console script (serving/model_server_main.py); see
serving/model_server_flags.py.  HandleReloadConfigRequest replaces the models
served (ModelServer.reload_config), as does a change to --model_config_file
when --model_config_file_poll_wait_seconds is set.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Optional, Sequence

import grpc

from clicklens import compat  # noqa: F401  (must precede TensorFlow)

from clicklens import models_config
from clicklens.catalog import catalog_path
from clicklens.errors import ClicklensError
from clicklens.shutdown import stop_on_signals
from serving import batching_options, metrics as metrics_module
from serving.batcher import Batcher
from serving.catalog_images import CatalogImages
from serving.config_poller import ConfigPoller
from serving.grpc_service import Handlers, build_grpc_server
from serving.health import Health
from serving.model_registry import ModelRegistry
from serving.predict import ServingError
from serving.rest import build_rest_server
from serving.runner import Runner
from serving.server_options import ServerOptions

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0


class ModelServer:
    """The registry plus both front ends; `start()` binds and loads, `stop()` drains and closes."""

    def __init__(self, serving_config, models_config_path: Optional[str] = None, catalog_path: Optional[str] = None,
                 allow_outside_uris: bool = False, models: Optional[Sequence] = None,
                 options: Optional[ServerOptions] = None):
        """Serves `models` (ModelConfig entries) or, without them, those of the models.config at
        `models_config_path` (each served from the folder beside the file when there is one)."""
        self.config = serving_config
        self.options = options or ServerOptions()
        # Parameter files are read (and refused, naming the field) before anything loads.
        self.metrics = metrics_module.from_config(serving_config.monitoring)
        options = batching_options.from_config(serving_config.batching)
        self.batcher = Batcher(options, self.metrics) if options else None
        self.runner = Runner(self.batcher, self.metrics, serving_config.image_call_slots)
        if models is None:
            models = models_config.served_beside(models_config.read(models_config_path), models_config_path)
        o = self.options
        self.registry = ModelRegistry(models,
                                      poll_seconds=serving_config.poll_seconds,
                                      max_batch=serving_config.max_batch, metrics=self.metrics,
                                      max_load_attempts=o.max_load_attempts, load_retry_seconds=o.load_retry_seconds,
                                      warmup=o.enable_model_warmup, num_load_threads=serving_config.num_load_threads,
                                      num_warmup_threads=serving_config.num_warmup_threads)
        self.config_poller = (ConfigPoller(o.model_config_file, o.model_config_poll_seconds, self.reconfigure,
                                           list(models))
                              if o.model_config_file and o.model_config_poll_seconds > 0 else None)
        self.health = Health(self.registry)
        self.registry.add_listener(self.health.update)
        self._frozen_at = self._retired_at = -1
        self.registry.add_listener(self._freeze_loaded_objects)
        self.grpc_port: Optional[int] = None
        self.http_port: Optional[int] = None
        self._grpc = None
        self._http = None
        self._http_thread: Optional[threading.Thread] = None
        self._reload_lock = threading.Lock()
        # GET /images/<id> on the HTTP port: the catalog's images, for the search page.
        self.images = CatalogImages(catalog_path, allow_outside_uris) if catalog_path else None

    def _freeze_loaded_objects(self) -> None:
        """Moves the loaded models' Python objects out of the cyclic GC's reach after each load or retirement.

        A loaded SavedModel is hundreds of thousands of long-lived objects that every full collection would walk
        again (several % of the CPU per request).  After a load only the objects made since the last freeze are
        collected and frozen; after a retirement everything is unfrozen first, so the retired version's objects
        can be collected.  While another version loads this waits for that load's end: a collection holds the
        GIL, and stalled the other load by a quarter of a second."""
        registry = self.registry
        if registry.changes == self._frozen_at or registry.loading():
            return
        self._frozen_at = registry.changes
        if registry.retirements != self._retired_at:
            self._retired_at = registry.retirements
            gc.unfreeze()
        gc.collect()
        gc.freeze()

    def start(self) -> None:
        """Binds both ports, loads the models, checks the version labels, then takes traffic."""
        c, o = self.config, self.options
        handlers = Handlers(self.registry, c.max_request_bytes, c.max_batch, self.runner, self.metrics,
                            reload_config=self.reload_config, workers=c.workers)
        self._grpc, self.grpc_port = build_grpc_server(handlers, c.host, c.grpc_port,
                                                       self.health.servicer, socket_path=o.grpc_socket_path,
                                                       channel_arguments=o.grpc_channel_arguments)
        if o.rest_enabled:
            self._http = build_rest_server(self.registry, c, images=self.images, runner=self.runner,
                                           metrics=self.metrics, health=self.health)
            self.http_port = self._http.server_port
        self.registry.start()  # loads what is on disk before the ports take traffic
        try:
            self.registry.check_version_labels(c.allow_version_labels_for_unavailable_models)
            failed = self.registry.failed_models() if o.fail_when_models_fail_to_load else []
            if failed:  # tensorflow_model_server does not start when a model cannot be loaded
                raise ClicklensError(self._unavailable(failed))
        except Exception:
            self.registry.stop()
            if self._http is not None:
                self._http.server_close()
            self._grpc.stop(0)
            raise
        if self.batcher is not None:
            self.batcher.start()
        self._grpc.start()
        if self._http is not None:
            self._http_thread = threading.Thread(target=self._http.serve_forever, name="rest", daemon=True)
            self._http_thread.start()
        if self.config_poller is not None:
            self.config_poller.start()

    def reconfigure(self, models: Sequence) -> None:
        """Serves `models` (ModelConfig entries) from now on: models that left are unloaded, new ones loaded
        before this returns; ServingError with TF Serving's code when it cannot be done."""
        with self._reload_lock:
            unavailable = self.registry.reconfigure(models)
            failed = [name for name in unavailable if name in self.registry.failed_models()]
            try:
                self.registry.check_version_labels(self.config.allow_version_labels_for_unavailable_models)
            except ClicklensError as err:
                raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from None
            if failed:
                raise ServingError(grpc.StatusCode.UNKNOWN, self._unavailable(failed))

    def _unavailable(self, names: Sequence[str]) -> str:
        """tensorflow_model_server's message for models that failed to load, with each one's error."""
        details = []
        for name in names:
            errors = [st.error_message for _, st in self.registry.status(name) if st.error_message]
            details.append(f"{name} due to error: {errors[0]}" if errors else name)
        return "Some models did not become available: {" + ", ".join(details) + "}"

    def reload_config(self, config) -> None:
        """HandleReloadConfigRequest: a ModelServerConfig replaces the models served."""
        try:
            models = models_config.entries(config, "ReloadConfigRequest")
        except ClicklensError as err:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from None
        self.reconfigure(models)

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Reports NOT_SERVING, stops taking requests, lets in-flight ones finish (up to `grace` seconds),
        then stops the batch threads and the polling.

        gRPC and REST drain at the same time, each for up to `grace` seconds: gRPC's stop() returns at once
        and drains in the background while the REST server drains here (serving/rest.py, RestServer.drain)."""
        self.health.shutdown()
        if self.config_poller is not None:
            self.config_poller.stop()
        grpc_stopped = self._grpc.stop(grace) if self._grpc is not None else None
        if self._http is not None:
            self._http.drain(grace)
            if self._http_thread is not None:
                self._http_thread.join()
        if grpc_stopped is not None:
            grpc_stopped.wait(grace + 1)
        if self.batcher is not None:
            self.batcher.stop()
        self.registry.stop()


def warn_models_without_version(registry) -> None:
    """Says which models have no version loaded at start: requests for them fail until one appears (the server
    serves on and loads it then, as tensorflow_model_server does), or, with polling off, until a restart."""
    until = ("until one appears" if registry.polls else
             "until the server is restarted (new versions are looked for only at start: polling is off)")
    for name in registry.model_names:
        if not registry.is_available(name):
            logger.warning("model %s: no version loaded (%s has no loadable numbered version folder; `clicklens "
                           "export` writes them): requests for it fail with NOT_FOUND %s", name,
                           registry.base_path(name), until)


def serve_until_signal(server: ModelServer) -> int:
    """Starts `server`, logs where it listens, serves until SIGTERM or Ctrl-C, then drains and stops it."""
    stop = stop_on_signals()
    server.start()
    host = server.config.host
    rest = f"http://{host}:{server.http_port}" if server.http_port is not None else "off"
    # Tests and scripts read this line for the bound ports (port 0 picks free ones).
    logger.info("serving %s: gRPC on %s:%d, REST on %s", ", ".join(server.registry.model_names), host,
                server.grpc_port, rest)
    warn_models_without_version(server.registry)
    if server.options.grpc_socket_path:
        logger.info("gRPC also on unix:%s", server.options.grpc_socket_path)
    if server.batcher is not None:
        logger.info("batching on: %s", server.batcher.options)
    if server.metrics.enabled and server.http_port is not None:
        logger.info("metrics on http://%s:%d%s", host, server.http_port, server.metrics.path)
    while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    logger.info("shutting down: draining requests in flight")
    server.stop()
    logger.info("server stopped")
    return 0


def build_server(config, workdir, extra_args: Sequence[str] = ()) -> ModelServer:
    """`clicklens serve`'s ModelServer, not started: the models of W/export/models.config (or of
    tensorflow_model_server's flags in extra_args, with the other flags applied too), thumbnails from the
    catalog the pipeline reads."""
    from serving import model_server_flags

    found = model_server_flags.settings(list(extra_args), config.serving, standalone=False)
    return ModelServer(found.serving, workdir.models_config, catalog_path=catalog_path(config, workdir),
                       allow_outside_uris=config.pipeline.allow_outside_uris, models=found.models,
                       options=found.options)


def run(config, workdir, args) -> int:
    """Serves every model in W/export/models.config (or the models tensorflow_model_server's flags name)
    until SIGTERM or Ctrl-C."""
    return serve_until_signal(build_server(config, workdir, getattr(args, "extra_args", []) or []))
