"""Shared pytest fixtures.

``shared_data`` is the folder of real data and pretrained models that lives next to the repository
(``<repo>/../shared/data``), or wherever the ``SMCP_SHARED_DATA`` environment variable points.  Tests
that need it are skipped with a clear reason when it is absent (it is never part of the project).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run the tests against this checkout even when not installed
    sys.path.insert(0, str(REPO_ROOT))


def shared_data_dir() -> Path:
    """Where the shared data should be (it may not exist)."""
    env = os.environ.get("SMCP_SHARED_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return (REPO_ROOT.parent / "shared" / "data").resolve()


def require_shared(*relative: str) -> Path:
    """Return the shared data folder, or skip the calling test when it (or a named file) is missing."""
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set SMCP_SHARED_DATA to its location)")
    for rel in relative:
        if not (root / rel).exists():
            pytest.skip(f"shared data file not found at {root / rel}")
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the shared data folder; skips the test when it is absent."""
    return require_shared()


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a test module with one intra-op torch thread (restored afterwards); request it from an
    autouse module-scoped fixture so that it is active for the module's other fixtures too.

    The small models in the graph/slim/pruner/train tests are dominated by per-op threading overhead;
    on a shared 2-core machine two OpenMP threads can make each tiny conv ~100x slower.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
