"""Health: gRPC's grpc.health.v1.Health service and the HTTP readiness route, from the models' versions.

The server is SERVING only while every model in models.config has an AVAILABLE
version (NOT_SERVING before the first load and once shutdown has begun).
gRPC health service names:

- `""` (the whole server), and the names tensorflow_model_server's
  `--enable_grpc_healthcheck_service` sets, `ModelService` and
  `PredictionService`, plus their full names `tensorflow.serving.…`: all
  carry the whole server's status;
- each model's name: SERVING while that model has an AVAILABLE version.

`GET /ready` on the REST port answers 200 or 503 with the same statuses as JSON.
"""

from __future__ import annotations

import threading
from typing import Dict

from grpc_health.v1 import health, health_pb2

from serving.grpc_service import MODEL_SERVICE, PREDICTION_SERVICE

READY_PATH = "/ready"
SERVER_SERVICES = ("", "ModelService", "PredictionService", MODEL_SERVICE, PREDICTION_SERVICE)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Keeps the gRPC health servicer in step with a ModelRegistry; answers readiness for REST."""

    def __init__(self, registry):
        self.registry = registry
        self.servicer = health.HealthServicer()
        self._lock = threading.Lock()
        self._shutting_down = False
        self._known: set = set()
        self.update()

    def models(self) -> Dict[str, bool]:
        """Model name -> whether it has an AVAILABLE version."""
        return {name: self.registry.is_available(name) for name in self.registry.model_names}

    def ready(self) -> bool:
        """True while every model has an AVAILABLE version and the server is not shutting down."""
        return not self._shutting_down and all(self.models().values())

    def update(self) -> None:
        """Sets every service's status from the registry (called after each poll)."""
        with self._lock:
            if self._shutting_down:
                return
            models = self.models()
            for name in self._known - set(models):  # a model that left the config (a reload) serves nothing
                self.servicer.set(name, NOT_SERVING)
            self._known = set(models)
            for name, available in models.items():
                self.servicer.set(name, SERVING if available else NOT_SERVING)
            overall = SERVING if all(models.values()) else NOT_SERVING
            for service in SERVER_SERVICES:
                self.servicer.set(service, overall)

    def shutdown(self) -> None:
        """Every service NOT_SERVING from now on, so load balancers stop sending before the ports close."""
        with self._lock:
            self._shutting_down = True
            self.servicer.enter_graceful_shutdown()

    def readiness(self) -> Dict[str, object]:
        """The /ready body: the server's status and each model's."""
        models = self.models()
        return {"status": "SERVING" if self.ready() else "NOT_SERVING",
                "models": {name: "AVAILABLE" if ok else "NOT_AVAILABLE" for name, ok in models.items()}}
