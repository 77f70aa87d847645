"""--model_config_file_poll_wait_seconds: re-reads the model config file and applies it when it changed.

A file that cannot be read or parsed is logged and the server keeps its
current models, as tensorflow_model_server does; the next poll tries again.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, List, Optional

from clicklens import models_config

logger = logging.getLogger(__name__)


class ConfigPoller:
    """Every `seconds`, reads `path` and calls `apply(models)` when its model entries differ from the last ones."""

    def __init__(self, path: str, seconds: float, apply: Callable[[List], None], current: List):
        self.path = path
        self.seconds = seconds
        self._apply = apply
        self._last = _key(current)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="model-config-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def poll(self) -> bool:
        """One look at the file; True when it changed and was applied."""
        try:
            models = models_config.read(self.path)
        except Exception as err:  # a half-written or broken file: keep serving what is served
            logger.error("model config %s not applied: %s", self.path, err)
            return False
        key = _key(models)
        if key == self._last:
            return False
        logger.info("model config %s changed: applying it", self.path)
        self._last = key  # applied once: a config whose models fail to load is not reapplied every poll
        try:
            self._apply(models)
        except Exception as err:
            logger.error("model config %s: %s", self.path, err)
            return False
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.seconds):
            self.poll()


def _key(models: List) -> List[bytes]:
    return [m.SerializeToString(deterministic=True) for m in models]
