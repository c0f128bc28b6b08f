"""ruff over the repository and mypy over compass_kernels' public API (configured in pyproject.toml).
The ``[test]`` extra installs both; without them these skip, saying so."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from helpers import REPO_ROOT


def _tool(module: str, *args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install -e '.[test]' installs it)")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)


def test_ruff():
    r = _tool("ruff", "check", "--no-cache", "--output-format", "concise", ".")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_public_api():
    # the first run reads torch's annotations (~30 s); later ones use the cache in build/
    r = _tool("mypy")
    assert r.returncode == 0, r.stdout + r.stderr
