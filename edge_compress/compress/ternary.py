"""Ternary weights (TWN: Li & Liu, "Ternary weight networks", 2016, arXiv:1605.04711; survey family 4).

``ternarize(model, TernaryConfig(...))`` replaces selected ``Conv2d``/``Linear`` layers in
place by ``TernaryConv2d``/``TernaryLinear``, whose weights are, per output channel,

    delta = threshold * mean|W|               (TWN's approximation of the optimal threshold, 0.7)
    alpha = mean of |W| over {|W| > delta}    (the optimal scale given delta)
    W_t   = alpha * sign(W) * [|W| > delta]   in {-alpha, 0, +alpha}

with a straight-through gradient to the latent float ``W`` (TWN trains the float weights and
ternarises in every forward). Activations stay float. The paper takes delta and alpha per
layer; per output channel (as here) fits the per-channel scales the int8 paths already use
and loses less. Ternary weights take 2 bits each (plus one float32 alpha per channel),
which is the size the report gives; the kernels here run them as float, so there is no
speed claim.

Default layers: every ``Conv2d``/``Linear`` except the head's output convs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edge_compress.compress.layers import check_names, choose_layers, weight_layers
from edge_compress.compress.ste import FrozenWeight, float_bytes, layer_bytes, ste
from edge_compress.errors import ConfigError, require_known_keys

BITS = 2


@dataclass(frozen=True)
class TernaryConfig:
    """``threshold``: delta as a fraction of mean|W| per output channel, in (0, 1.5) (TWN: 0.7);
    ``layers``: ``named_modules()`` names (empty: every Conv2d/Linear but the head's output convs)."""

    threshold: float = 0.7
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            raise ConfigError(f"ternary.layers='{self.layers}' must be a list of layer names, not one string")
        object.__setattr__(self, "layers", tuple(self.layers))
        if not 0.0 < float(self.threshold) < 1.5:
            raise ConfigError(f"ternary.threshold={self.threshold} is outside (0, 1.5): delta = threshold * mean|W| "
                              "per output channel; TWN uses 0.7 (larger zeroes more weights)")

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> "TernaryConfig":
        require_known_keys(cls, d, what="ternary setting", source=source)
        return cls(**d)


def ternary_weight(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """TWN's ternarisation of ``w`` per output channel (dim 0); see the module docstring."""
    flat = w.reshape(w.shape[0], -1)
    a = flat.abs()
    delta = threshold * a.mean(dim=1, keepdim=True)
    keep = a > delta
    alpha = (a * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1)
    return (torch.where(flat >= 0, alpha, -alpha) * keep).reshape(w.shape)


class _Ternary(FrozenWeight):
    threshold: float

    def effective_weight(self) -> torch.Tensor:
        return ste(ternary_weight(self.weight, self.threshold), self.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


class TernaryConv2d(_Ternary, nn.Conv2d):
    """A ``Conv2d`` computing with TWN ternary weights (state_dict: the latent float weight and bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.layer_weight(), self.bias)


class TernaryLinear(_Ternary, nn.Linear):
    """A ``Linear`` computing with TWN ternary weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.layer_weight(), self.bias)


def make_ternary(layer: nn.Module, threshold: float) -> None:
    """Turn ``layer`` into its ternary twin in place: same object, parameters and state_dict keys
    (an optimizer holding its parameters keeps working); only the class and ``threshold`` change."""
    if type(layer) not in (nn.Conv2d, nn.Linear):
        raise ConfigError(f"cannot ternarise a {type(layer).__name__}: only plain Conv2d/Linear layers")
    layer.__class__ = TernaryConv2d if isinstance(layer, nn.Conv2d) else TernaryLinear
    layer.threshold = float(threshold)


@dataclass(frozen=True)
class TernaryLayer:
    name: str
    weights: int
    out_channels: int
    zeros: int                       # weights ternarised to 0


@dataclass(frozen=True)
class TernaryReport:
    """Ternarised layers and the size by this method's accounting: 2 bits per ternary weight +
    one float32 alpha per output channel (+ bias), every other parameter and buffer float32."""

    threshold: float
    layers: tuple[TernaryLayer, ...]
    skipped: dict[str, str]
    bytes_fp32: int
    bytes_compressed: int
    plan: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "ternary", "threshold": self.threshold, "bits_per_weight": BITS,
                "bytes_fp32": self.bytes_fp32, "bytes_compressed": self.bytes_compressed,
                "size_ratio": self.bytes_compressed / max(self.bytes_fp32, 1), "skipped": dict(self.skipped),
                "layers": {x.name: {"weights": x.weights, "out_channels": x.out_channels, "zeros": x.zeros}
                           for x in self.layers},
                "plan": self.plan}


def restructure(model: nn.Module, plan: dict[str, Any]) -> None:
    """Swap the layers named in ``plan["layers"]`` for their ternary twins (threshold from the plan)."""
    layers = weight_layers(model)
    check_names(plan["layers"], layers, "ternary plan")
    for name, entry in plan["layers"].items():
        make_ternary(layers[name], entry["threshold"])


def ternarize(model: nn.Module, config: TernaryConfig) -> TernaryReport:
    """Ternarise the selected layers in place; returns the report."""
    _, chosen, skipped = choose_layers(model, config.layers, (), ("ternary.layers", "ternary.layers"),
                                       "kept float")
    bytes_fp32 = float_bytes(model)
    layers = weight_layers(model)
    plan = {"method": "ternary", "layers": {n: {"replaced_by": f"Ternary{type(layers[n]).__name__}",
                                                "threshold": config.threshold} for n in chosen}}
    restructure(model, plan)
    layers = weight_layers(model)
    rows = []
    for n in chosen:
        w = layers[n].frozen_weight()
        rows.append(TernaryLayer(n, w.numel(), w.shape[0], int((w == 0).sum())))
    compressed = float_bytes(model, chosen) + sum(layer_bytes(layers[n], BITS, layers[n].weight.shape[0])
                                                  for n in chosen)
    return TernaryReport(config.threshold, tuple(rows), skipped, bytes_fp32, compressed, plan)
