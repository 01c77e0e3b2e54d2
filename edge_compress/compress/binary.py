"""Binary convs (XNOR-Net, Rastegari et al., ECCV 2016, arXiv:1603.05279; survey family 4).

``binarize(model, BinaryConfig(...))`` replaces selected ``Conv2d`` layers in place by
``BinaryConv2d``:

* input activation binarised, ``torch.where(x >= 0, 1.0, -1.0)``, with the clipped
  straight-through gradient ``grad * (|x| <= 1)`` (Hubara et al. 2016);
* padding done explicitly with ``F.pad(value=1.0)`` and the conv at padding 0: a
  sign bit has no zero, so a padded tap is +1 (the numba XNOR-popcount kernel,
  ``edge_compress.kernels.binary``, pads the same way). The exported ONNX graph of a
  binary layer is exactly ``Where(GreaterOrEqual(x, 0), 1, -1) -> Pad(constant 1.0)
  -> Conv(pads 0)``, the pattern the binary lowering reads;
* weights ``sign(W) * alpha[out]``, ``alpha`` = mean ``|W|`` over the filter (XNOR-Net
  eq. 4), straight-through gradient to the latent float ``W``. The following
  BatchNorm stays and folds into a per-channel scale and bias at export.

Not done: XNOR-Net's activation scaling ``K`` (the mean ``|x|`` map); the per-channel
``alpha`` and BatchNorm carry the scale. A binarised input is only informative when the
conv's input can be negative: after a ReLU/ReLU6 it is all +1, so the report records,
per layer, the fraction of +1 inputs on a probe forward (1.0 = the layer sees a constant).

Default layers: the backbone's (``backbone.*``) dense convs (``groups == 1``) except
the first conv on the image (the stem: 3 input channels, where binarising costs the
most accuracy for the least size); the head's output convs are never binarised.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_compress.compress.layers import check_names, get_parent, output_layers, weight_layers
from edge_compress.compress.ste import FrozenWeight, binary_activation, float_bytes, layer_bytes, sign, ste
from edge_compress.errors import ConfigError, require_known_keys

BACKBONE = "backbone."


@dataclass(frozen=True)
class BinaryConfig:
    """``layers``: the convs to binarise (empty: the default set, see the module docstring);
    ``keep``: convs of the default set left in float. Names are ``named_modules()`` names;
    a name matching no layer is an error when the config is applied."""

    layers: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):
                raise ConfigError(f"binary.{f.name}='{value}' must be a list of layer names, not one string")
            object.__setattr__(self, f.name, tuple(value))
        if self.layers and self.keep:
            raise ConfigError("binary.layers and binary.keep are both set: `keep` only trims the default set; "
                              "list exactly the layers to binarise in `layers` instead")

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "keep": list(self.keep)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> "BinaryConfig":
        require_known_keys(cls, d, what="binary setting", source=source)
        return cls(**d)


class BinaryConv2d(FrozenWeight, nn.Conv2d):
    """A ``Conv2d`` on sign inputs with ``sign(W) * alpha`` weights and +1 padding (see the module
    docstring). The state_dict is the Conv2d's (latent float ``weight``, ``bias``); the original
    zero padding becomes ``one_padding`` and the conv itself runs at padding 0. Inference and
    export use the cached ``frozen_weight()`` (see ``FrozenWeight``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, 1, bias)
        self.one_padding = tuple(int(p) for p in nn.modules.utils._pair(padding))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "BinaryConv2d":
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.bias is not None).to(conv.weight.device)
        with torch.no_grad():
            m.weight.copy_(conv.weight)
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
        m.train(conv.training)
        return m

    def alpha(self) -> torch.Tensor:
        """XNOR-Net's per-output-channel scale: mean ``|W|`` over each filter, shape ``(OC,)``."""
        return self.weight.abs().mean(dim=(1, 2, 3))

    def effective_weight(self) -> torch.Tensor:
        """``sign(W) * alpha[out]`` in the forward, the identity's gradient to ``W`` in the backward."""
        return ste(sign(self.weight) * self.alpha().view(-1, 1, 1, 1), self.weight)

    binary_weight = effective_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = binary_activation(x)
        ph, pw = self.one_padding
        if ph or pw:
            # all four dims given: the exporter then writes one Pad with constant pads (with two,
            # it builds them with ConstantOfShape, which onnxscript's optimizer does not fold)
            xb = F.pad(xb, (pw, pw, ph, ph, 0, 0, 0, 0), value=1.0)
        return F.conv2d(xb, self.layer_weight(), self.bias, self.stride, 0, self.dilation, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, one_padding={self.one_padding}"


@dataclass(frozen=True)
class BinaryLayer:
    name: str
    weights: int                     # binarised weights (1 bit each)
    out_channels: int                # float32 alphas
    input_plus_fraction: float       # share of +1 in the sign input on the probe forward


@dataclass(frozen=True)
class BinaryReport:
    """Replaced layers, skipped ones with the reason, and the size by this method's accounting:
    1 bit per binarised weight + one float32 alpha per output channel (+ bias), every other
    parameter and buffer float32."""

    layers: tuple[BinaryLayer, ...]
    skipped: dict[str, str]
    bytes_fp32: int
    bytes_compressed: int
    plan: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "binary", "bytes_fp32": self.bytes_fp32, "bytes_compressed": self.bytes_compressed,
                "size_ratio": self.bytes_compressed / max(self.bytes_fp32, 1), "skipped": dict(self.skipped),
                "layers": {x.name: {"weights": x.weights, "out_channels": x.out_channels,
                                    "input_plus_fraction": x.input_plus_fraction} for x in self.layers},
                "plan": self.plan}


