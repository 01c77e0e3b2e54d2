"""``lower``: the fp32 ONNX graph of a detector + a ``LoweringConfig`` -> a ``LoweredGraph``.

The graph is the one ``edge_compress.backends.onnx_export.export_onnx`` writes (BatchNorm
already folded into the convs, constants folded by onnxscript). Each ONNX node becomes one
kernels op named after it, so per-op timers read as the ONNX layers; patterns that the
kernels run as one op are merged (a binary layer's sign + pad + conv; an int8 conv and the
Relu/Clip after it). Ops left without readers (a sign feeding only a binary conv) are dropped.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edge_compress.errors import ConfigError
from edge_compress.kernels.graph import LoweredGraph, Op
from edge_compress.lower.config import LoweringConfig
from edge_compress.lower.conv import (ConvLowering, binarize_input, clip_bounds, conv_info, fusable_activation,
                                      why_not)
from edge_compress.lower.onnx_graph import OnnxGraph, parse, unsupported


def lower(source, config: LoweringConfig = LoweringConfig(), *, calibration=None,
          module_map: Mapping[str, str] | None = None) -> LoweredGraph:
    """Lower ``source`` (a zoo detector, an ONNX ``ModelProto`` or the path of an fp32 ONNX file).

    ``calibration`` (needed by int8 layers): a ``CalibrationTable`` or a mapping tensor ->
    ``(lo, hi)`` of this same fp32 graph. ``module_map`` (zoo module name -> ONNX conv node) lets
    ``config.layers`` use module names; it is computed for a torch detector.
    """
    model, module_map = _load(source, module_map)
    g = parse(model)
    ranges = _ranges(calibration)
    choices, fallbacks = _choose(g, config, dict(module_map or {}))
    if ranges is None and "int8" in choices.values():
        raise ConfigError("int8 layers need activation ranges: pass calibration= (a CalibrationTable from "
                          "edge_compress.quant.calibrate on this fp32 graph, or a mapping tensor -> (lo, hi))")
    weights: dict[str, np.ndarray] = {}
    ops = _translate(g, choices, ConvLowering(g, weights, ranges))
    ops = _drop_unread(ops, set(g.output_names))
    used = {t for op in ops for t in op.inputs + op.outputs}
    meta = {"source_sha256": hashlib.sha256(model.SerializeToString()).hexdigest(), "config": config.to_dict(),
            "fallbacks": fallbacks, "modules": {n: m for m, n in (module_map or {}).items() if n in choices}}
    return LoweredGraph(tuple(ops), {g.input_name: g.shape(g.input_name)},
                        {o: g.shape(o) for o in g.output_names},
                        {k: weights[k] for op in ops for k in op.weights.values()},
                        {t: g.shapes[t] for t in sorted(used) if t in g.shapes}, meta)


def _load(source, module_map):
    import onnx

    if hasattr(source, "state_dict"):   # a torch detector: export it as the export flow does
        from edge_compress.backends.onnx_export import export_onnx
        from edge_compress.quant.qdq import conv_module_map

        with tempfile.TemporaryDirectory(prefix="lower_") as d:
            model = onnx.load(str(export_onnx(source, Path(d) / "fp32.onnx")))
        return model, module_map if module_map is not None else conv_module_map(source, model)
    if isinstance(source, onnx.ModelProto):
        return source, module_map
    from edge_compress.backends.onnx_export import check_onnx

    return check_onnx(Path(source)), module_map


def _ranges(calibration) -> dict[str, tuple[float, float]] | None:
    if calibration is None:
        return None
    ranges = getattr(calibration, "ranges", calibration)
    if not isinstance(ranges, Mapping):
        raise ConfigError(f"calibration must be a CalibrationTable or a mapping tensor -> (lo, hi), got "
                          f"{type(calibration).__name__}")
    return {str(k): (float(v[0]), float(v[1])) for k, v in ranges.items()}


def _choose(g: OnnxGraph, config: LoweringConfig, module_map: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Conv node -> choice. Named layers must take their choice; the default falls back to fp32 with the reason."""
    from edge_compress.quant.qdq import resolve_layers

    convs = {n.name: n for n in g.nodes if n.op_type == "Conv"}
    named = config.layer_map()
    nodes = resolve_layers(list(named), list(convs), module_map)
    explicit = {node: (user, named[user]) for user, node in zip(named, nodes)}
    choices, fallbacks = {}, {}
    for name, node in convs.items():
        c = conv_info(g, node)
        if name in explicit:
            user, choice = explicit[name]
            reason = why_not(g, c, choice)
            if reason:
                also = f" (ONNX node '{name}')" if user != name else ""
                raise ConfigError(f"layer '{user}'{also} cannot be lowered to {choice}: {reason}")
        else:
            choice, reason = config.default, why_not(g, c, config.default) or _not_worth(c, config.default)
            if reason:
                choice, fallbacks[name] = "fp32", f"default {config.default} not possible: {reason}"
        choices[name] = choice
    return choices, fallbacks


# A conv given sparse_csr by default stays fp32 unless at least half its weights are zero: the CSR
# kernel wins over dense fp32 only at high sparsity (benchmarks/kernels.py: ~2x at 90% zeros), and a
# detector's unpruned layers (stem, head outputs) would only get slower. Naming a layer overrides it.
SPARSE_DEFAULT_MAX_DENSITY = 0.5


def _not_worth(c, choice: str) -> str | None:
    if choice != "sparse_csr":
        return None
    density = float(np.count_nonzero(c.w)) / c.w.size
    if density > SPARSE_DEFAULT_MAX_DENSITY:
        return (f"its weights are {100 * density:.0f}% nonzero; by default sparse_csr takes only convs at most "
                f"{100 * SPARSE_DEFAULT_MAX_DENSITY:.0f}% dense (name the layer to force it)")
    return None


