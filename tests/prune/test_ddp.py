"""Data-parallel pruning: two gloo processes on CPU end with identical masks and weights, and only
rank 0 writes artifacts."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY as _TINY

# the shared tiny recipe with whole epochs (no step cap) and more samples per rank
TINY = [o for o in _TINY
        if not o.startswith(("data.train_subset=", "prune.max_steps=", "prune.update_interval_samples="))] + [
    "data.train_subset=256", "prune.update_interval_samples=128"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: str, extra: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from smcp_core import stages
        from smcp_core.config.recipe import load_recipe

        recipe = load_recipe("quickstart", TINY + extra)
        out = Path(tmp) / "run"
        res = stages.prune(recipe, out).train
        torch.save({"keep": res.keep, "state": res.state_dict, "history": res.history}, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


OPTIONS = {
    "default": [],
    # the other method options, through the same data-parallel path
    "options": ["prune.grad_accum=2", "prune.masking=permanent", "prune.bn_rescaling=kept_fraction",
                "prune.cost_weight=0.5", "prune.importance.type=bn_taylor", "prune.importance.accumulate=average"],
    # distillation: every rank runs its own copy of the teacher (the start checkpoint, written below)
    "distill": ["prune.distill.enabled=true", "prune.distill.alpha=0.7"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(OPTIONS))
def test_two_gloo_ranks_end_with_identical_masks_and_weights(tmp_path, case):
    extra = list(OPTIONS[case])
    if case == "distill":
        from smcp_core.models import build_model

        torch.manual_seed(0)
        teacher = build_model("cifar/resnet20", num_classes=10, kwargs={"in_channels": 1})
        torch.save(teacher.state_dict(), tmp_path / "start.pt")
        extra.append(f"model.checkpoint={tmp_path / 'start.pt'}")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), extra), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0["keep"], r1["keep"])
    assert not bool(r0["keep"].all())  # something was pruned
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    updates = [r for r in r0["history"] if r.get("event") == "mask_update"]
    # 256 samples / (2 ranks x 32 [x 2 accumulated]) = 4 [2] steps per epoch; 128 samples = 2 [1]
    # global steps per update
    assert len(updates) >= 3
    # rank 0 wrote the artifacts, once
    summary = json.loads((tmp_path / "run" / "prune" / "summary.json").read_text())
    assert summary["meets_budget"] and summary["world_size"] == 2
    assert (tmp_path / "run" / "prune" / "pruned.pt").exists()
