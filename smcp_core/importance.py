"""Per-channel-class importance and its accumulation between mask updates.

Taylor (first order): for every masked layer, ``s = -W * dL/dW_eff`` on the *dense* weight, summed
over kernel positions and over the layer's output channels that are currently alive, gives one
number per input channel; the numbers of all layers reading a class are added and the absolute
value of the total is that class's score for the step.  For a masked channel the same expression
estimates what switching it back on would gain, so kept and pruned channels are comparable.

Weight: ``|W|`` summed the same way (no gradient needed).

Accumulators: ``latest`` (the last step only), ``momentum`` (EMA, reset after each mask update),
``average`` (mean since the last mask update).  All of it stays on the training device; nothing here
synchronises with the host.
"""

from __future__ import annotations

import torch

from .masking import Masker


class ImportanceTracker:
    def __init__(
        self,
        masker: Masker,
        *,
        kind: str = "taylor",
        accumulate: str = "momentum",
        momentum: float = 0.9,
    ) -> None:
        if kind not in ("taylor", "weight"):
            raise ValueError(kind)
        if accumulate not in ("latest", "momentum", "average"):
            raise ValueError(accumulate)
        self.masker = masker
        self.kind = kind
        self.accumulate = accumulate
        self.momentum = momentum
        n = masker.graph.n_classes
        device = masker.class_mask.device
        self.acc = torch.zeros(n, device=device, dtype=torch.float32)
        self.last: torch.Tensor | None = None
        self.count = 0

    def to(self, device) -> "ImportanceTracker":
        self.acc = self.acc.to(device)
        return self

    @torch.no_grad()
    def step_scores(self) -> torch.Tensor:
        """This step's per-class score (call after backward, before pruned decay is added)."""
        cm = self.masker.class_mask
        total = torch.zeros_like(self.acc)
        for w, g, lin, lout in self.masker.weights_and_grads():
            if self.kind == "taylor":
                if g is None:
                    continue
                s = -(w * g)
            else:
                s = w.abs()
            s = s.float()
            if s.dim() > 2:
                s = s.sum(dim=tuple(range(2, s.dim())))
            alive = cm[lout].to(s.dtype)
            per_in = alive @ s  # (cin,)
            total.index_add_(0, lin, per_in)
        return total.abs()

    @torch.no_grad()
    def update(self) -> None:
        s = self.step_scores()
        if self.accumulate == "latest" or self.count == 0:
            self.acc.copy_(s)
        elif self.accumulate == "momentum":
            self.acc.mul_(self.momentum).add_(s, alpha=1 - self.momentum)
        else:
            self.acc.mul_(self.count / (self.count + 1)).add_(s, alpha=1 / (self.count + 1))
        self.count += 1

    def scores(self) -> torch.Tensor:
        """Accumulated scores; right after a reset (no step since), the previous window's."""
        if self.count == 0 and self.last is not None:
            return self.last
        return self.acc

    def reset(self) -> None:
        self.last = self.acc.clone()
        self.acc.zero_()
        self.count = 0

    def state_dict(self) -> dict:
        return {"acc": self.acc.detach().cpu().clone(), "count": self.count,
                "last": None if self.last is None else self.last.detach().cpu().clone()}

    def load_state_dict(self, d: dict) -> None:
        self.acc.copy_(d["acc"].to(self.acc.device))
        self.count = int(d["count"])
        last = d.get("last")
        self.last = None if last is None else last.to(self.acc.device)
