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


# ---------------------------------------------------------------- fp16 AMP overflow steps (issue 15, D3)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x))


def _overflow_grads(model) -> None:
    """What ``GradScaler.unscale_`` leaves after an fp16 overflow: inf and nan gradients."""
    for j, p in enumerate(model.parameters()):
        if p.grad is not None:
            p.grad.fill_(float("nan") if j % 2 else float("inf"))


@pytest.mark.parametrize("overflow_at", [0, 2])
@pytest.mark.parametrize("accumulate", ["latest", "momentum", "average"])
@pytest.mark.parametrize("kind", ["taylor", "bn_taylor"])
def test_importance_leaves_out_a_step_with_non_finite_gradients(kind, accumulate, overflow_at):
    """The step GradScaler skips is not accumulated either: scores equal the run without it."""
    import torch.nn.functional as F

    from smcp_core.graph.channel_graph import ChannelGraph
    from smcp_core.prune.importance import ImportanceTracker
    from smcp_core.prune.masking import Masker

    torch.manual_seed(0)
    model = _Net()
    masker = Masker(model, ChannelGraph(model, torch.randn(2, 3, 8, 8)))
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(4)]

    def scores(steps, overflow: int | None) -> tuple[torch.Tensor, int]:
        tr = ImportanceTracker(masker, kind=kind, accumulate=accumulate)
        for i in steps:
            model.zero_grad(set_to_none=True)
            x, y = batches[i]
            F.cross_entropy(model(x), y).backward()
            if i == overflow:
                _overflow_grads(model)
            tr.update()
        return tr.scores(), tr.count

    with_overflow, n = scores(range(4), overflow_at)
    without, m = scores([i for i in range(4) if i != overflow_at], None)
    assert bool(torch.isfinite(with_overflow).all())
    assert torch.equal(with_overflow, without) and n == m == 3


class _OverflowingScaler:
    """A GradScaler that reports an fp16 overflow at every third step: its unscaled gradients are
    inf/nan and it skips the optimizer step (as ``torch.amp.GradScaler`` does)."""

    def __init__(self, *args, **kwargs):
        self.calls = 0
        self.found_inf = False

    def is_enabled(self) -> bool:
        return True

    def scale(self, loss):
        return loss

    def unscale_(self, opt) -> None:
        self.calls += 1
        self.found_inf = self.calls % 3 == 0
        if self.found_inf:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.fill_(float("inf"))

    def step(self, opt) -> None:
        if not self.found_inf:
            opt.step()

    def update(self) -> None:
        self.found_inf = False

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, d: dict) -> None:
        self.calls = d["calls"]


@pytest.mark.parametrize("accumulate", ["momentum", "average"])
def test_amp_overflow_steps_do_not_poison_the_masks(tmp_path, monkeypatch, accumulate):
    """Was a NaN score for good (momentum) and a ValueError in the next solve (exit 3)."""
    from smcp_core.prune import allocator

    seen: list[torch.Tensor] = []
    orig = allocator.Allocator.solve

    def spy(self, scores, budget, keep_now, **kw):
        seen.append(scores.detach().clone())
        return orig(self, scores, budget, keep_now, **kw)

    monkeypatch.setattr(torch.amp, "GradScaler", _OverflowingScaler)
    monkeypatch.setattr(allocator.Allocator, "solve", spy)
    torch.manual_seed(1)
    summary = stages.prune(tiny_recipe(f"prune.importance.accumulate={accumulate}"), tmp_path).to_dict()
    assert summary["meets_budget"] and len(seen) >= 2
    assert all(bool(torch.isfinite(s).all()) for s in seen)


@pytest.mark.gpu
def test_a_real_fp16_overflow_is_left_out_without_waiting_for_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    import torch.nn.functional as F

    from smcp_core.graph.channel_graph import ChannelGraph
    from smcp_core.prune.importance import ImportanceTracker
    from smcp_core.prune.masking import Masker

    model = _Net()
    graph = ChannelGraph(model, torch.randn(2, 3, 8, 8))
    model.cuda()
    masker = Masker(model, graph)
    masker.to(torch.device("cuda"))
    tracker = ImportanceTracker(masker, kind="taylor", accumulate="momentum")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**60)  # the first step overflows in fp16
    x, y = torch.randn(4, 3, 8, 8, device="cuda"), torch.randint(0, 4, (4,), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tracker.update()  # decided on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**60  # it was an overflow, and the step was skipped
    assert tracker.count == 0 and bool(torch.isfinite(tracker.scores()).all())