def _translate(g: OnnxGraph, choices: dict[str, str], convs: ConvLowering) -> list[Op]:
    ops: list[Op] = []
    fused: set[str] = set()
    for node in g.nodes:
        if node.name in fused:
            continue
        if node.op_type == "Conv":
            c = conv_info(g, node)
            act = fusable_activation(g, c) if choices[node.name] == "int8" else None
            if act is not None:
                fused.add(act.name)
            ops.append(convs.emit(c, choices[node.name], act))
        elif node.op_type == "GreaterOrEqual":
            if not all(binarize_input(g, w) for w in g.consumers.get(node.output[0], [])):
                raise unsupported(node, "GreaterOrEqual is supported only as the sign of a binary activation, "
                                        "Where(GreaterOrEqual(x, 0), 1, -1)")
        else:
            ops.append(_glue(g, node))
    return ops


def _glue(g: OnnxGraph, node) -> Op:
    """A non-conv node as its kernels op."""
    t, a = node.op_type, g.attrs(node)
    ins, outs = tuple(node.input[:1]), tuple(node.output[:1])
    if t in ("Add", "Mul"):
        consts = [i for i in node.input if i in g.consts]
        if consts:
            raise unsupported(node, f"constant operand {consts}; the kernels add/mul two activations")
        return Op(node.name, t.lower(), tuple(node.input), outs)
    if t == "Concat":
        return Op(node.name, "concat", tuple(node.input), outs, {"axis": int(a["axis"]) % len(g.shape(outs[0]))})
    simple = {"Relu": "relu", "Sigmoid": "sigmoid", "HardSwish": "hard_swish", "GlobalAveragePool": "global_avgpool"}
    if t in simple:
        return Op(node.name, simple[t], ins, outs)
    if t == "Clip":
        lo, hi = clip_bounds(g, node)
        return Op(node.name, "clip", ins, outs, {"min": lo, "max": hi})
    if t == "LeakyRelu":
        return Op(node.name, "leaky_relu", ins, outs, {"alpha": float(a.get("alpha", 0.01))})
    if t == "HardSigmoid":
        return Op(node.name, "hard_sigmoid", ins, outs, {"alpha": float(a.get("alpha", 0.2)),
                                                         "beta": float(a.get("beta", 0.5))})
    if t == "Where":
        x = binarize_input(g, node)
        if x is None:
            raise unsupported(node, "Where is supported only as the sign Where(GreaterOrEqual(x, 0), 1, -1)")
        return Op(node.name, "binarize", (x,), outs)
    return _shape_op(g, node, t, a, ins, outs)


def _shape_op(g: OnnxGraph, node, t: str, a: dict[str, Any], ins, outs) -> Op:
    if t == "Reshape":
        return Op(node.name, "reshape", ins, outs, {"shape": _ints(g.const(node, 1, "shape"))})
    if t == "Transpose":
        return Op(node.name, "transpose", ins, outs, {"perm": [int(p) for p in a["perm"]]})
    if t == "Slice":
        starts, ends = _ints(g.const(node, 1, "starts")), _ints(g.const(node, 2, "ends"))
        axes, steps = g.const(node, 3, "axes", optional=True), g.const(node, 4, "steps", optional=True)
        return Op(node.name, "slice", ins, outs, {
            "starts": starts, "ends": ends, "axes": list(range(len(starts))) if axes is None else _ints(axes),
            "steps": [1] * len(starts) if steps is None else _ints(steps)})
    if t == "Pad":
        if len(node.input) > 3 and node.input[3]:
            raise unsupported(node, "the 'axes' input of Pad is not supported")
        value = g.const(node, 2, "constant_value", optional=True)
        return Op(node.name, "pad", ins, outs, {"pads": _ints(g.const(node, 1, "pads")),
                                                "value": 0.0 if value is None else float(value)})
    if t == "Resize":
        return Op(node.name, "resize_nearest", ins, outs, _resize_scales(g, node))
    if t == "MaxPool":
        if len([o for o in node.output if o]) > 1:
            raise unsupported(node, "MaxPool's Indices output is not supported")
        k = [int(v) for v in a["kernel_shape"]]
        return Op(node.name, "maxpool", ins, outs, {"kernel": k, "stride": [int(v) for v in a.get("strides", [1, 1])],
                                                    "pads": [int(v) for v in a.get("pads", [0, 0, 0, 0])],
                                                    "ceil_mode": int(a.get("ceil_mode", 0))})
    raise unsupported(node, f"op type {t} has no kernel")


def _ints(v) -> list[int]:
    return [int(x) for x in np.asarray(v).ravel()]


def _resize_scales(g: OnnxGraph, node) -> dict[str, int]:
    """Integer H/W scales of a nearest Resize, from the static input and output shapes."""
    i, o = g.shape(node.input[0]), g.shape(node.output[0])
    if len(i) != 4 or i[:2] != o[:2] or o[2] % i[2] or o[3] % i[3]:
        raise unsupported(node, f"Resize {i} -> {o} is not an integer spatial upscale (only those are supported)")
    return {"scale_h": o[2] // i[2], "scale_w": o[3] // i[3]}


def _drop_unread(ops: list[Op], outputs: set[str]) -> list[Op]:
    """Remove ops none of whose outputs is read (walking back, so chains of them go too)."""
    needed = set(outputs)
    kept: list[Op] = []
    for op in reversed(ops):
        if any(o in needed for o in op.outputs):
            kept.append(op)
            needed.update(op.inputs)
    return kept[::-1]
