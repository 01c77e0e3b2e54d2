"""The search space of ``fit``: a pruning ratio per channel knob and a precision per conv.

A **knob** is a set of channel groups (``edge_compress.compress.depgraph``) that must
lose the same fraction of their channels: the groups whose filters the same convs
own. Pruning a knob by ``r`` removes ``round(r * size)`` channels of each of its
groups, kept at least ``min_channels`` and rounded up to ``round_to`` (8: the SIMD
width of fp32 AVX2 and of OpenVINO's blocked layouts, so a pruned conv does not
fall off its kernel's fast path), exactly as ``prune_channels`` does.
Knobs whose convs carry less than ``min_share`` of the model's MACs (SE gates on
1x1 maps) are left out: they cost nothing on any device.

A **precision layer** is every conv but the head outputs (those stay fp32: see
``edge_compress.quant.qdq``); each is fp32 or int8 where the backend takes int8.
With ``int8_everywhere`` there are none: every such conv is int8 and the search
only prunes (no per-layer int8 sensitivity to measure, no precision boundaries:
the fast choice below the int8 latency, where an fp32 layer only costs time).

``SearchSpace.layers(candidate)`` gives every conv's channels, MACs and output
elements without building the model (the latency model's features); a test holds
it equal to what ``prune_channels`` actually builds.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from random import Random
from typing import Any

from torch import nn

from edge_compress.errors import ConfigError

PRECISIONS = ("fp32", "int8")
KINDS = ("conv", "pointwise", "depthwise")
INPUT, OUTPUT = "<input>", "<output>"


@dataclass(frozen=True)
class Knob:
    """Channel groups pruned by one ratio; ``convs`` are the convs whose filters they remove."""

    name: str
    convs: tuple[str, ...]
    groups: tuple[int, ...]
    macs: int


@dataclass(frozen=True)
class ConvInfo:
    name: str
    kind: str                  # "conv" (k > 1, dense), "pointwise" (1x1 dense), "depthwise"
    in_channels: int
    out_channels: int
    kernel: int                # kh * kw
    pixels: int                # output pixels summed over the conv's calls
    head_output: bool
    stride: int = 1            # sh * sw: the conv reads about stride x its output pixels


@dataclass(frozen=True)
class LayerRow:
    """One conv of a candidate: its kept channels, MACs, output elements and precision."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    orig_out_channels: int
    macs: int
    out_elems: int
    in_elems: int
    precision: str
    prune_ratio: float | None
    boundary_in_elems: int = 0     # int8 conv fed by a float tensor: a standalone QuantizeLinear on its input
    boundary_out_elems: int = 0    # int8 conv feeding a float consumer: a standalone DequantizeLinear on its output

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Candidate:
    """Per knob a pruning ratio, per precision layer whether it runs in int8."""

    ratios: tuple[float, ...]
    int8: tuple[bool, ...]

    def key(self) -> str:
        blob = json.dumps([list(self.ratios), [int(b) for b in self.int8]])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {"ratios": list(self.ratios), "int8": [bool(b) for b in self.int8]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        return cls(tuple(float(r) for r in d["ratios"]), tuple(bool(b) for b in d["int8"]))


def _kind(conv: nn.Conv2d) -> str:
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise"
    return "pointwise" if conv.kernel_size == (1, 1) else "conv"


def _conv_macs(c: ConvInfo, cin: int, cout: int) -> int:
    per = cout if c.kind == "depthwise" else cout * cin
    return per * c.kernel * c.pixels


class SearchSpace:
    """Knobs and precision layers of one detector, and the candidates over them."""

    def __init__(self, model: nn.Module, ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75),
                 precisions: tuple[str, ...] = PRECISIONS, round_to: int = 8, min_channels: int = 8,
                 min_share: float = 0.005, int8_everywhere: bool = False):
        from edge_compress.compress.depgraph import analyze

        _check_ratios(ratios)
        bad = [p for p in precisions if p not in PRECISIONS]
        if bad or "fp32" not in precisions:
            raise ConfigError(f"fit precisions {list(precisions)}: choose from {list(PRECISIONS)}, fp32 included")
        if int8_everywhere and "int8" not in precisions:
            raise ConfigError(f"fit precision 'int8' (every conv int8): the backend takes only {list(precisions)}; "
                              "use --precision fp32 or a backend with int8")
        self.int8_everywhere = bool(int8_everywhere)
        self.ratios, self.precisions = tuple(float(r) for r in ratios), tuple(precisions)
        self.round_to, self.min_channels = round_to, min_channels
        graph = analyze(model)
        modules = dict(model.named_modules())
        self.convs = {n: _conv_info(n, modules[n], calls, n in graph.head_outputs)
                      for n, calls in graph.conv_calls.items() if isinstance(modules[n], nn.Conv2d)}
        self._groups = graph.groups
        self._modules_convs = set(self.convs)
        self.knobs = self._make_knobs(modules, min_share)
        quantizable = tuple(n for n, c in self.convs.items() if not c.head_output)
        self.precision_layers = quantizable if "int8" in precisions and not int8_everywhere else ()
        self._always_int8 = quantizable if int8_everywhere else ()
        self.producers, self.conv_profile_names = conv_graph(model, set(self.convs))
        self.consumers: dict[str, set[str]] = {}
        for c, ps in self.producers.items():
            for p in ps:
                self.consumers.setdefault(p, set()).add(c)

    @classmethod
    def for_config(cls, model: nn.Module, config, precisions: tuple[str, ...]) -> "SearchSpace":
        """The search space of a ``FitConfig`` (ratios, rounding, ``precision``) over ``precisions``, the
        ones the backend takes."""
        return cls(model, config.ratios, precisions, config.round_to, config.min_channels,
                   int8_everywhere=config.precision == "int8")

    # ---- construction

    def _make_knobs(self, modules: dict[str, nn.Module], min_share: float) -> tuple[Knob, ...]:
        """Prunable groups merged where they share a producer conv (they must share a ratio)."""
        prunable = [(i, g.producers(modules)) for i, g in enumerate(self._groups) if g.prunable]
        prunable = [(i, p) for i, p in prunable if p]
        merged: list[tuple[set[int], set[str]]] = []
        for i, prods in prunable:
            hit = [m for m in merged if m[1] & set(prods)]
            groups, convs = {i}, set(prods)
            for m in hit:
                groups |= m[0]
                convs |= m[1]
                merged.remove(m)
            merged.append((groups, convs))
        total = sum(self.full_macs(n) for n in self.convs) or 1
        knobs = []
        for groups, convs in merged:
            order = [n for n in self.convs if n in convs] + sorted(convs - set(self.convs))
            macs = sum(self.full_macs(n) for n in order if n in self.convs)
            if macs >= min_share * total:
                knobs.append(Knob(order[0], tuple(order), tuple(sorted(groups)), macs))
        return tuple(knobs)

    def full_macs(self, name: str) -> int:
        """MACs of conv ``name`` unpruned."""
        c = self.convs[name]
        return _conv_macs(c, c.in_channels, c.out_channels)

    # ---- candidates

    def baseline(self) -> Candidate:
        """Unpruned, every layer fp32 (int8 in an ``int8_everywhere`` space)."""
        return Candidate((0.0,) * len(self.knobs), (False,) * len(self.precision_layers))

    def uniform(self, ratio: float, int8: bool = True) -> Candidate:
        """One ratio for every knob, every layer int8 (or fp32): the uniform baseline."""
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"uniform ratio {ratio} is outside [0, 1)")
        return Candidate((float(ratio),) * len(self.knobs), (bool(int8),) * len(self.precision_layers))

    def smallest(self) -> Candidate:
        """The most compressed candidate: every knob at the largest ratio, every layer int8."""
        return self.uniform(max(self.ratios), int8=True)

    def random(self, rng: Random) -> Candidate:
        """Ratios with a per-candidate bias (samples spread from light to heavy); precision all int8, all
        fp32, or int8 with one to three runs of consecutive fp32 layers (a per-layer coin flip would mostly
        sample candidates full of precision boundaries, which no search keeps)."""
        level = rng.random()
        ratios = tuple(self.ratios[min(len(self.ratios) - 1, int(rng.random() * len(self.ratios) * (0.5 + level)))]
                       for _ in self.knobs)
        n = len(self.precision_layers)
        kind = rng.randrange(3)
        bits = [kind != 1] * n
        if kind == 2 and n:
            for _ in range(rng.randint(1, 3)):
                start = rng.randrange(n)
                for i in range(start, min(n, start + rng.randint(1, max(1, n // 4)))):
                    bits[i] = False
        return Candidate(ratios, tuple(bits))

    def check(self, c: Candidate) -> None:
        if len(c.ratios) != len(self.knobs) or len(c.int8) != len(self.precision_layers):
            raise ConfigError(f"candidate has {len(c.ratios)} ratios and {len(c.int8)} precisions; this search "
                              f"space has {len(self.knobs)} knobs and {len(self.precision_layers)} precision layers "
                              "(a state from another model or space?)")
        bad = [r for r in c.ratios if r not in self.ratios]
        if bad:
            raise ConfigError(f"candidate ratios {bad} are not among the space's {list(self.ratios)}")

    def prune_ratios(self, c: Candidate) -> dict[str, float]:
        """``ChannelPruneConfig.ratio``: every producer conv of a pruned knob -> its ratio."""
        self.check(c)
        return {conv: r for k, r in zip(self.knobs, c.ratios) if r > 0 for conv in k.convs}

    def keep_fp32(self, c: Candidate) -> tuple[str, ...]:
        """Precision layers left in fp32 (``QuantConfig.keep_fp32``)."""
        return tuple(n for n, q in zip(self.precision_layers, c.int8) if not q)

    def any_int8(self, c: Candidate) -> bool:
        return self.int8_everywhere or any(c.int8)

    def prune_config(self, c: Candidate, recalibrate_bn: int = 0):
        from edge_compress.compress.structured import ChannelPruneConfig

        return ChannelPruneConfig(ratio=self.prune_ratios(c), round_to=self.round_to,
                                  min_channels=self.min_channels, recalibrate_bn=recalibrate_bn)

    # ---- analytic shapes

    def _keep(self, size: int, ratio: float) -> int:
        keep = max(size - round(ratio * size), min(self.min_channels, size))
        return min(size, math.ceil(keep / self.round_to) * self.round_to)

    def _removed(self, c: Candidate) -> dict[tuple[str, int], int]:
        removed: dict[tuple[str, int], int] = {}
        for knob, r in zip(self.knobs, c.ratios):
            for gi in knob.groups:
                g = self._groups[gi]
                gone = g.size - self._keep(g.size, r)
                for m in g.members:
                    per = sum(len(ix) for ix in m.indices) / g.size
                    removed[(m.module, m.dim)] = removed.get((m.module, m.dim), 0) + round(gone * per)
        return removed

    def layers(self, c: Candidate) -> list[LayerRow]:
        """Every conv of candidate ``c`` as it will be built (channels, MACs, elements, precision)."""
        self.check(c)
        removed = self._removed(c)
        precision = {**dict.fromkeys(self._always_int8, True), **dict(zip(self.precision_layers, c.int8))}
        ratio_of = {conv: r for k, r in zip(self.knobs, c.ratios) for conv in k.convs}
        rows = []
        for n, info in self.convs.items():
            cout = info.out_channels - removed.get((n, 0), 0)
            cin = cout if info.kind == "depthwise" else info.in_channels - removed.get((n, 1), 0)
            q = bool(precision.get(n))
            q_in = q and any(not precision.get(p) for p in self.producers.get(n, (INPUT,)))
            dq_out = q and any(not precision.get(c) for c in self.consumers.get(n, {OUTPUT}))
            rows.append(LayerRow(n, info.kind, cin, cout, info.out_channels, _conv_macs(info, cin, cout),
                                 cout * info.pixels, cin * info.pixels * info.stride, "int8" if q else "fp32",
                                 ratio_of.get(n), cin * info.pixels * info.stride if q_in else 0,
                                 cout * info.pixels if dq_out else 0))
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"ratios": list(self.ratios), "precisions": list(self.precisions), "round_to": self.round_to,
                "min_channels": self.min_channels,
                "knobs": [{"name": k.name, "convs": list(k.convs), "macs": k.macs} for k in self.knobs],
                "precision_layers": list(self.precision_layers),
                **({"int8_everywhere": True} if self.int8_everywhere else {})}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def conv_graph(model: nn.Module, convs: set[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """Per conv, the convs whose outputs reach its input through non-conv ops (``INPUT`` for the image),
    read from the model's exported ONNX graph (concats, adds, resizes and activations pass through);
    and per conv, the ONNX names a runtime's per-layer profile may call its kernel after (``_fused_names``)."""
    import tempfile
    from pathlib import Path

    import onnx

    from edge_compress.backends.onnx_export import export_onnx
    from edge_compress.quant.qdq import conv_module_map

    with tempfile.TemporaryDirectory(prefix="fit_graph_") as tmp:
        graph = onnx.load(str(export_onnx(model, Path(tmp) / "model.onnx")))
    module_of = {node: module for module, node in conv_module_map(model, graph).items()}
    producer = {out: node for node in graph.graph.node for out in node.output}
    inits = {i.name for i in graph.graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    result, names = {}, {}
    for node in graph.graph.node:
        if node.op_type == "Conv" and module_of.get(node.name) in convs:
            result[module_of[node.name]] = tuple(sorted(_upstream(node.input[0], producer, inits, module_of)))
            names[module_of[node.name]] = _fused_names(node, consumers)
    return result, names


# What a runtime fuses into a conv's kernel after it (and may name the fused kernel after).
_FUSED_AFTER = {"Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Mul", "BatchNormalization"}


def _fused_names(conv, consumers: dict[str, list]) -> tuple[str, ...]:
    """The conv node's name and output, then those of up to two activation nodes that alone consume it:
    ONNX Runtime names a Conv+LeakyRelu kernel after the activation's output."""
    names, node = [conv.name, conv.output[0]], conv
    for _ in range(2):
        after = consumers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type not in _FUSED_AFTER:
            break
        node = after[0]
        names += [node.name, node.output[0]]
    return tuple(n for n in names if n)


def _upstream(tensor: str, producer: dict, inits: set[str], module_of: dict[str, str]) -> set[str]:
    found, seen, stack = set(), set(), [tensor]
    while stack:
        t = stack.pop()
        if not t or t in seen or t in inits:     # "": an optional input left out (a Resize's roi)
            continue
        seen.add(t)
        node = producer.get(t)
        if node is None:
            found.add(INPUT)
        elif node.op_type == "Conv":
            found.add(module_of.get(node.name, node.name))
        else:
            stack += list(node.input)
    return found


def _conv_info(name: str, conv: nn.Conv2d, calls, head_output: bool) -> ConvInfo:
    kh, kw = conv.kernel_size
    return ConvInfo(name, _kind(conv), conv.in_channels, conv.out_channels, kh * kw,
                    sum(oh * ow for oh, ow in calls), head_output, conv.stride[0] * conv.stride[1])


def _check_ratios(ratios: tuple[float, ...]) -> None:
    if not ratios or 0.0 not in [float(r) for r in ratios]:
        raise ConfigError(f"fit ratios {list(ratios)} must include 0 (a knob left unpruned)")
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
            raise ConfigError(f"fit ratios has {r!r}: each is the fraction of a knob's channels removed, in [0, 1)")
