"""What the benchmarks' test modules share; they import it as `benchmarks.tests.support`.

This folder has no conftest.py on purpose: tests/ has one, and conftest.py files outside Python packages are all
imported under the one module name `conftest`, so a second one here would be what `from conftest import ...` finds in
tests/ whenever both folders are collected (tests/test_suite_structure.py checks that none is added).
"""

import importlib.util
import os
from pathlib import Path

import pytest


# Tests never reach the network: set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# One intra-op thread in the processes the tests start, as in tests/conftest.py (tiny models; on a shared CPU a second
# OpenMP thread spins waiting for the first).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[2]


def require_packages(*names: str) -> None:
    """Skip the calling test, naming the pip packages to install, unless every module in `names` can be imported."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(n.replace('_', '-') for n in missing)} (pip install --no-deps ...)")
