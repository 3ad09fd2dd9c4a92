"""Per-channel-class importance and its accumulation between mask updates.

Taylor (first order): for every masked layer, ``s = -W * dL/dW_eff`` on the *dense* weight, summed
over kernel positions and over the layer's output channels that are currently alive, gives one
number per input channel; the numbers of all layers reading a class are added and the absolute
value of the total is that class's score for the step.  For a masked channel the same expression
estimates what switching it back on would gain, so kept and pruned channels are comparable.

Weight: ``|W|`` summed the same way (no gradient needed).

BN-Taylor (HALP's criterion, ``bn_taylor``): for every batch norm directly after a conv,
``(gamma * dL/dgamma + beta * dL/dbeta)^2`` per output channel, i.e. the squared first-order
estimate of zeroing that channel's normalised output; the numbers of all convs writing a class are
added.  It scores a class by its producers' outputs, so a class whose producers have no batch norm
after them scores 0 (HALP leaves such layers alone).

Filter norms (``l1_filter`` / ``l2_filter``, for the ``l1`` and ``sfp`` methods): a class scores the
sum, over the conv/linear layers that *write* it, of the L1 / L2 norm of its output filter
``W[o]`` (dense weight).  They are read from the current weights when the scores are asked for:
no gradient and no accumulation.

Accumulators: ``latest`` (the last step only), ``momentum`` (EMA, reset after each mask update),
``average`` (mean since the last mask update).  A step with non-finite scores (fp16 AMP: GradScaler
found inf/nan gradients and skips that optimizer step) is not accumulated and not counted.

Removed groups.  When a mask update removes every channel of a group (layer pruning), the score of
its classes is held at the value that decided the removal until the group comes back.  Their live
Taylor estimate is meaningless: the layer reading the group then outputs zeros, the batch norm after
it normalises a signal of zero variance, and the gradient through it is amplified by
``1/sqrt(eps)`` (~300x).  Measured on a CIFAR ResNet-56 this made every removed residual block look
hundreds of times more important than any kept channel, so consecutive mask updates alternated
between removing blocks and restoring all of them.  All of it stays on the training device; nothing here
synchronises with the host.
"""

from __future__ import annotations

import torch

from smcp_core.prune.bnscale import following_batchnorms
from smcp_core.prune.masking import Masker
from smcp_core.prune.methods import FILTER_KINDS, filter_norms


