"""SMCP as a PyTorch Lightning callback (extra ``lightning``: ``pip install -e ".[lightning]"``).

::

    from smcp_core.integrations.lightning import SMCPCallback
    from smcp_core import api

    smcp = SMCPCallback(example=torch.randn(1, 3, 32, 32), speedup=2.0,
                        schedule=api.StepSchedule(warmup=200, ramp=800, update_every=100))
    trainer = lightning.Trainer(max_steps=3000, callbacks=[smcp])
    trainer.fit(module, datamodule)
    slim = smcp.slim(module)                  # channels removed; outputs == the masked module's
    api.export_onnx(slim, example, "model.onnx")

The callback does in Lightning's hooks what a hand-written loop does with :mod:`smcp_core.api`:
``setup`` builds the channel graph, the latency table (measured, or ``table=`` / ``table_path=``)
and the pruner, before ``configure_optimizers``; ``on_before_optimizer_step`` (after AMP
unscaling, once per optimizer step) scores the gradients and adds the pruned decay;
``on_train_batch_end`` runs the mask updates once per optimizer step (gradient accumulation
counts optimizer steps).  The pruner's state is saved in Lightning checkpoints and restored on
resume (pass ``table_path=`` to resume in a new process without profiling again).  Under DDP
scores are all-reduced and masks broadcast from rank 0; the table must then be given
(``table_path=``), not measured by every rank.  Gradient clipping (Lightning's, after this hook's
pruned decay) is not what ``smcp prune`` does; leave it off to prune as the CLI does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from smcp_core import api
from smcp_core.errors import SmcpError
from smcp_core.utils.tv import import_torchvision

import_torchvision()  # torchmetrics (imported by lightning) imports torchvision: its op schemas first
try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    raise SmcpError('the Lightning callback needs the lightning package: pip install -e ".[lightning]"') from None


class SMCPCallback(pl.Callback):
    """Prune the LightningModule (or its ``submodule``) to one target while it trains.  The
    arguments are those of :func:`smcp_core.api.channel_graph`, :func:`~smcp_core.api.profile` and
    :func:`~smcp_core.api.pruner`; ``profile`` holds keyword arguments of ``api.profile``."""

    def __init__(self, *, example: torch.Tensor, schedule: api.StepSchedule, speedup: float | None = None,
                 latency_ms: float | None = None, flops_ratio: float | None = None, submodule: str | None = None,
                 table: api.LatencyTable | None = None, table_path: str | Path | None = None,
                 config: dict | None = None, closed_loop: int = 2, profile: dict | None = None) -> None:
        super().__init__()
        self.example = example
        self.schedule = schedule
        self.target = {"speedup": speedup, "latency_ms": latency_ms, "flops_ratio": flops_ratio}
        self.submodule = submodule
        self.table = table
        self.table_path = table_path
        self.config = config
        self.closed_loop = closed_loop
        self.profile_kwargs = dict(profile or {})
        self.pruner: api.Pruner | None = None
        self._pending: dict | None = None  # state loaded from a checkpoint before setup
        self._optimizer_steps = 0  # trainer.global_step at the last after_step

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.pruner is not None:
            return
        graph = api.channel_graph(pl_module, self.example, submodule=self.submodule)
        table = self.table
        if table is None and self.table_path is not None:
            table = api.load_table(self.table_path)
        if table is None and self.target["flops_ratio"] is None:
            if trainer.world_size > 1:  # every rank would measure its own table, on a shared machine
                raise SmcpError("SMCPCallback under DDP needs a latency table measured once: api.profile(...) then "
                                "table.save(path), and pass table_path=path")
            table = api.profile(pl_module, graph, self.example, **self.profile_kwargs)
            self.table = table  # (a resumed fit in this process reuses it; a new process: pass table_path=)
        self.pruner = api.pruner(pl_module, graph, table, **self.target, schedule=self.schedule, config=self.config,
                                 example=self.example, closed_loop=self.closed_loop)
        if self._pending is not None:
            self.pruner.load_state_dict(self._pending)
            self._pending = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the strategy moved the module to its device: the pruner's own tensors follow."""
        if self.pruner is not None:
            self.pruner.to(pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a checkpoint's training state is restored: count optimizer steps from here."""
        self._optimizer_steps = trainer.global_step

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._need_pruner().before_step()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pruner = self._need_pruner()
        while self._optimizer_steps < trainer.global_step:  # one optimizer step per accumulated batch group
            self._optimizer_steps += 1
            row = pruner.after_step()
            if row is not None:
                pl_module.log_dict({"smcp/kept_classes": float(row["kept_classes"]),
                                    "smcp/predicted": float(row["predicted"])})

    def state_dict(self) -> dict:
        return self.pruner.state_dict() if self.pruner is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.pruner is None:
            self._pending = state_dict
        else:
            self.pruner.load_state_dict(state_dict)

    def slim(self, pl_module: torch.nn.Module) -> torch.nn.Module:
        """The pruned module with its channels removed (:func:`smcp_core.api.slim`)."""
        return api.slim(pl_module, self._need_pruner())

    def _need_pruner(self) -> api.Pruner:
        if self.pruner is None:
            raise SmcpError("SMCPCallback was not set up: pass it to lightning.Trainer(callbacks=[...]) and call fit")
        return self.pruner
