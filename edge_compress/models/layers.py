"""Building blocks shared by the zoo families.

Every conv is followed by BatchNorm and an activation in one ``ConvBNAct`` so
that later passes (BN folding, channel pruning, lowering) see one uniform
pattern: ``<block>.conv`` / ``<block>.bn`` / ``<block>.act``.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky": lambda: nn.LeakyReLU(0.1),
    "hswish": nn.Hardswish,
    "silu": nn.SiLU,
    "none": nn.Identity,
}


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a scaled channel count to a multiple of ``divisor`` (MobileNet convention),
    never dropping more than 10% below ``v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1, groups: int = 1, act: str = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = ACTIVATIONS[act]()


class DWSeparable(nn.Sequential):
    """Depthwise kxk + pointwise 1x1 (MobileNetV1 / SSDLite heads)."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1, act: str = "relu6"):
        super().__init__()
        self.dw = ConvBNAct(c_in, c_in, k, s, groups=c_in, act=act)
        self.pw = ConvBNAct(c_in, c_out, 1, 1, act=act)


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu 2018) with a hard-sigmoid gate (MobileNetV3 / ESNet)."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        mid = make_divisible(c / reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, mid, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(mid, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


def flatten_head(x: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """(N, A*K, H, W) conv output -> (N, H*W*A, K) in y -> x -> anchor order (the
    prior order of :func:`edge_compress.models.postprocess.make_priors`)."""
    n, ak, h, w = x.shape
    k = ak // num_anchors
    return x.view(n, num_anchors, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * num_anchors, k)