class ImportanceTracker:
    def __init__(
        self,
        masker: Masker,
        *,
        kind: str = "taylor",
        accumulate: str = "momentum",
        momentum: float = 0.9,
    ) -> None:
        if kind not in ("taylor", "weight", "bn_taylor", "l1_filter", "l2_filter"):
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
        self._n = torch.zeros((), device=device, dtype=torch.long)  # steps accumulated (see count)
        cg = masker.graph.class_group
        self._valid = (cg >= 0).to(device)
        self._cg = cg.clamp(min=0).to(device)
        self._n_groups = max(1, len(masker.graph.groups))
        self.held = torch.zeros(n, device=device, dtype=torch.float32)
        self.removed = self._removed_now()
        self._bns: list[tuple[torch.nn.Module, torch.Tensor]] = []
        if kind == "bn_taylor":

            mods = dict(masker.model.named_modules())
            graph = masker.graph
            self._bns = [(mods[name], graph.layers[li].out_labels.to(device))
                         for name, li in following_batchnorms(graph).items()]

    def to(self, device) -> ImportanceTracker:
        self._bns = [(bn, lab.to(device)) for bn, lab in self._bns]
        self.acc = self.acc.to(device)
        self._n = self._n.to(device)
        self.held = self.held.to(device)
        self.removed = self.removed.to(device)
        self._valid = self._valid.to(device)
        self._cg = self._cg.to(device)
        return self

    @torch.no_grad()
    def _removed_now(self) -> torch.Tensor:
        """Classes whose whole group is masked (the group's layers are pruned away)."""
        cm = self.masker.class_mask.to(self._cg.device).float() * self._valid.float()
        alive = torch.zeros(self._n_groups, device=cm.device).index_add_(0, self._cg, cm)
        return self._valid & (alive[self._cg] == 0)

    @torch.no_grad()
    def step_scores(self) -> torch.Tensor:
        """This step's per-class score (call after backward, before pruned decay is added)."""
        cm = self.masker.class_mask
        if self.kind in ("l1_filter", "l2_filter"):

            return filter_norms(self.masker, FILTER_KINDS[self.kind])
        total = torch.zeros_like(self.acc)
        if self.kind == "bn_taylor":
            for bn, lout in self._bns:
                beta = bn.bias
                if hasattr(bn, "parametrizations") and "weight" in bn.parametrizations:
                    # gamma rescaled by prune.bn_rescaling: gamma = orig * s, and the gradient
                    # stored on orig is dL/dgamma / s
                    orig = bn.parametrizations.weight.original
                    sc = bn.parametrizations.weight[0].s
                    gamma, ggrad = orig * sc, None if orig.grad is None else orig.grad * sc
                else:
                    gamma, ggrad = bn.weight, bn.weight.grad
                if ggrad is None or beta.grad is None:
                    continue
                t = (gamma * ggrad + beta * beta.grad).float().square()
                total.index_add_(0, lout.to(t.device), t)
            return total
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

    @property
    def count(self) -> int:
        """Steps accumulated in this window (a step with non-finite scores does not count).  Reading
        it waits for the device; :meth:`update` never does."""
        return int(self._n)

    @count.setter
    def count(self, value: int) -> None:
        self._n.fill_(int(value))

    @torch.no_grad()
    def update(self) -> None:
        """Accumulate this step's scores.  A step whose scores are not finite (an fp16 AMP overflow:
        inf/nan gradients, and GradScaler skips the optimizer step) is left out, as if it had not
        happened; decided on the device, without waiting for it."""
        if self.kind in ("l1_filter", "l2_filter"):  # read from the weights when asked for
            self._n.add_(1)
            return
        s = torch.where(self.removed, self.held, self.step_scores())
        ok = torch.isfinite(s).all()
        self.acc.copy_(torch.where(ok, self._accumulated(s), self.acc))
        self._n.add_(ok.to(self._n.dtype))

    def _accumulated(self, s: torch.Tensor) -> torch.Tensor:
        """The accumulator after one more step with scores ``s`` (the first step of a window: ``s``)."""
        n = self._n.to(s.dtype)
        if self.accumulate == "latest":
            return s
        if self.accumulate == "momentum":
            return torch.where(n == 0, s, self.acc.mul(self.momentum).add_(s, alpha=1 - self.momentum))
        return self.acc.mul(n / (n + 1)).add_(s / (n + 1))

    def scores(self) -> torch.Tensor:
        """Accumulated scores; right after a reset (no step since), the previous window's.  Filter
        norms are computed from the current weights."""
        if self.kind in ("l1_filter", "l2_filter"):
            return self.step_scores()
        if self.count == 0 and self.last is not None:
            return self.last
        return self.acc

    def reset(self) -> None:
        """Start a new window; call right after the masks changed.  Groups removed by the change
        keep the score that decided their removal (see the module docstring)."""
        removed = self._removed_now()
        newly = removed & ~self.removed
        self.held = torch.where(newly, self.scores(), self.held)
        self.removed = removed
        self.last = self.acc.clone() if self.count > 0 or self.last is None else self.last
        self.acc.zero_()
        self._n.zero_()

    def state_dict(self) -> dict:
        return {"acc": self.acc.detach().cpu().clone(), "count": self.count,
                "last": None if self.last is None else self.last.detach().cpu().clone(),
                "held": self.held.detach().cpu().clone(), "removed": self.removed.detach().cpu().clone()}

    def load_state_dict(self, d: dict) -> None:
        self.acc.copy_(d["acc"].to(self.acc.device))
        self.count = int(d["count"])
        last = d.get("last")
        self.last = None if last is None else last.to(self.acc.device)
        if "held" in d:
            self.held.copy_(d["held"].to(self.held.device))
            self.removed.copy_(d["removed"].to(self.removed.device))
