"""Issue 17, "never lie, never run what it was not given": a run directory is data, never code; trust
in pickled checkpoints comes from the command line only; a failed slim gate is never taken as up to
date; stamps and --resume notice a changed model file or recipe."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, Recorder, cli, tiny_recipe

from smcp_core import stages
from smcp_core.errors import GateFailed, SmcpError
from smcp_core.models import build_model as registry_model
from smcp_core.stages import builders
from smcp_core.utils.fsutil import atomic_write_json, read_json


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield


@pytest.fixture(autouse=True)
def _no_trust_left_behind():
    yield
    builders.set_trust_checkpoint(False)


def _sets(items) -> list[str]:
    out: list[str] = []
    for s in items:
        out += ["--set", s]
    return out


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def slimmed(tmp_path_factory) -> Path:
    """A tiny run directory, pruned and slimmed with ``tiny_recipe()`` (copy it before changing it)."""
    out = tmp_path_factory.mktemp("run")
    recipe = tiny_recipe()
    torch.manual_seed(0)
    stages.prune(recipe, out)
    stages.slim(recipe, out)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ------------------------------------------------------------------ 1. artifacts are data, not code

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("ran")

def factory(**kwargs):
    Path({marker!r}).write_text("ran")
    raise RuntimeError("this code should never have run")
"""


def _point_spec_at(run: Path, tmp_path: Path) -> Path:
    """Rewrite the channel spec (with a valid checksum, as an attacker could) to name user code."""
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.py"
    evil.write_text(EVIL.format(marker=str(marker)))
    spec_path = run / "slim" / "channel_spec.json"
    spec = read_json(spec_path, "channel spec")
    spec["model"]["source"] = f"{evil}:factory"
    atomic_write_json(spec_path, spec, checksum=True)
    return marker


def test_export_rebuilds_from_the_recipe_never_from_the_spec(slimmed, tmp_path):
    run = _copy(slimmed, tmp_path)
    marker = _point_spec_at(run, tmp_path)
    with pytest.raises(SmcpError, match="made for another model.*re-run `smcp slim`"):
        stages.load_slim(tiny_recipe(), run)
    assert not marker.exists()
    code, _, err = cli("export", "--out", run, *_sets(TINY + ["export.min_runs=3", "export.max_seconds=2"]),
                       "--quiet")
    assert code == 1
    line = _one_line(err)
    assert "made for another model" in line and "re-run `smcp slim`" in line
    assert not marker.exists()


def test_rebuild_without_a_recipe_never_imports_user_code(slimmed, tmp_path):
    run = _copy(slimmed, tmp_path)
    marker = _point_spec_at(run, tmp_path)
    with pytest.raises(SmcpError, match="never says which code"):
        stages.rebuild_slim(run / "slim" / "channel_spec.json", run / "slim" / "weights.pt")
    assert not marker.exists()


def test_slim_model_rebuilt_from_the_recipe_matches(slimmed):
    """The untouched run directory still loads (from the recipe's definition) and computes."""
    m = stages.load_slim(tiny_recipe(), slimmed)
    with torch.no_grad():
        y = m(stages.example_input(tiny_recipe(), 2))
    assert y.shape == (2, 10)


# ------------------------------------------------------------------ 2. trust: the flag, not the env

def _pickled_checkpoint(tmp_path: Path) -> Path:
    m = registry_model("cifar/resnet20", num_classes=10, kwargs={"in_channels": 1})
    ck = tmp_path / "pickled.pt"
    torch.save({"state_dict": m.state_dict(), "args": argparse.Namespace(lr=0.1)}, ck)
    return ck


def test_environment_alone_does_not_enable_unpickling(tmp_path, monkeypatch):
    ck = _pickled_checkpoint(tmp_path)
    monkeypatch.setenv("SMCP_TRUST_CHECKPOINT", "1")
    recipe = tiny_recipe(f"model.checkpoint={ck}")
    with pytest.raises(SmcpError, match="--trust-checkpoint"):
        stages.build_model(recipe)
    short = TINY + [f"model.checkpoint={ck}", "prune.epochs=1", "prune.warmup_epochs=0", "prune.ramp_epochs=0",
                    "prune.cooldown_epochs=1", "prune.max_steps=1"]
    code, _, err = cli("prune", "--out", tmp_path / "a", *_sets(short), "--quiet")
    assert code == 1
    assert "--trust-checkpoint" in _one_line(err)
    assert not (tmp_path / "a" / "prune" / "pruned.pt").exists()


def test_trust_flag_holds_for_its_command_only(tmp_path):
    ck = _pickled_checkpoint(tmp_path)
    short = TINY + [f"model.checkpoint={ck}", "prune.epochs=1", "prune.warmup_epochs=0", "prune.ramp_epochs=0",
                    "prune.cooldown_epochs=1", "prune.max_steps=1"]
    code, _, err = cli("--trust-checkpoint", "prune", "--out", tmp_path / "a", *_sets(short), "--quiet")
    assert code == 0, err
    code, _, err = cli("prune", "--out", tmp_path / "b", *_sets(short), "--quiet")  # same process, no flag
    assert code == 1 and "--trust-checkpoint" in _one_line(err)


