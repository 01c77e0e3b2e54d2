"""Model summary: parameters, MACs and FLOPs per layer and in total.

Counting convention (the survey's): a convolution costs
``MACs = OC * OH * OW * KH * KW * IC / groups`` and ``FLOPs = 2 * MACs``; a
linear layer ``MACs = in * out`` per sample. Only conv and linear layers are
counted: BatchNorm folds into the preceding conv at inference and activations,
adds and pooling are memory-bound and negligible in FLOPs, as in the tables of
the survey and the usual counters (thop, fvcore).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class LayerStats:
    name: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    macs: int

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclass(frozen=True)
class ModelSummary:
    name: str
    input_shape: tuple[int, ...]
    layers: tuple[LayerStats, ...]
    params: int                       # every parameter of the model (storage)
    extra: dict = field(default_factory=dict)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def _layer_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """MACs for ONE image of the batch."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        oc, oh, ow = out.shape[1], out.shape[2], out.shape[3]
        return oc * oh * ow * kh * kw * module.in_channels // module.groups
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features * (out.numel() // out.shape[-1] // out.shape[0])
    return 0


def summarize(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> ModelSummary:
    """Run one batch-1 forward with hooks on every conv/linear layer.

    ``input_shape`` defaults to ``(1, 3, H, W)`` of the detector's ``input_spec``.
    """
    if input_shape is None:
        spec = model.input_spec
        input_shape = (1, spec.channels, spec.height, spec.width)
    rows: list[LayerStats] = []
    hooks = []

    def hook(name):
        def fn(module, inputs, output):
            rows.append(LayerStats(
                name, type(module).__name__, tuple(inputs[0].shape), tuple(output.shape),
                sum(p.numel() for p in module.parameters(recurse=False)),
                _layer_macs(module, inputs[0], output)))
        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return ModelSummary(getattr(model, "name", type(model).__name__), tuple(input_shape), tuple(rows), params)
