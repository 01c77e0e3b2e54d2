"""Materialise a calibration table as a QDQ ONNX model (QuantizeLinear/DequantizeLinear pairs).

The QDQ graph is the one int8 representation that ONNX Runtime, OpenVINO and
TensorRT all consume: ORT fuses each DQ -> op -> Q group into an integer kernel,
OpenVINO turns the pairs into FakeQuantize and runs int8 kernels, TensorRT builds
an explicitly quantized engine from it. The Q/DQ insertion itself is done by
ONNX Runtime's ``QDQQuantizer`` (the field's maintained tool for it), fed with
*our* ranges instead of its own calibration, so every backend receives the same
table.

Not quantized: the graph's tail after the last Conv (the reshapes and concats
that lay the head outputs out as ``(N, P, K)``), since one int8 scale for box
regressions and class logits together would cost accuracy for no speed; by
default the head's output convs (the last conv on every path to the output:
small 1x1 predictors, a few percent of the MACs), since 8-bit logits and box
offsets are where a detector loses most (yolo_tiny, percentile calibration:
AP 0.683 fp32, 0.663 all-int8, 0.679 with the two output convs in fp32);
and any layer the user keeps in fp32. A float conv keeps its neighbours float too
(``float_neighbours``): the activation, pooling, residual Add and SE Mul that it
feeds, or that feed it, get no Q/DQ. Quantizing what a float conv feeds would put
a quantize/dequantize pair and a layout reorder around every elementwise op of a
float region: on OpenVINO an ssdlite with 2 of 62 convs in int8 and the rest float
ran 6.4 ms, against 4.6 ms for the same model all float. Quantizing what feeds a
float conv leaves ONNX Runtime an int8 op whose consumer is float, which it keeps
in NCHW and runs with its slow uint8 NCHW kernel: a pruned yolo_tiny with one
fp32 conv of 19 ran 5.3 ms with the MaxPool, Concat and activations before that
conv in int8 (a uint8 MaxPool on 1x64x80x80 alone took 1.56 ms), 3.7 ms with
them float, against 2.8 ms all int8; OpenVINO ran both graphs alike (2.4 ms).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_compress.errors import ConfigError
from edge_compress.quant.calibrate import CalibrationTable

# Ops given Q/DQ on their inputs and outputs; everything in between runs in integers where the
# runtime has a kernel (ORT's CPU EP fuses Conv, Add, Mul, Concat, MaxPool, Resize, LeakyRelu,
# Sigmoid, GlobalAveragePool QDQ groups; OpenVINO propagates FakeQuantize through the rest).
OP_TYPES = ("Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool",
            "Resize", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish")
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")   # the ops whose precision the manifest reports


@dataclass(frozen=True)
class QdqResult:
    path: Path
    quantized: tuple[str, ...]     # Conv/Gemm/MatMul nodes that run in int8
    kept_fp32: tuple[str, ...]     # Conv/Gemm/MatMul nodes left in float


def tail_nodes(model) -> set[str]:
    """Nodes from which no Conv/Gemm/MatMul is reachable: the output plumbing after the head."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    feeds_compute: dict[str, bool] = {}
    for n in reversed(model.graph.node):   # graph order is topological: consumers come later
        feeds_compute[n.name] = any(c.op_type in QUANTIZED_OPS or feeds_compute.get(c.name, False)
                                    for o in n.output for c in consumers.get(o, []))
    return {n.name for n in model.graph.node if n.op_type not in QUANTIZED_OPS and not feeds_compute[n.name]}


