"""torch.distributed helpers for data-parallel pruning (``torchrun``).

Every function works without an initialised process group (one process: rank 0 of 1), so the
training code calls them unconditionally.  Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) call
:func:`init_from_env` once: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable

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


def env_world() -> int:
    """``WORLD_SIZE`` of torchrun's environment (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """``LOCAL_RANK`` of torchrun's environment: this process's GPU on its node (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment; False when not under torchrun."""
    if env_world() <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group(backend=backend)
    return True


def local_device(device: str, warn: Callable[[str], object] | None = None) -> torch.device:
    """This process's device.  Under torchrun (``WORLD_SIZE`` > 1) a CUDA device is always the
    process's own GPU, ``cuda:LOCAL_RANK``: ranks sharing one GPU is NCCL's duplicate-GPU error.  An
    explicit ``cuda:N`` with ``N != LOCAL_RANK`` is mapped too, and ``warn`` (if given) gets one line
    saying so; to run on other GPUs, choose them with ``CUDA_VISIBLE_DEVICES``.  Elsewhere
    ``device`` unchanged."""
    d = torch.device(device)
    if d.type != "cuda" or not (env_world() > 1 or active()):
        return d
    mine = torch.device("cuda", local_rank())
    if d.index is not None and d.index != mine.index and warn is not None:
        warn(f"device {device} under torchrun: each rank uses its own GPU, this one (LOCAL_RANK="
             f"{mine.index}) {mine}; choose the GPUs with CUDA_VISIBLE_DEVICES")
    return mine


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


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank (pickled; ``obj`` itself in one process)."""
    if not active():
        return obj
    payload = [obj]
    dist.broadcast_object_list(payload, src=src)
    return payload[0]


def barrier() -> None:
    if active():
        dist.barrier()
