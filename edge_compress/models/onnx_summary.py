"""Params, MACs and FLOPs of an ONNX graph (for detectors that exist only as ONNX files).

Counts follow ``models.summary``: Conv MACs = ``OC * OH * OW * KH * KW * IC / groups``,
Gemm/MatMul MACs = the product of the output shape and the reduced dimension,
FLOPs = 2 * MACs; params are the element counts of the float initializers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class OnnxSummary:
    params: int
    macs: int
    flops: int


def summarize_onnx(path: Path) -> OnnxSummary:
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {i.name: list(i.dims) for i in g.initializer}
    shapes.update(inits)
    params = sum(int(np.prod(i.dims)) for i in g.initializer
                 if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
    macs = 0
    for n in g.node:
        out = shapes.get(n.output[0], [])
        if not out or 0 in out:
            continue
        if n.op_type == "Conv" and len(shapes.get(n.input[1], [])) == 4:
            oc, icg, kh, kw = shapes[n.input[1]]
            macs += int(np.prod(out)) * icg * kh * kw
        elif n.op_type in ("Gemm", "MatMul") and shapes.get(n.input[0]):
            k = shapes[n.input[0]][-1]
            macs += int(np.prod(out)) * k
    return OnnxSummary(params, macs, 2 * macs)
