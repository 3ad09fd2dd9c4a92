"""Shape signatures of prunable layers, shared by the channel graph and the cost model."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LayerSig:
    """Everything that determines the latency of one conv/linear layer except its channel counts.

    ``cin``/``cout`` are the *full* (unpruned) widths; a latency table is measured over a grid of
    ``cin' <= cin`` and ``cout' <= cout``.  For a depthwise conv (``depthwise=True``) the latency is a
    function of one width ``c`` (``cin == cout == groups == c``).  A grouped conv whose groups have
    ``group_size`` input and ``group_size`` output channels each (ResNeXt, RegNet) is the same kind of
    "channel-wise" layer at a coarser grain: ``depthwise=True``, ``cin == cout == c`` and
    ``groups == c // group_size`` (pruning removes whole groups, so ``group_size`` is fixed and only
    ``c`` varies).  Plain depthwise convs have ``group_size == 1``.
    """

    kind: str  # "conv" or "linear"
    cin: int
    cout: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    depthwise: bool = False
    in_hw: tuple[int, int] = (1, 1)  # input spatial size; (1, 1) for linear
    bias: bool = False
    group_size: int = 1  # channels per group of a grouped (depthwise=True) conv; 1 = depthwise

    def key(self) -> str:
        """A stable string key (without channel counts) used in latency tables."""
        k, s, p, d, hw = self.kernel, self.stride, self.padding, self.dilation, self.in_hw
        return (
            f"{self.kind}{'-dw' if self.depthwise else ''}"
            f"{f'-gs{self.group_size}' if self.group_size != 1 else ''}"
            f"_k{k[0]}x{k[1]}_s{s[0]}x{s[1]}_p{p[0]}x{p[1]}_d{d[0]}x{d[1]}"
            f"_hw{hw[0]}x{hw[1]}_b{int(self.bias)}"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LayerSig:
        d = dict(d)
        for f in ("kernel", "stride", "padding", "dilation", "in_hw"):
            if f in d:
                d[f] = tuple(d[f])
        return cls(**d)

    @property
    def out_hw(self) -> tuple[int, int]:
        """The output's spatial size (a conv's; ``(1, 1)`` for a linear layer's ``in_hw``)."""
        h, w = self.in_hw
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        return oh, ow

    def flops(self, cin: int | None = None, cout: int | None = None) -> int:
        """Multiply-accumulates of one sample at the given widths (defaults: full widths)."""
        cin = self.cin if cin is None else cin
        cout = self.cout if cout is None else cout
        if self.kind == "linear":
            return cin * cout
        oh, ow = self.out_hw
        per_out = self.kernel[0] * self.kernel[1] * (self.group_size if self.depthwise else cin)
        return per_out * cout * oh * ow
