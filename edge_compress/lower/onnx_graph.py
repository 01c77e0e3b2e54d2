"""The fp32 ONNX graph as the lowering reads it: nodes, constants, static shapes, producers/consumers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_compress.errors import ConfigError

# Attributes each supported ONNX op may carry: None = any value, else the only value accepted.
ALLOWED_ATTRS: dict[str, dict[str, Any]] = {
    "Conv": {"kernel_shape": None, "strides": None, "pads": None, "dilations": None, "group": None,
             "auto_pad": "NOTSET"},
    "MaxPool": {"kernel_shape": None, "strides": None, "pads": None, "ceil_mode": None, "dilations": [1, 1],
                "auto_pad": "NOTSET", "storage_order": 0},
    "Resize": {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor",
               "cubic_coeff_a": None, "exclude_outside": 0, "extrapolation_value": None, "antialias": 0,
               "keep_aspect_ratio_policy": "stretch"},
    "Pad": {"mode": "constant"},
    "Concat": {"axis": None}, "Transpose": {"perm": None}, "Reshape": {"allowzero": 0},
    "LeakyRelu": {"alpha": None}, "HardSigmoid": {"alpha": None, "beta": None},
    "Relu": {}, "Clip": {}, "Sigmoid": {}, "HardSwish": {}, "Add": {}, "Mul": {}, "Slice": {},
    "GlobalAveragePool": {}, "GreaterOrEqual": {}, "Where": {},
}


@dataclass
class OnnxGraph:
    nodes: list                                   # onnx NodeProto, topological order
    consts: dict[str, np.ndarray]                 # initializers and Constant outputs
    shapes: dict[str, tuple[int, ...]]            # static shape of every tensor shape inference knows
    producer: dict[str, Any]
    consumers: dict[str, list]
    input_name: str
    output_names: list[str]

    def attrs(self, node) -> dict[str, Any]:
        import onnx

        out = {}
        for a in node.attribute:
            v = onnx.helper.get_attribute_value(a)
            out[a.name] = v.decode() if isinstance(v, bytes) else v
        return out

    def const(self, node, i: int, what: str, optional: bool = False):
        """Input ``i`` of ``node`` as a constant array (None if absent and ``optional``)."""
        name = node.input[i] if i < len(node.input) else ""
        if name == "":
            if optional:
                return None
            raise unsupported(node, f"its {what} input is missing")
        if name not in self.consts:
            raise unsupported(node, f"its {what} ('{name}') is computed at run time; the kernels take it only "
                                    "as a constant")
        return self.consts[name]

    def shape(self, tensor: str) -> tuple[int, ...]:
        if tensor not in self.shapes:
            raise ConfigError(f"tensor '{tensor}' has no static shape after ONNX shape inference; the kernels "
                              "need static shapes (export at a fixed input size)")
        return self.shapes[tensor]

    def only_consumer(self, tensor: str):
        c = self.consumers.get(tensor, [])
        return c[0] if len(c) == 1 and tensor not in self.output_names else None


def unsupported(node, why: str) -> ConfigError:
    return ConfigError(f"ONNX node '{node.name}' ({node.op_type}) cannot be lowered to the kernels: {why}")


def parse(model) -> OnnxGraph:
    """Constants, shapes and wiring of an ONNX model; unknown ops and attribute values are errors."""
    import onnx

    model, consts = _folded(model)
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    shapes: dict[str, tuple[int, ...]] = {}
    for v in list(g.input) + list(g.value_info) + list(g.output):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = tuple(int(d.dim_value) for d in dims)
    nodes, producer, consumers = list(g.node), {}, {}
    for n in nodes:
        for o in n.output:
            producer[o] = n
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_inputs = [i.name for i in g.input if i.name not in consts]
    if len(graph_inputs) != 1:
        raise ConfigError(f"the kernels run graphs with one image input, this one has {graph_inputs}")
    og = OnnxGraph(nodes, consts, shapes, producer, consumers, graph_inputs[0], [o.name for o in g.output])
    for n in nodes:
        check_attrs(og, n)
    return og


def _folded(model):
    """A copy of ``model`` whose Constant nodes and all-constant nodes are evaluated into
    initializers (so shape inference sees them), and the constants by name."""
    import onnx
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=17)
    kept = []
    for n in model.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.input and all(i == "" or i in consts for i in n.input):
            _fold(n, consts, opset)
        else:
            kept.append(n)
    used = {i for n in kept for i in n.input}
    g = model.graph
    graph = onnx.helper.make_graph(kept, g.name, list(g.input), list(g.output),
                                   [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items() if k in used])
    for i, n in enumerate(graph.node):   # ops are named after nodes (timers, precision): name the unnamed
        n.name = n.name or f"{n.op_type}_{i}"
    return onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version), consts


def _fold(node, consts: dict[str, np.ndarray], opset: int) -> None:
    """Evaluate a node whose inputs are all constants (the pad-amount arithmetic torch writes for
    ``F.pad``) with onnx's reference evaluator; its outputs become constants."""
    from onnx.reference import ReferenceEvaluator

    try:
        outs = ReferenceEvaluator(node, opsets={"": opset}).run(None, {i: consts[i] for i in node.input if i})
    except Exception as e:  # the reference evaluator raises plain exceptions of many kinds
        raise unsupported(node, f"its constant inputs could not be folded ({type(e).__name__}: {e})") from e
    consts.update({o: np.asarray(v) for o, v in zip(node.output, outs) if o})


def check_attrs(g: OnnxGraph, node) -> None:
    allowed = ALLOWED_ATTRS.get(node.op_type)
    if allowed is None:
        raise unsupported(node, f"op type {node.op_type} has no kernel; supported: {sorted(ALLOWED_ATTRS)}")
    for name, value in g.attrs(node).items():
        if name not in allowed:
            raise unsupported(node, f"attribute '{name}' is not supported (supported: {sorted(allowed)})")
        want = allowed[name]
        if want is not None and (list(value) if isinstance(value, (list, tuple)) else value) != want:
            raise unsupported(node, f"attribute {name}={value!r} is not supported (only {want!r})")
