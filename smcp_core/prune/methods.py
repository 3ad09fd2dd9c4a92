"""Classic channel-pruning methods on smcp's machinery (``prune.method``).

Every method goes through the same channel graph, cost model (latency table or FLOPs), training
loop (:func:`smcp_core.prune.trainer.prune_train`: dense warm-up, pruning window, frozen cooldown), slim
and export; they differ in how classes are scored, how many each group keeps, and what happens to
pruned weights.

``smcp`` (default)
    Soft input-channel masks (straight-through), Taylor importance, multiple-choice knapsack over
    the latency table every ``update_interval_samples``; masks are re-solved from scratch, so
    channels can come back.

``halp`` (HALP, Shen et al., NeurIPS 2022), a preset on the same machinery:
    * forced: ``masking: permanent`` (pruned weights are zeroed when pruned and re-zeroed after
      every optimizer step, so the momentum buffer cannot move them) and a *monotone* allocation:
      classes pruned at one mask update stay pruned (they get score -inf and every group's width is
      capped at its current width, so the knapsack keeps a subset of what is kept now; the widths
      stay on the ``channel_round``/``min_channels`` grid and the budget is met by the true cost);
    * defaults, replacing keys left at their schema default: ``importance.type: bn_taylor``,
      ``importance.accumulate: average`` (HALP averages over each window), ``cost_weight: 0``
      (output-side latency attribution), ``schedule: geometric`` (HALP's latency schedule).
    The knapsack is smcp's exact multiple-choice solver, not HALP's ordered 0/1 DP over neuron
    groups; pruning happens over the recipe's ramp (HALP prunes in its first ~1200 iterations: use
    a short ``ramp_epochs`` for that).

``l1`` (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017):
    * forced: ``importance.type: l1_filter``, ``masking: permanent``, monotone;
    * a class scores the sum, over the conv/linear layers that write it, of the L1 norm of its
      output filter ``||W[o]||_1`` (dense weight);
    * every prunable group keeps the same fraction (:meth:`Allocator.solve_uniform`), the fraction
      found by bisection so the true cost meets the budget;
    * one-shot with ``ramp_epochs: 0`` (pruned before the first training step, then fine-tuned) or
      iterative over the ramp.

``sfp`` (He et al., "Soft Filter Pruning", IJCAI 2018):
    * forced: ``importance.type: l2_filter`` (L2 norm of the producers' output filters),
      ``masking: permanent`` (for the final mask only);
    * nothing is masked during the pruning window; at the end of every window epoch the classes
      with the lowest L2 filter norms at the uniform fraction for the scheduled budget get their
      producers' output filters (conv/linear weight rows and bias) zeroed.  They still take part in
      the forward pass, receive gradient and may regrow; the selection is re-made every epoch;
    * at the end of the last window epoch (the schedule is then at the full target) the selection
      is applied as a hard (permanent) mask; the cooldown epochs fine-tune the pruned model and
      slim removes the pruned channels.  With ``ramp_epochs: 0`` it is one-shot like ``l1``.

``uniform``: the same kept fraction in every prunable group (found by bisection against the true
    cost), channels within a group ranked by the configured importance (Taylor by default);
    masking and schedule as configured (with soft masks channels can come back).

``none``: the reference every comparison needs, the unpruned model fine-tuned with the same
    schedule, data and optimizer (no mask is ever set; the target is ignored).

``snip`` / ``magnitude`` (unstructured, :mod:`smcp_core.prune.unstructured`): ``prune.sparsity`` of the
    conv/linear weights (all of them except ``model.unpruned``) are set to zero once, before the
    first training step, and kept at zero after every optimizer step while the model fine-tunes.
    ``snip`` scores ``|w * dL/dw|`` from one training batch (SNIP, Lee et al., ICLR 2019: decided
    once); ``magnitude`` keeps the globally largest ``|w|`` (one-shot magnitude pruning, Han et al.
    2015).  No channel is removed, so slim and export run the same dense shapes: a dense runtime
    gains no speed, and ``smcp export`` measures and reports exactly that.
"""

from __future__ import annotations

