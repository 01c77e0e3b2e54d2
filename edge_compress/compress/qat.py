"""Quantization-aware training (survey family 4): fake quantization with straight-through
gradients, exported as the same int8 artifacts as post-training quantization.

Jacob et al., "Quantization and training of neural networks for efficient integer-arithmetic-
only inference" (CVPR 2018), and Krishnamoorthi, "Quantizing deep convolutional networks for
efficient inference" (2018):

* ``prepare_qat(model, QATConfig(...))`` folds every ``Conv2d -> BatchNorm2d`` pair (consecutive
  children of an ``nn.Sequential``, the zoo's ``ConvBNAct``) into one conv with the BN's
  running statistics (BN frozen, Krishnamoorthi sec. 3.2: the deployed graph has no BN either)
  and turns each selected conv into a ``QATConv2d``: weights fake-quantized symmetric per
  output channel (``scale = max|w| / (2^(b-1) - 1)``, levels ``-qmax..qmax``, ORT's int8
  weight grid at 8 bits), its input fake-quantized asymmetric per tensor on a range learned
  as an exponential moving average of the batch min/max (Jacob et al. sec. 3.1; not LSQ's
  learned scale: an EMA range is what a calibration table holds). Gradients pass straight
  through inside the range and are zero outside (``torch.fake_quantize_*``).
  Mixed precision: ``per_layer_bits[name]`` sets a layer's *weight* bits (2..8).
* ``qat_calibration(model, fp32_onnx_path, images)`` turns the learned input ranges into the
  ``CalibrationTable`` of the converted model's fp32 ONNX graph: torch (hooks on each
  ``QATConv2d`` input, activation fake-quant off) and ONNX Runtime (every float tensor) run the
  same images and a quantizer's range goes to the ONNX tensor(s) of the same shape and values
  (max abs difference <= 1e-4 of the tensor's max); every other tensor keeps the range of our
  post-training calibrator. The matched fraction is in ``table.notes``.
* ``convert_qat(model)`` bakes the fake-quantized weights into plain ``Conv2d`` layers, so
  ``export_model(model, backend, out, quant=QuantConfig(...), calibration=table)`` writes the
  same kind of int8 artifact as PTQ, with QAT's weights and activation scales.

Head output convs stay fp32 unless ``quantize_outputs`` (as in PTQ, ``edge_compress.quant.qdq``).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from edge_compress.compress.layers import check_names, get_parent, output_layers, weight_layers
from edge_compress.compress.ste import float_bytes, layer_bytes
from edge_compress.errors import ConfigError, require_known_keys
from edge_compress.quant import CalibrationTable, QuantConfig

MIN_BITS, MAX_BITS = 2, 8
MATCH_IMAGES = 2          # images both runtimes see to pair quantizers with ONNX tensors
MATCH_RTOL = 1e-4         # max|torch - onnx| <= MATCH_RTOL * max|onnx|
SCALE_EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class QATConfig:
    """What to fake-quantize. ``layers``: the convs (empty: every Conv2d but the head's output
    convs, which ``quantize_outputs`` adds); ``keep_fp32`` trims that set; ``per_layer_bits``:
    weight bits per layer (mixed precision). Names are ``named_modules()`` names; a name
    matching no layer is an error when the config is applied. ``ema``: the range's averaging
    constant per training step."""

    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    layers: tuple[str, ...] = ()
    keep_fp32: tuple[str, ...] = ()
    per_layer_bits: dict[str, int] | None = None
    quantize_outputs: bool = False
    ema: float = 0.01

    def __post_init__(self) -> None:
        _check_bits("qat.weight_bits", self.weight_bits)
        _check_bits("qat.act_bits", self.act_bits)
        for name in ("layers", "keep_fp32"):
            if isinstance(getattr(self, name), str):
                raise ConfigError(f"qat.{name}='{getattr(self, name)}' must be a list of layer names, not one string")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.per_layer_bits is not None:
            object.__setattr__(self, "per_layer_bits", dict(self.per_layer_bits))
            for name, bits in self.per_layer_bits.items():
                _check_bits(f"qat.per_layer_bits['{name}']", bits)
        if not 0.0 < float(self.ema) <= 1.0:
            raise ConfigError(f"qat.ema={self.ema} is outside (0, 1]: the weight of a new batch's min/max in the "
                              "moving-average range (0.01 is usual)")

    def __hash__(self) -> int:   # per_layer_bits is a dict: hash its items
        per = tuple(sorted(self.per_layer_bits.items())) if self.per_layer_bits is not None else None
        return hash((self.weight_bits, self.act_bits, self.per_channel, self.layers, self.keep_fp32, per,
                     self.quantize_outputs, self.ema))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["layers"], d["keep_fp32"] = list(self.layers), list(self.keep_fp32)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> "QATConfig":
        require_known_keys(cls, d, what="qat setting", source=source)
        return cls(**d)


def _check_bits(what: str, bits) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"{what}={bits!r} must be an integer in {MIN_BITS}..{MAX_BITS} (8 = int8; fewer bits "
                          "for mixed precision)")


# ---- fake quantizers ----

def fake_quant_weight(w: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """Symmetric fake quantization of a conv weight: per output channel (dim 0) or per tensor,
    ``scale = max|w| / qmax``, integers in ``[-qmax, qmax]``, ``qmax = 2^(bits-1) - 1``."""
    qmax = 2 ** (bits - 1) - 1
    if per_channel:
        scale = (w.detach().abs().amax(dim=tuple(range(1, w.dim()))) / qmax).clamp_min(SCALE_EPS)
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, -qmax, qmax)
    scale = (w.detach().abs().max() / qmax).clamp_min(SCALE_EPS).reshape(1).float()
    return torch.fake_quantize_per_tensor_affine(w, scale, torch.zeros(1, dtype=torch.int32, device=w.device),
                                                 -qmax, qmax)


class ActivationFakeQuant(nn.Module):
    """Asymmetric per-tensor fake quantization on an EMA min/max range (``lo <= 0 <= hi`` when
    quantizing, so 0 is exact). Training forwards update the range (the first one sets it);
    before any training forward, and while ``enabled`` is off, it passes values through."""

    def __init__(self, bits: int = 8, ema: float = 0.01):
        super().__init__()
        self.bits, self.ema, self.enabled = int(bits), float(ema), True
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool))

    def quant_range(self) -> tuple[float, float]:
        """The range the quantizer uses, widened to contain 0 (the calibration table's convention)."""
        return min(float(self.lo), 0.0), max(float(self.hi), 0.0)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        lo, hi = x.min().to(self.lo.dtype), x.max().to(self.hi.dtype)
        if not bool(self.observed):
            self.lo.copy_(lo), self.hi.copy_(hi), self.observed.fill_(True)
        else:
            self.lo.add_(self.ema * (lo - self.lo)), self.hi.add_(self.ema * (hi - self.hi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.enabled:
            self.observe(x)
        if not (self.enabled and bool(self.observed)):
            return x
        qmax = 2 ** self.bits - 1
        lo, hi = torch.clamp(self.lo, max=0.0), torch.clamp(self.hi, min=0.0)
        scale = ((hi - lo) / qmax).clamp_min(SCALE_EPS).reshape(1).float()
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32).reshape(1)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ema={self.ema}"


class QATConv2d(nn.Conv2d):
    """A ``Conv2d`` computing on fake-quantized inputs (``act_quant``) and weights; the state_dict
    is the conv's plus ``act_quant.{lo,hi,observed}``."""

    weight_bits: int
    per_channel: bool
    act_quant: ActivationFakeQuant

    def quantized_weight(self) -> torch.Tensor:
        return fake_quant_weight(self.weight, self.weight_bits, self.per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quant(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}, per_channel={self.per_channel}"


def make_qat(conv: nn.Module, weight_bits: int, act_bits: int, per_channel: bool, ema: float) -> None:
    """Turn ``conv`` into a ``QATConv2d`` in place (same object and parameters)."""
    if type(conv) is not nn.Conv2d:
        raise ConfigError(f"QAT wraps plain Conv2d layers, not {type(conv).__name__}")
    conv.__class__ = QATConv2d
    conv.weight_bits, conv.per_channel = int(weight_bits), bool(per_channel)
    conv.act_quant = ActivationFakeQuant(act_bits, ema).to(conv.weight.device)


# ---- BatchNorm folding ----

def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` names where a BatchNorm2d directly follows a Conv2d of matching width in an
    ``nn.Sequential`` (so the conv's output feeds only the BN)."""
    pairs = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (a, conv), (b, bn) in zip(children, children[1:]):
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels:
                prefix = f"{seq_name}." if seq_name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``conv`` <- ``bn(conv(x))`` with the BN's running statistics: ``w * s``, ``(b - mean) * s + beta``
    per output channel, ``s = gamma / sqrt(var + eps)`` (computed in float64)."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
    conv.weight.copy_((conv.weight.double() * s.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    new_bias = ((bias - mean) * s + beta).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def fold_pairs(model: nn.Module, pairs: Sequence[Sequence[str]], fold_weights: bool) -> None:
    """Fold each ``(conv, bn)`` pair (``fold_weights``) or only give it the folded structure (a conv
    bias, the BN replaced by ``Identity``: ``restructure`` on placeholder weights)."""
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not isinstance(bn, nn.BatchNorm2d):
            raise ConfigError(f"'{bn_name}' is a {type(bn).__name__}, not the BatchNorm2d to fold into '{conv_name}'")
        if fold_weights:
            fold_bn(conv, bn)
        elif conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                 device=conv.weight.device))
        parent, attr = get_parent(model, bn_name)
        setattr(parent, attr, nn.Identity())


# ---- prepare ----

@dataclass(frozen=True)
class QATLayer:
    name: str
    weight_bits: int
    act_bits: int
    weights: int
    out_channels: int


@dataclass(frozen=True)
class QATReport:
    """Folded pairs, fake-quantized layers and the size by this method's accounting: ``weight_bits``
    per weight (8 = 1 byte) + one float32 scale per output channel (per tensor: one) + bias,
    every other parameter and buffer float32."""

    folded: tuple[tuple[str, str], ...]
    layers: tuple[QATLayer, ...]
    skipped: dict[str, str]
    bytes_fp32: int
    bytes_compressed: int
    plan: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "qat", "bytes_fp32": self.bytes_fp32, "bytes_compressed": self.bytes_compressed,
                "size_ratio": self.bytes_compressed / max(self.bytes_fp32, 1), "skipped": dict(self.skipped),
                "folded": [list(p) for p in self.folded],
                "layers": {x.name: {"weight_bits": x.weight_bits, "act_bits": x.act_bits, "weights": x.weights}
                           for x in self.layers},
                "plan": self.plan}


def select_layers(model: nn.Module, config: QATConfig) -> tuple[list[str], dict[str, str]]:
    """The convs to fake-quantize and the Conv2d layers left fp32 (name -> reason)."""
    layers = weight_layers(model)
    per = config.per_layer_bits or {}
    for what, names in (("qat.layers", config.layers), ("qat.keep_fp32", config.keep_fp32),
                        ("qat.per_layer_bits", per)):
        check_names(names, layers, what)
    convs = [n for n, m in layers.items() if type(m) is nn.Conv2d]
    heads = set() if config.quantize_outputs or config.layers else output_layers(model)
    skipped = {n: "not a plain Conv2d (QAT wraps convs)" for n in layers if n not in convs}
    skipped.update({n: "head output conv (fp32 unless quantize_outputs)" for n in heads})
    skipped.update({n: "kept fp32 by qat.keep_fp32" for n in config.keep_fp32})
    chosen = [n for n in (config.layers or convs) if n not in skipped]
    bad = [n for n in config.layers if n in skipped]
    if bad:
        raise ConfigError(f"qat.layers names {bad}: {[skipped[n] for n in bad]}; leave them out")
    unused = sorted(set(per) - set(chosen))
    if unused:
        raise ConfigError(f"qat.per_layer_bits sets bits for {unused}, which stay fp32 "
                          f"({[skipped.get(n, 'not selected') for n in unused]}); drop them or select them")
    return chosen, skipped


def restructure(model: nn.Module, plan: dict[str, Any]) -> None:
    """Fold-structure (conv with a bias, BN -> Identity) and QAT wrappers as in ``plan``, on a fresh
    detector with placeholder weights (weights are not folded; load the state_dict afterwards)."""
    fold_pairs(model, plan["folded"], fold_weights=False)
    model._qat_folded = [list(p) for p in plan["folded"]]
    layers = weight_layers(model)
    check_names(plan["layers"], layers, "qat plan")
    for name, e in plan["layers"].items():
        make_qat(layers[name], e["weight_bits"], e["act_bits"], e["per_channel"], e["ema"])


def prepare_qat(model: nn.Module, config: QATConfig) -> QATReport:
    """Fold BatchNorms and fake-quantize the selected convs in place; returns the report."""
    chosen, skipped = select_layers(model, config)   # names are checked before anything changes
    bytes_fp32 = float_bytes(model)
    pairs = conv_bn_pairs(model)
    fold_pairs(model, pairs, fold_weights=True)
    model._qat_folded = [list(p) for p in pairs]     # for convert_qat's plan
    per = config.per_layer_bits or {}
    plan = {"method": "qat", "stage": "prepared", "folded": [list(p) for p in pairs], "layers": {
        n: {"wrapped_by": "QATConv2d", "weight_bits": per.get(n, config.weight_bits), "act_bits": config.act_bits,
            "per_channel": config.per_channel, "ema": config.ema} for n in chosen}}
    layers = weight_layers(model)
    for name, e in plan["layers"].items():
        make_qat(layers[name], e["weight_bits"], e["act_bits"], e["per_channel"], e["ema"])
    rows = tuple(QATLayer(n, e["weight_bits"], e["act_bits"], layers[n].weight.numel(), layers[n].out_channels)
                 for n, e in plan["layers"].items())
    scales = {r.name: r.out_channels if config.per_channel else 1 for r in rows}
    compressed = float_bytes(model, chosen) + sum(layer_bytes(layers[r.name], r.weight_bits, scales[r.name])
                                                  for r in rows)
    return QATReport(tuple(tuple(p) for p in pairs), rows, skipped, bytes_fp32, compressed, plan)


# ---- convert and calibrate ----

def qat_layers(model: nn.Module) -> dict[str, QATConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATConv2d)}


def learned_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """QAT conv name -> the input range its quantizer learned (``lo <= 0 <= hi``); layers whose
    quantizer never saw a training forward are left out."""
    return {n: m.act_quant.quant_range() for n, m in qat_layers(model).items() if bool(m.act_quant.observed)}


@dataclass(frozen=True)
class QATConversion:
    ranges: dict[str, tuple[float, float]]      # conv name -> learned input range
    plan: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"method": "qat", "ranges": {k: list(v) for k, v in self.ranges.items()}, "plan": self.plan}


def convert_qat(model: nn.Module) -> QATConversion:
    """Bake each ``QATConv2d``'s fake-quantized weight into a plain ``Conv2d`` in place (the model
    then exports like any detector); returns the learned input ranges and the converted plan."""
    layers = qat_layers(model)
    if not layers:
        raise ConfigError("convert_qat found no QATConv2d: run prepare_qat (and fine-tune) first")
    ranges = learned_ranges(model)
    folded = [list(p) for p in getattr(model, "_qat_folded", [])]
    with torch.no_grad():
        for m in layers.values():
            m.weight.copy_(m.quantized_weight())
            del m._modules["act_quant"]
            m.__class__ = nn.Conv2d
            for attr in ("weight_bits", "per_channel"):
                m.__dict__.pop(attr, None)
    return QATConversion(ranges, {"method": "qat", "stage": "converted", "folded": folded, "layers": {}})


@contextlib.contextmanager
def activation_quant_off(model: nn.Module) -> Iterator[None]:
    """Every ``ActivationFakeQuant`` passes values through (and learns nothing) inside the block."""
    quants = [m for m in model.modules() if isinstance(m, ActivationFakeQuant)]
    before = [q.enabled for q in quants]
    for q in quants:
        q.enabled = False
    try:
        yield
    finally:
        for q, e in zip(quants, before):
            q.enabled = e


def _torch_conv_inputs(model: nn.Module, images: Sequence[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """QAT conv name -> its input on each image (activation fake-quant off, weights fake-quantized:
    the converted model's float graph)."""
    seen: dict[str, list[np.ndarray]] = {n: [] for n in qat_layers(model)}

    def record(name: str):
        def hook(module, inputs) -> None:
            seen[name].append(inputs[0].detach().cpu().numpy())
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in qat_layers(model).items()]
    was_training = model.training
    model.eval()
    try:
        with activation_quant_off(model), torch.no_grad():
            for x in images:
                model(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return seen


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and float(np.max(np.abs(a - b), initial=0.0)) <= MATCH_RTOL * float(
        np.max(np.abs(b), initial=0.0))


def match_tensors(torch_values: dict[str, list[np.ndarray]],
                  onnx_values: list[dict[str, np.ndarray]]) -> dict[str, list[str]]:
    """Quantizer -> the ONNX tensors with the same shape and values on every image (may be empty)."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, v in onnx_values[0].items():
        by_shape.setdefault(v.shape, []).append(name)
    return {q: [t for t in by_shape.get(vals[0].shape, [])
                if all(_close(v, img[t]) for v, img in zip(vals, onnx_values))]
            for q, vals in torch_values.items()}


def qat_calibration(model: nn.Module, fp32_onnx_path: str | Path | None, images: Sequence[np.ndarray],
                    quant: QuantConfig | None = None) -> CalibrationTable:
    """The calibration table of the converted model's fp32 ONNX graph with QAT's learned ranges.

    ``model`` is the prepared (not yet converted) QAT model; ``fp32_onnx_path`` the fp32 ONNX
    export of its converted twin (None: exported here from a converted copy; ``export_model``
    writes the same graph); ``images`` are float32 network inputs ``(1, C, H, W)``, the first
    ``MATCH_IMAGES`` of which pair quantizers with tensors. Tensors no quantizer matched keep
    the ranges of our post-training calibrator (``quant``: a ``QuantConfig``) on ``images``."""
    from edge_compress.quant import calibrate
    from edge_compress.quant.calibrate import tensor_runner

    ranges = learned_ranges(model)
    if not ranges:
        raise ConfigError("the model has no trained QAT quantizer: run prepare_qat and at least one training "
                          "forward before qat_calibration (and call convert_qat only after it)")
    if len(images) == 0:
        raise ConfigError("qat_calibration got no images; pass float32 network inputs of the data")
    quant = quant or QuantConfig()
    with tempfile.TemporaryDirectory(prefix="qat_") as tmp:
        path = Path(fp32_onnx_path) if fp32_onnx_path is not None else _export_converted(model, Path(tmp))
        base = calibrate(path, images, quant)
        _, run = tensor_runner(path)
        onnx_values = [dict(run(np.ascontiguousarray(x, np.float32))) for x in images[:MATCH_IMAGES]]
    matches = match_tensors(_torch_conv_inputs(model, images[:MATCH_IMAGES]), onnx_values)
    table, tensors = dict(base.ranges), {}
    for q, names in matches.items():
        for t in names if q in ranges else ():
            lo, hi = ranges[q]
            if t in tensors:        # two quantizers on one tensor (a tensor feeding two convs): union
                lo, hi = min(lo, table[t][0]), max(hi, table[t][1])
            table[t], tensors[t] = (lo, hi), tensors.get(t, []) + [q]
    matched = sorted(q for q, names in matches.items() if names and q in ranges)
    notes = {"source": "qat", "quantizers": len(ranges), "matched": len(matched),
             "matched_fraction": len(matched) / len(ranges), "tensors": tensors,
             "unmatched": sorted(set(ranges) - set(matched)), "fallback_calibrator": quant.calibrator}
    return CalibrationTable("qat", len(images), table, dict(base.observed), notes)


def _export_converted(model: nn.Module, tmp: Path) -> Path:
    from edge_compress.backends.onnx_export import export_onnx

    twin = copy.deepcopy(model)
    convert_qat(twin)
    return export_onnx(twin, tmp / "fp32.onnx")
