"""`clicklens serve`: TF Serving's gRPC and REST APIs over W/export (docs/ARCHITECTURE.md, "Serving").

A stand-in for tensorflow_model_server, which cannot be installed here and has
no ScaNN ops in its stock build: it reads the same models.config, serves the
same SavedModels with the same protos and status codes, so clients written
against it work unchanged against a real TF Serving.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

from clicklens import compat  # noqa: F401  (must precede TensorFlow)

from clicklens import models_config
from serving.catalog_images import CatalogImages
from serving.grpc_service import Handlers, build_grpc_server
from serving.model_registry import ModelRegistry
from serving.rest import build_rest_server

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0


class ModelServer:
    """The registry plus both front ends; `start()` binds and loads, `stop()` drains and closes."""

    def __init__(self, serving_config, models_config_path: str, catalog_path: Optional[str] = None):
        self.config = serving_config
        self.registry = ModelRegistry(models_config.read(models_config_path),
                                      poll_seconds=serving_config.poll_seconds,
                                      max_batch=serving_config.max_batch)
        self.grpc_port: Optional[int] = None
        self.http_port: Optional[int] = None
        self._grpc = None
        self._http = None
        self._http_thread: Optional[threading.Thread] = None
        # GET /images/<id> on the HTTP port: the catalog's images, for the search page.
        self.images = CatalogImages(catalog_path) if catalog_path else None

    def start(self) -> None:
        c = self.config
        handlers = Handlers(self.registry, c.max_request_bytes, c.max_batch)
        self._grpc, self.grpc_port = build_grpc_server(handlers, c.host, c.grpc_port, c.workers)
        self._http = build_rest_server(self.registry, c, images=self.images)
        self.http_port = self._http.server_port
        self.registry.start()  # loads what is on disk before the ports take traffic
        self._grpc.start()
        self._http_thread = threading.Thread(target=self._http.serve_forever, name="rest", daemon=True)
        self._http_thread.start()

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stops taking requests, lets in-flight ones finish (up to `grace` seconds), stops polling."""
        if self._grpc is not None:
            done = self._grpc.stop(grace)
            done.wait(grace + 1)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self.registry.stop()


def run(config, workdir, args) -> int:
    """Serves every model in W/export/models.config until SIGTERM or Ctrl-C."""
    server = ModelServer(config.serving, workdir.models_config, catalog_path=workdir.catalog)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server.start()
    host = config.serving.host
    # Tests and scripts read this line for the bound ports (port 0 picks free ones).
    logger.info("serving %s: gRPC on %s:%d, REST on http://%s:%d",
                ", ".join(server.registry.model_names), host, server.grpc_port, host, server.http_port)
    while not stop.wait(1.0):  # a timed wait keeps the main thread responsive to signals
        pass
    logger.info("shutting down: draining requests in flight")
    server.stop()
    logger.info("server stopped")
    return 0
