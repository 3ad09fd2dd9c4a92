"""torch.distributed helpers for data-parallel pruning (``torchrun``).

Every function works without an initialised process group (one process: rank 0 of 1), so the
training code calls them unconditionally.  Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) call
:func:`init_from_env` once: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment; False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def local_device(device: str) -> torch.device:
    """``cuda`` becomes this process's GPU (``LOCAL_RANK``) under torchrun."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return d


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (no-op in one process)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world())
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if active():
        dist.broadcast(t, src)
    return t


def barrier() -> None:
    if active():
        dist.barrier()
