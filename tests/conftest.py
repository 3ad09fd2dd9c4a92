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
    "prune.closed_loop=0",  # tests of a latency target measure nothing unless they ask for it
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


def sets(items: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    out: list[str] = []
    for s in items:
        out += ["--set", s]
    return out


def one_error_line(err: str, *, alone: bool = True) -> str:
    """The one ``error: ...`` line of a failed command's stderr (no traceback).  ``alone``: nothing
    else on stderr either (no progress line, no leading empty line); otherwise other lines (progress
    logs) may come before it."""
    assert "Traceback" not in err, err
    if not alone:
        lines = [line for line in err.splitlines() if line.strip().startswith("error:")]
        assert len(lines) == 1, err
        return lines[0]
    assert not err.startswith("\n"), repr(err[:200])
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: ") + 5, lines[0]
    return lines[0]


def cli_env() -> dict:
    """The environment of an ``smcp`` subprocess: this checkout first on the path, one OpenMP
    thread, no ``SMCP_DEBUG`` (its tracebacks are what the tests look for)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.pop("SMCP_DEBUG", None)
    return e


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` (relative path -> bytes)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


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


# a tiny but complete run (profile -> prune -> slim -> export, latency target, ~1 min on 2 cores)
TINY_RUN = [
    "data.train_subset=128", "data.val_subset=64", "data.batch_size=32", "prune.epochs=3",
    "prune.warmup_epochs=1", "prune.ramp_epochs=1", "prune.cooldown_epochs=1", "prune.max_steps=2",
    "prune.update_interval_samples=64", "prune.target.speedup=1.2", "profile.batch_size=8",
    "profile.channel_step=16", "profile.min_runs=3", "profile.warmup=2", "profile.max_seconds=4",
    "export.batch_size=8", "export.min_runs=3", "export.max_seconds=2",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The run directory of ``smcp run`` with :data:`TINY_RUN`, built once per test session (the CLI
    reliability tests copy it before changing anything)."""
    import json

    import torch

    out = tmp_path_factory.mktemp("tiny") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, stdout, err = cli("run", "--out", out, *sets(TINY_RUN), "--json", "--quiet")
    finally:
        torch.set_num_threads(threads)
    # 2: the measured speed-up gate failed (CPU timing on a shared machine is noisy); artifacts exist
    assert code in (0, 2), err[-3000:]
    doc = json.loads(stdout)
    assert doc["stages"] == {s: "done" for s in ("profile", "prune", "slim", "export")}
    return out