from smcp_core.config.presets import MethodSpec
from smcp_core.errors import SmcpError
from smcp_core.prune import unstructured

FILTER_KINDS = {"l1_filter": 1, "l2_filter": 2}








def filter_norms(masker, p: int):
    """Per class: the sum over the conv/linear layers writing it of ``||W[o]||_p`` of the output
    filter ``o`` (dense weight, all input channels and kernel positions).  Classes written by no
    such layer (the network input, depthwise-only paths) score 0."""
    import torch

    total = torch.zeros(masker.graph.n_classes, device=masker.class_mask.device, dtype=torch.float32)
    with torch.no_grad():
        for mod, _, lout in masker.layers:
            w = masker.dense_weight(mod).detach().float().flatten(1)
            n = w.abs().sum(1) if p == 1 else w.square().sum(1).sqrt()
            total.index_add_(0, lout.to(total.device), n.to(total.device))
    return total


def allocate(alloc, sp: MethodSpec, scores, budget: float, keep_now):
    """One mask update's allocation for method ``sp``."""
    if sp.allocation == "uniform":
        return alloc.solve_uniform(scores, budget, keep_now, monotone=sp.monotone)
    if sp.monotone:
        return alloc.solve(scores, budget, keep_now, monotone=True)
    return alloc.solve(scores, budget, keep_now)


def rezero_pruned_(masker) -> None:
    """Zero every masked (pruned) input-channel slice of the dense weights in place (HALP re-zeroes
    pruned weights after every iteration: the optimizer's momentum would otherwise move them)."""
    import torch

    with torch.no_grad():
        m = masker.class_mask
        for mod, lin, _ in masker.layers:
            w = masker.dense_weight(mod)
            w.mul_(m[lin].view([1, -1] + [1] * (w.dim() - 2)).to(w.dtype))


def zero_filters_(masker, keep) -> int:
    """SFP: zero the output filters (weight rows and bias) of every conv/linear layer writing a
    class that ``keep`` drops; the masks are not touched.  Returns the number of zeroed filters."""
    import torch

    n = 0
    with torch.no_grad():
        k = keep.to(masker.class_mask.device).bool()
        for mod, _, lout in masker.layers:
            dead = ~k[lout.to(k.device)]
            if not bool(dead.any()):
                continue
            w = masker.dense_weight(mod)
            w[dead.to(w.device)] = 0
            b = getattr(mod, "bias", None)
            if b is not None:
                b[dead.to(b.device)] = 0
            n += int(dead.sum())
    return n


def unstructured_masks(method: str, model, sparsity: float, batch, *, exclude=(), label_smoothing: float = 0.0):
    """``{module name: bool mask}`` for ``snip`` (from ``batch``) or ``magnitude`` over every
    conv/linear layer of ``model`` except the names in ``exclude``."""
    import fnmatch

    import torch.nn.functional as F


    layers = [n for n in unstructured.prunable_layers(model)
              if not any(n == e or n.startswith(e + ".") or fnmatch.fnmatchcase(n, e) for e in exclude)]
    if not layers:

        raise SmcpError(f"prune.method {method}: every conv/linear layer is in model.unpruned; nothing to prune")
    if method == "snip":
        return unstructured.snip_masks(model, lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing),
                            batch, sparsity, layers=layers)
    return unstructured.magnitude_masks(model, sparsity, layers=layers)


class WeightZeroer:
    """Keeps the masked-out weights of an unstructured mask at exactly zero: call after every
    optimizer step (momentum and weight decay would move them otherwise).  Works on the dense
    weight under smcp's channel-mask parametrisation as well as on a plain ``weight``."""

    def __init__(self, model, masks, device) -> None:
        self.items = []
        for name, m in masks.items():
            mod = model.get_submodule(name)
            self.items.append((mod, m.to(device=device)))

    @staticmethod
    def _weight(mod):
        par = getattr(mod, "parametrizations", None)
        return par.weight.original if par is not None and "weight" in par else mod.weight

    def __call__(self) -> None:
        import torch

        with torch.no_grad():
            for mod, m in self.items:
                w = self._weight(mod)
                w.mul_(m.to(w.dtype))