# ------------------------------------------------------------------ 3. a failed slim gate stays failed

def test_failed_slim_gate_is_never_up_to_date(slimmed, tmp_path):
    run = _copy(slimmed, tmp_path)
    recipe = tiny_recipe()
    assert stages.up_to_date(recipe, run, "slim")
    strict = tiny_recipe("export.tolerance=1e-300")  # export.* is not in slim's stamp: same stamp
    assert stages.stamp(strict, "slim") == stages.stamp(recipe, "slim")
    with pytest.raises(GateFailed, match="differs from the masked model"):
        stages.slim(strict, run)
    assert not stages.up_to_date(recipe, run, "slim")  # `smcp run` re-runs slim (and fails again)
    failed = read_json(run / "slim" / "slim.failed.json", "failed slim summary")
    assert failed["passed"] is False and failed["max_abs_diff"] > 1e-300  # the evidence is kept
    assert (run / "slim" / "weights.pt").exists()
    with pytest.raises(SmcpError, match="failed its gate"):
        stages.load_slim(recipe, run)
    code, _, err = cli("export", "--out", run, *_sets(TINY + ["export.min_runs=3", "export.max_seconds=2"]),
                       "--quiet")
    assert code == 1 and "failed its gate" in _one_line(err)
    stages.slim(recipe, run)  # a passing slim makes it usable again
    assert stages.up_to_date(recipe, run, "slim")
    assert not (run / "slim" / "slim.failed.json").exists()
    stages.load_slim(recipe, run)


# ------------------------------------------------------------------ 4. stale results

MODEL_FILE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def factory(**kwargs):
    return Net(**kwargs)
"""


def test_editing_the_model_file_makes_every_stage_stale(tmp_path):
    f = tmp_path / "mynet.py"
    f.write_text(MODEL_FILE)
    recipe = tiny_recipe(f"model.source={f}:factory")
    before = {st: stages.stamp(recipe, st) for st in stages.STAGES}
    f.write_text(MODEL_FILE.replace("torch.relu(self.conv(x))", "torch.sigmoid(self.conv(x))"))
    after = {st: stages.stamp(recipe, st) for st in stages.STAGES}
    assert all(before[st] != after[st] for st in stages.STAGES)
    f.write_text(MODEL_FILE)  # the same bytes again: the same stamps
    assert {st: stages.stamp(recipe, st) for st in stages.STAGES} == before


def test_export_refuses_a_slim_model_of_another_recipe(slimmed, tmp_path):
    run = _copy(slimmed, tmp_path)
    other = ["prune.target.flops_ratio=0.5"]
    with pytest.raises(SmcpError, match="another recipe.*re-run `smcp slim`"):
        stages.load_slim(tiny_recipe(*other), run)
    code, _, err = cli("export", "--out", run,
                       *_sets(TINY + other + ["export.min_runs=3", "export.max_seconds=2"]), "--quiet")
    assert code == 1
    assert "re-run `smcp slim`" in _one_line(err)
    assert not (run / "export" / "report.json").exists()


class _Interrupt(Recorder):
    """KeyboardInterrupt at the first step after epoch ``after`` (its checkpoint is written)."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.armed = after, False

    def metrics(self, row: dict) -> None:
        super().metrics(row)
        if row.get("event") == "epoch" and row["epoch"] == self.after:
            self.armed = True

    def progress(self, task: str, done: int, total: int, info: str = "") -> None:
        if self.armed and task == "epoch":
            raise KeyboardInterrupt


def test_resume_with_a_changed_recipe_names_the_changed_keys(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        stages.prune(tiny_recipe(), tmp_path, reporter=_Interrupt(after=2))
    ck = tmp_path / "prune" / "checkpoint.pt"
    before = ck.read_bytes()
    changed = tiny_recipe("prune.target.flops_ratio=0.5", "prune.max_steps=1")
    with pytest.raises(SmcpError) as ei:
        stages.prune(changed, tmp_path, resume=True)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "changed: prune.max_steps, prune.target.flops_ratio)" in msg
    assert ck.read_bytes() == before
    code, _, err = cli("prune", "--resume", "--out", tmp_path,
                       *_sets(TINY + ["prune.target.flops_ratio=0.5", "prune.max_steps=1"]), "--quiet")
    assert code == 1 and "prune.max_steps, prune.target.flops_ratio" in _one_line(err)
    # what does not change the training (or is the documented way out of a diverged run) may change
    ok = tiny_recipe("prune.eval_every=2", "prune.optimizer.lr=0.05")
    res = stages.prune(ok, tmp_path, resume=True).to_dict()
    assert [r["epoch"] for r in res["history"] if r.get("event") == "epoch"][-1] == 4