def output_convs(model) -> set[str]:
    """Conv/Gemm/MatMul nodes whose outputs reach the graph output only through the tail."""
    tail = tail_nodes(model)
    graph_out = {o.name for o in model.graph.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    return {n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS
            and all(o in graph_out or (consumers.get(o) and set(consumers[o]) <= tail) for o in n.output)}


def float_neighbours(model, float_compute: set[str], fed: set[str] | None = None) -> set[str]:
    """The nodes other than Conv/Gemm/MatMul that run beside a float conv: those whose nearest compute
    producers (through any chain of other nodes) include one of ``float_compute``, and those whose nearest
    compute consumers include one of ``fed`` (default: all of ``float_compute``; at the graph's input, with
    no compute producer, any of ``float_compute``). A residual Add or a Concat joining an int8 and a float
    branch is among them: its float input would be quantized only to be dequantized again; so is the
    activation, pool or Concat between an int8 conv and a float one of ``fed`` (the int8 conv's output is
    quantized and dequantized once, before them)."""
    fed = float_compute if fed is None else fed
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def nearest(n, seen: dict[str, set[str]], links) -> set[str]:
        found: set[str] = set()
        for m in links(n):
            found |= {m.name} if m.op_type in QUANTIZED_OPS else seen[m.name]
        return found

    up: dict[str, set[str]] = {}
    for n in nodes:                       # graph order is topological: producers come first
        up[n.name] = nearest(n, up, lambda n: [producer[i] for i in n.input if i in producer])
    down: dict[str, set[str]] = {}
    for n in reversed(nodes):
        down[n.name] = nearest(n, down, lambda n: [c for o in n.output for c in consumers.get(o, [])])
    return {n.name for n in nodes if n.op_type not in QUANTIZED_OPS
            and (up[n.name] & float_compute or down[n.name] & (fed if up[n.name] else float_compute))}


def quantize_onnx(fp32_onnx: Path, table: CalibrationTable, out: Path, *, keep_fp32: Sequence[str] = (),
                  per_channel: bool = True, symmetric_activations: bool = False,
                  quantize_outputs: bool = False) -> QdqResult:
    """Write the QDQ model of ``fp32_onnx`` to ``out``.

    Weights: int8, symmetric, per output channel (or per tensor); biases int32 at
    ``scale_x * scale_w``. Activations: uint8 asymmetric on the table's ranges, or
    int8 symmetric (zero point 0, as TensorRT requires) on ``max(|lo|, |hi|)``.
    ``keep_fp32`` holds ONNX node names (resolve user names with ``resolve_layers``);
    the head's output convs stay float too unless ``quantize_outputs``.
    """
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    model = onnx.load(str(fp32_onnx))
    names = {n.name for n in model.graph.node}
    missing = sorted(set(keep_fp32) - names)
    if missing:
        raise ConfigError(f"keep_fp32 names nodes that are not in {fp32_onnx}: {missing}")
    unknown = [t for t in _activation_inputs(model) if t not in table.ranges]
    if unknown:
        raise ConfigError(f"the calibration table has no range for tensor(s) {unknown[:5]} of {fp32_onnx}; "
                          "it was computed on a different graph: calibrate this model again")
    ranges = TensorsData(CalibrationMethod.MinMax, {
        k: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in table.ranges.items()})
    float_compute = set(keep_fp32) | (set() if quantize_outputs else output_convs(model))
    # the head's output convs read their producers' int8 output dequantized, as LiteRT's graph does (the
    # activation before them stays in its int8 kernel; all-int8 graphs are as before build 3)
    exclude = sorted(tail_nodes(model) | float_compute | float_neighbours(model, float_compute, set(keep_fp32)))
    act = QuantType.QInt8 if symmetric_activations else QuantType.QUInt8
    extra = {"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True}
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # ORT's pre-process advice
    q = QDQQuantizer(model, per_channel, False, QuantType.QInt8, act, ranges, [], exclude, list(OP_TYPES), extra)
    q.quantize_model()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    q.model.save_model_to_file(str(out), False)
    compute = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    kept = tuple(n for n in compute if n in set(exclude))
    return QdqResult(Path(out), tuple(n for n in compute if n not in set(kept)), kept)


def _activation_inputs(model) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i for n in model.graph.node if n.op_type in QUANTIZED_OPS for i in n.input[:1] if i not in inits]


def resolve_layers(names: Sequence[str], onnx_nodes: Sequence[str], module_to_node: dict[str, str]) -> list[str]:
    """ONNX node names for user layer names: an ONNX node name as is, or a zoo module name
    (``backbone.stem.0.conv``) through ``module_to_node``. A name matching nothing is an error."""
    nodes, out, bad = set(onnx_nodes), [], []
    for name in names:
        if name in nodes:
            out.append(name)
        elif name in module_to_node:
            out.append(module_to_node[name])
        else:
            bad.append(name)
    if bad:
        known = sorted(module_to_node) or sorted(nodes)
        raise ConfigError(f"layer name(s) {bad} match no layer of the model; known layers include "
                          f"{known[:8]}{' ...' if len(known) > 8 else ''} (see `edge-compress zoo summary "
                          "NAME --layers`)")
    return out


def conv_module_map(model, onnx_model) -> dict[str, str]:
    """Zoo ``Conv2d`` module name -> ONNX Conv node name.

    The exporter's node names follow the module hierarchy but not in a form that maps
    back reliably (``ModuleList`` items appear as ``/stem/stem.0/``), so the pairing uses
    execution order: a forward hook records the order in which Conv2d modules run, which
    is the order of Conv nodes in the traced graph; weight shapes are checked pairwise.
    """
    import torch

    order: list[tuple[str, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: order.append((name, tuple(mod.weight.shape))))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    spec = model.input_spec
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, spec.channels, spec.height, spec.width))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    inits = {i.name: tuple(i.dims) for i in onnx_model.graph.initializer}
    convs = [(n.name, inits.get(n.input[1])) for n in onnx_model.graph.node if n.op_type == "Conv"]
    if len(convs) != len(order) or any(shape is not None and shape != s for (_, s), (_, shape) in zip(order, convs)):
        return {}   # the graph is not a plain trace of this module (nothing maps; names still work)
    return {m: n for (m, _), (n, _) in zip(order, convs)}
