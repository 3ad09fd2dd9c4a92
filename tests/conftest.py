"""Shared pytest fixtures.

``shared_data`` is the folder of real data and pretrained models that lives next to the repository
(``<repo>/../shared/data``), or wherever the ``SMCP_SHARED_DATA`` environment variable points.  Tests
that need it are skipped with a clear reason when it is absent (it is never part of the project).
"""

from __future__ import annotations

import io
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run the tests against this checkout even when not installed
    sys.path.insert(0, str(REPO_ROOT))

from smcp_core.config.recipe import load_recipe  # noqa: E402
from smcp_core.events import Reporter  # noqa: E402


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


# a tiny quickstart variant (digits, ResNet-20, FLOPs target: no latency table needed)
TINY = [
    "data.source=digits",
    "data.train_subset=128",
    "data.val_subset=64",
    "data.batch_size=32",
    "prune.epochs=4",
    "prune.warmup_epochs=1",
    "prune.ramp_epochs=2",
    "prune.cooldown_epochs=1",
    "prune.max_steps=2",
    "prune.update_interval_samples=64",
    "prune.target.flops_ratio=0.6",
    "model.source=cifar/resnet20",
    "model.kwargs={in_channels: 1}",
]


def tiny_recipe(*extra: str):
    return load_recipe("quickstart", TINY + list(extra))


class Recorder(Reporter):
    """Collects the metrics rows a run reports, and the order of events (mask updates, steps)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.events: list[str] = []

    def metrics(self, row: dict) -> None:
        self.rows.append(dict(row))
        self.events.append(row.get("event", ""))

    def progress(self, task: str, done: int, total: int, info: str = "") -> None:
        if task == "epoch":
            self.events.append("step")


def cli(*argv) -> tuple[int, str, str]:
    """Run `smcp` in this process: (exit code, stdout, stderr)."""
    from smcp_cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()
