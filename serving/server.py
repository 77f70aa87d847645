"""`clicklens serve`: TF Serving's gRPC and REST APIs over W/export (docs/ARCHITECTURE.md, "Serving").

A stand-in for tensorflow_model_server, which cannot be installed here and has
no ScaNN ops in its stock build: it reads the same models.config, serves the
same SavedModels with the same protos and status codes, so clients written
against it work unchanged against a real TF Serving.  Batching
(serving.batching), Prometheus metrics (serving.monitoring), gRPC health and
/ready, and models.config's version_labels behave as TF Serving's do.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
from typing import Optional

from clicklens import compat  # noqa: F401  (must precede TensorFlow)

from clicklens import models_config
from serving import batching_options, metrics as metrics_module
from serving.batcher import Batcher
from serving.catalog_images import CatalogImages
from serving.grpc_service import Handlers, build_grpc_server
from serving.health import Health
from serving.model_registry import ModelRegistry
from serving.rest import build_rest_server
from serving.runner import Runner

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0


class ModelServer:
    """The registry plus both front ends; `start()` binds and loads, `stop()` drains and closes."""

    def __init__(self, serving_config, models_config_path: str, catalog_path: Optional[str] = None,
                 allow_outside_uris: bool = False):
        self.config = serving_config
        # Parameter files are read (and refused, naming the field) before anything loads.
        self.metrics = metrics_module.from_config(serving_config.monitoring)
        options = batching_options.from_config(serving_config.batching)
        self.batcher = Batcher(options, self.metrics) if options else None
        self.runner = Runner(self.batcher, self.metrics, serving_config.image_call_slots)
        models = models_config.served_beside(models_config.read(models_config_path), models_config_path)
        self.registry = ModelRegistry(models,
                                      poll_seconds=serving_config.poll_seconds,
                                      max_batch=serving_config.max_batch, metrics=self.metrics)
        self.health = Health(self.registry)
        self.registry.add_listener(self.health.update)
        self._frozen_at = -1
        self.registry.add_listener(self._freeze_loaded_objects)
        self.grpc_port: Optional[int] = None
        self.http_port: Optional[int] = None
        self._grpc = None
        self._http = None
        self._http_thread: Optional[threading.Thread] = None
        # GET /images/<id> on the HTTP port: the catalog's images, for the search page.
        self.images = CatalogImages(catalog_path, allow_outside_uris) if catalog_path else None

    def _freeze_loaded_objects(self) -> None:
        """Moves the loaded models' Python objects out of the cyclic GC's reach after each load or retirement.

        A loaded SavedModel is hundreds of thousands of long-lived objects that every full collection would walk
        again (several % of the CPU per request); unfreezing first lets retired versions be collected."""
        if self.registry.changes != self._frozen_at:
            self._frozen_at = self.registry.changes
            gc.unfreeze()
            gc.collect()
            gc.freeze()

    def start(self) -> None:
        """Binds both ports, loads the models, checks the version labels, then takes traffic."""
        c = self.config
        handlers = Handlers(self.registry, c.max_request_bytes, c.max_batch, self.runner, self.metrics)
        self._grpc, self.grpc_port = build_grpc_server(handlers, c.host, c.grpc_port, c.workers,
                                                       self.health.servicer)
        self._http = build_rest_server(self.registry, c, images=self.images, runner=self.runner,
                                       metrics=self.metrics, health=self.health)
        self.http_port = self._http.server_port
        self.registry.start()  # loads what is on disk before the ports take traffic
        try:
            self.registry.check_version_labels(c.allow_version_labels_for_unavailable_models)
        except Exception:
            self.registry.stop()
            self._http.server_close()
            self._grpc.stop(0)
            raise
        if self.batcher is not None:
            self.batcher.start()
        self._grpc.start()
        self._http_thread = threading.Thread(target=self._http.serve_forever, name="rest", daemon=True)
        self._http_thread.start()

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Reports NOT_SERVING, stops taking requests, lets in-flight ones finish (up to `grace` seconds),
        then stops the batch threads and the polling.

        gRPC and REST drain at the same time, each for up to `grace` seconds: gRPC's stop() returns at once
        and drains in the background while the REST server drains here (serving/rest.py, RestServer.drain)."""
        self.health.shutdown()
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


def run(config, workdir, args) -> int:
    """Serves every model in W/export/models.config until SIGTERM or Ctrl-C."""
    server = ModelServer(config.serving, workdir.models_config, catalog_path=workdir.catalog,
                         allow_outside_uris=config.pipeline.allow_outside_uris)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server.start()
    host = config.serving.host
    # Tests and scripts read this line for the bound ports (port 0 picks free ones).
    logger.info("serving %s: gRPC on %s:%d, REST on http://%s:%d",
                ", ".join(server.registry.model_names), host, server.grpc_port, host, server.http_port)
    if server.batcher is not None:
        logger.info("batching on: %s", server.batcher.options)
    if server.metrics.enabled:
        logger.info("metrics on http://%s:%d%s", host, server.http_port, server.metrics.path)
    while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    logger.info("shutting down: draining requests in flight")
    server.stop()
    logger.info("server stopped")
    return 0
