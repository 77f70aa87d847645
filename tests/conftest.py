"""Shared fixtures.  TensorFlow imports take seconds: keep fixtures session-scoped."""

import os
import pathlib
import subprocess
import sys

import pytest

from trainer import compat  # noqa: F401  (before any TensorFlow import in the tests)

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO


def run_python(code: str, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter from the repo root (for import-order tests)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
