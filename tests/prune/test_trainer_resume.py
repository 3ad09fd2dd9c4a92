"""stages.prune with a FLOPs target: no latency table needed; interrupt + resume == uninterrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Recorder, tiny_recipe

from smcp_core import stages
from smcp_core.errors import SmcpError
from smcp_core.prune.trainer import CHECKPOINT


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(torch_single_thread):
    yield



class Interrupt(Recorder):
    """Raises KeyboardInterrupt at the first step of the epoch after ``after_epoch`` (train.py writes
    the end-of-epoch checkpoint after reporting the epoch's metrics, so that checkpoint exists)."""

    def __init__(self, after_epoch: int):
        super().__init__()
        self.after_epoch = after_epoch
        self.armed = False

    def metrics(self, row: dict) -> None:
        super().metrics(row)
        if row.get("event") == "epoch" and row["epoch"] == self.after_epoch:
            self.armed = True

    def progress(self, task: str, done: int, total: int, info: str = "") -> None:
        if self.armed and task == "epoch":
            raise KeyboardInterrupt


def _load(out: Path):
    ck = torch.load(out / "prune" / "pruned.pt", map_location="cpu", weights_only=True)
    summary = json.loads((out / "prune" / "summary.json").read_text())
    return ck, summary


def _updates(rows):
    return [(r["epoch"], r["progress"], r["kept_classes"], round(r["cost"], 9)) for r in rows
            if r.get("event") == "mask_update"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    recipe = tiny_recipe()
    out = tmp_path_factory.mktemp("A")
    assert not (out / "latency.json").exists()
    torch.manual_seed(1)  # stages.build_model's random init uses the global RNG (see below)
    rec = Recorder()
    summary = stages.prune(recipe, out, reporter=rec).to_dict()
    return recipe, out, summary, rec.rows


def test_prune_with_flops_target_needs_no_latency_table(uninterrupted):
    recipe, out, summary, rows = uninterrupted
    assert not (out / "latency.json").exists()
    assert summary["cost_unit"] == "MMAC" and summary["predicted_ms"] is None
    assert summary["target"]["kind"] == "flops_ratio" and summary["target"]["value"] == 0.6
    assert summary["meets_budget"] is True
    assert summary["final_cost"] <= summary["budget"] * (1 + 1e-9)
    assert summary["budget"] == pytest.approx(0.6 * (1 - recipe.prune.target_margin) * summary["full_cost"])
    assert summary["flops_ratio"] < 0.6 and summary["params_ratio"] < 1
    ck, on_disk = _load(out)
    assert on_disk["final_cost"] == summary["final_cost"]
    assert ck["keep"].dtype == torch.bool and int(ck["n_classes"]) == ck["keep"].numel()
    assert (out / "prune" / CHECKPOINT).exists()
    epochs = [r for r in rows if r.get("event") == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert len(_updates(rows)) >= 2  # masks were updated during the ramp
    # masks only change during the ramp: the cooldown epoch has the final cost
    assert epochs[-1]["cost"] == pytest.approx(summary["final_cost"])
    # the pruned weights are the masked ones: a pruned class has all-zero consumer weights
    model = stages.build_model(recipe, load_weights=False)
    graph = stages.build_graph(recipe, model)
    keep = ck["keep"]
    sd = ck["state_dict"]
    for l in graph.consumers:
        w = sd[f"{l.name}.weight"]
        dead = ~keep[l.in_labels]
        if bool(dead.any()):
            assert float(w[:, dead].abs().max()) == 0.0, l.name


def test_interrupted_then_resumed_equals_uninterrupted(uninterrupted, tmp_path):
    recipe, out_a, summary_a, rows_a = uninterrupted
    out_b = tmp_path / "B"
    torch.manual_seed(1)
    rep = Interrupt(after_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        stages.prune(recipe, out_b, reporter=rep)
    ck = torch.load(out_b / "prune" / CHECKPOINT, map_location="cpu", weights_only=True)
    assert ck["epoch"] == 2
    assert not (out_b / "prune" / "pruned.pt").exists()

    torch.manual_seed(12345)  # a different global RNG state: resume must not depend on it
    rec = Recorder()
    summary_b = stages.prune(recipe, out_b, reporter=rec, resume=True).to_dict()
    assert [r["epoch"] for r in rec.rows if r.get("event") == "epoch"] == [3, 4]

    ck_a, _ = _load(out_a)
    ck_b, _ = _load(out_b)
    assert torch.equal(ck_a["keep"], ck_b["keep"])
    assert ck_a["state_dict"].keys() == ck_b["state_dict"].keys()
    for k, v in ck_a["state_dict"].items():
        assert torch.allclose(v.float(), ck_b["state_dict"][k].float(), atol=1e-6, rtol=0), k
    assert summary_b["final_cost"] == pytest.approx(summary_a["final_cost"])
    assert summary_b["meets_budget"] is True
    assert summary_b["top1"] == pytest.approx(summary_a["top1"])
    hist_b = json.loads((out_b / "prune" / "summary.json").read_text())["history"]
    assert _updates(hist_b) == _updates(rows_a)


def test_resume_without_checkpoint_starts_over(tmp_path):
    """--resume on an empty run directory is a normal run (nothing to resume from)."""
    recipe = tiny_recipe("prune.epochs=2", "prune.ramp_epochs=0", "prune.cooldown_epochs=1")
    summary = stages.prune(recipe, tmp_path, resume=True).to_dict()
    assert summary["meets_budget"] is True
    hist = summary["history"]
    assert [r["epoch"] for r in hist if r.get("event") == "epoch"] == [1, 2]


def test_resume_checkpoint_of_another_model_is_refused(uninterrupted, tmp_path):
    _, out_a, _, _ = uninterrupted
    (tmp_path / "prune").mkdir()
    (tmp_path / "prune" / CHECKPOINT).write_bytes((out_a / "prune" / CHECKPOINT).read_bytes())
    other = tiny_recipe("model.source=cifar/resnet32")
    with pytest.raises(SmcpError, match="different model"):
        stages.prune(other, tmp_path, resume=True)


def test_same_recipe_same_result_whatever_the_global_rng(uninterrupted, tmp_path):
    recipe, out_a, _, _ = uninterrupted
    torch.manual_seed(999)
    stages.prune(recipe, tmp_path)
    ck_a, _ = _load(out_a)
    ck_c, _ = _load(tmp_path)
    assert torch.equal(ck_a["keep"], ck_c["keep"])
    assert all(torch.equal(v, ck_c["state_dict"][k]) for k, v in ck_a["state_dict"].items())


def _nan_run(tmp_path, lr: str) -> str:
    recipe = tiny_recipe(f"prune.optimizer.lr={lr}")
    torch.manual_seed(0)
    with pytest.raises(SmcpError) as ei:
        stages.prune(recipe, tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "loss became" in msg and ("nan" in msg or "inf" in msg)
    return msg


def test_nan_loss_names_the_checkpoint(tmp_path):
    msg = _nan_run(tmp_path, "1.0e10")  # diverges in the second epoch
    ck = tmp_path / "prune" / CHECKPOINT
    assert str(ck) in msg
    assert "--resume" in msg and "prune.optimizer.lr" in msg
    assert ck.exists()
    assert torch.load(ck, map_location="cpu", weights_only=True)["epoch"] >= 1
    assert not (tmp_path / "prune" / "pruned.pt").exists()


def test_nan_loss_in_first_epoch_does_not_point_to_a_missing_checkpoint(tmp_path):
    msg = _nan_run(tmp_path, "1.0e20")  # diverges at the second step of the first epoch
    ck = tmp_path / "prune" / CHECKPOINT
    assert ck.exists() or str(ck) not in msg


def test_infeasible_flops_target_fails_before_training(tmp_path):
    recipe = tiny_recipe("prune.target.flops_ratio=0.001")
    with pytest.raises(SmcpError, match="out of reach") as ei:
        stages.prune(recipe, tmp_path)
    assert "minimum" in str(ei.value)
    assert not (tmp_path / "prune" / CHECKPOINT).exists()


def test_final_mask_update_uses_accumulated_importance(tmp_path, monkeypatch):
    from smcp_core.prune import allocator

    seen: list[float] = []
    orig = allocator.Allocator.solve

    def spy(self, scores, budget, keep_now, **kw):
        if kw.get("rounds") != 1:  # rounds=1: the feasibility check before training, not a mask update
            seen.append(float(scores.abs().sum()))
        return orig(self, scores, budget, keep_now, **kw)

    monkeypatch.setattr(allocator.Allocator, "solve", spy)
    torch.manual_seed(1)
    summary = stages.prune(tiny_recipe(), tmp_path).to_dict()
    assert len(seen) >= 2
    assert all(s > 0 for s in seen), seen
    assert summary["flops_ratio"] >= 0.3  # at least half of the 0.6 target is kept