def first_conv(model: nn.Module) -> str | None:
    """Name of the first Conv2d that runs on the image (the stem), found by a forward."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: order.append(name))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        _probe(model)
    finally:
        for h in hooks:
            h.remove()
    return order[0] if order else None


def _probe(model: nn.Module) -> None:
    """One eval forward on a seeded uniform [0, 1) image (the export check's input)."""
    spec = model.input_spec
    x = torch.from_numpy(np.random.default_rng(0).random((1, spec.channels, spec.height, spec.width),
                                                         dtype=np.float32))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)


def select_layers(model: nn.Module, config: BinaryConfig) -> tuple[list[str], dict[str, str]]:
    """The convs to binarise and the default-set candidates left float (name -> reason)."""
    layers = weight_layers(model)
    check_names(config.layers, layers, "binary.layers")
    check_names(config.keep, layers, "binary.keep")
    heads = output_layers(model)
    if config.layers:
        for name in config.layers:
            _check_binarisable(name, layers[name], heads)
        return list(config.layers), {}
    stem = first_conv(model)
    skipped: dict[str, str] = {}
    chosen = []
    for name, m in layers.items():
        why = _default_skip_reason(name, m, heads, stem, config.keep)
        if why:
            skipped[name] = why
        else:
            chosen.append(name)
    return chosen, skipped


def _default_skip_reason(name: str, m: nn.Module, heads: set[str], stem: str | None, keep) -> str | None:
    if name in heads:
        return "head output conv (never binarised)"
    if not name.startswith(BACKBONE):
        return "not in the backbone (binary covers the backbone by default)"
    if name == stem:
        return "first conv on the image (stem kept float by default)"
    if not isinstance(m, nn.Conv2d):
        return "not a Conv2d"
    if m.groups != 1:
        return f"grouped/depthwise conv (groups={m.groups}); XNOR convs are dense"
    if isinstance(m.padding, str) or m.padding_mode != "zeros":
        return f"padding {m.padding!r} / padding_mode '{m.padding_mode}' (+1 padding replaces numeric zero padding)"
    if name in keep:
        return "kept float by binary.keep"
    return None


def _check_binarisable(name: str, m: nn.Module, heads: set[str]) -> None:
    if name in heads:
        raise ConfigError(f"binary.layers names '{name}', a head output conv: the outputs that carry logits and "
                          "box offsets are never binarised; leave it out")
    if type(m) is not nn.Conv2d:
        raise ConfigError(f"binary.layers names '{name}', a {type(m).__name__}: only plain Conv2d layers can be "
                          "binarised; leave it out")
    if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise ConfigError(f"binary.layers names '{name}' (groups={m.groups}, padding={m.padding!r}, "
                          f"padding_mode='{m.padding_mode}'): XNOR convs need groups=1 and numeric zero padding "
                          "(replaced by +1 padding); leave it out")


def restructure(model: nn.Module, plan: dict[str, Any]) -> None:
    """Replace the convs named in ``plan["layers"]`` by ``BinaryConv2d`` (weights are whatever the
    fresh model holds; load the compressed model's state_dict afterwards)."""
    layers = weight_layers(model)
    check_names(plan["layers"], layers, "binary plan")
    for name in plan["layers"]:
        parent, attr = get_parent(model, name)
        setattr(parent, attr, BinaryConv2d.from_conv(layers[name]))


def binarize(model: nn.Module, config: BinaryConfig) -> BinaryReport:
    """Replace the selected convs by ``BinaryConv2d`` in place; returns the report."""
    chosen, skipped = select_layers(model, config)
    bytes_fp32 = float_bytes(model)
    plan = {"method": "binary", "layers": {name: {"replaced_by": "BinaryConv2d", "one_padding": list(
        nn.modules.utils._pair(weight_layers(model)[name].padding))} for name in chosen}}
    restructure(model, plan)
    plus = _input_plus_fractions(model, chosen)
    layers = weight_layers(model)
    rows = tuple(BinaryLayer(n, layers[n].weight.numel(), layers[n].out_channels, plus[n]) for n in chosen)
    compressed = float_bytes(model, chosen) + sum(layer_bytes(layers[n], 1, layers[n].out_channels) for n in chosen)
    return BinaryReport(rows, skipped, bytes_fp32, compressed, plan)


def _input_plus_fractions(model: nn.Module, names: list[str]) -> dict[str, float]:
    seen: dict[str, float] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:   # returns None: a hook's value would replace the output
            seen.setdefault(name, float((inputs[0] >= 0).float().mean()))
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        _probe(model)
    finally:
        for h in hooks:
            h.remove()
    return {n: seen.get(n, float("nan")) for n in names}
