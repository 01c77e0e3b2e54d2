"""Fixtures of the kernel tests: the ONNX backend node test cases (conformance of conv/GEMM semantics)."""

from __future__ import annotations

import glob
import os

import pytest


def _load_node_cases(prefix: str, cls_name: str, module: str):
    """(inputs, outputs) of the ONNX backend node test cases named ``prefix*``.

    Read from the shipped ``onnx/backend/test/data/node/<case>/test_data_set_0/*.pb`` when the
    installed wheel has them; onnx 1.23.2's wheel does not ship data/node, so otherwise the same
    tensors come from the case generators in ``onnx.backend.test.case.node`` (the code that writes
    those .pb files).
    """
    import importlib

    import onnx
    from onnx import numpy_helper

    data = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "node")
    dirs = sorted(glob.glob(os.path.join(data, prefix + "*", "test_data_set_0")))
    if dirs:
        def load(d, kind):
            return [numpy_helper.to_array(onnx.load_tensor(f)) for f in sorted(glob.glob(os.path.join(d, kind + "_*.pb")))]
        return [(os.path.basename(os.path.dirname(d)), onnx.load(os.path.join(d, "..", "model.onnx")).graph.node[0],
                 load(d, "input"), load(d, "output")) for d in dirs]
    node = importlib.import_module("onnx.backend.test.case.node")
    node._TargetOpType = None
    cls = getattr(importlib.import_module(f"onnx.backend.test.case.node.{module}"), cls_name)  # import runs the exports
    cases = [c for c in node._NodeTestCases if c.name.startswith(prefix)]
    if not cases:  # imported earlier under another op-type filter: run the exports again
        for n in [n for n in node._existing_names if n.startswith(prefix)]:
            del node._existing_names[n]
        for name in dir(cls):
            if name.startswith("export"):
                getattr(cls, name)()
        cases = [c for c in node._NodeTestCases if c.name.startswith(prefix)]
    return [(c.name, c.model.graph.node[0], list(c.data_sets[0][0]), list(c.data_sets[0][1])) for c in cases]


@pytest.fixture(scope="session")
def onnx_node_cases():
    """``onnx_node_cases(prefix, cls_name, module)`` -> [(name, node, inputs, outputs)] of onnx's node cases."""
    return _load_node_cases


def _conv_attrs(node, x_shape, w_shape) -> dict:
    """ONNX Conv attributes -> our convs' keywords: ``padding`` as (top, left, bottom, right), with
    ``auto_pad`` SAME_UPPER/SAME_LOWER/VALID resolved for the given input and weight shapes."""
    from onnx import helper

    a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
    stride = tuple(a.get("strides", (1, 1)))
    dilation = tuple(a.get("dilations", (1, 1)))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        pads = tuple(a.get("pads", (0, 0, 0, 0)))
    elif auto == "VALID":
        pads = (0, 0, 0, 0)
    else:  # SAME_*: output = ceil(input / stride); the odd pixel goes at the end (UPPER) or the start (LOWER)
        begin, end = [], []
        for size, s, d, k in zip(x_shape[2:], stride, dilation, w_shape[2:]):
            total = max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        pads = (begin[0], begin[1], end[0], end[1])
    return dict(stride=stride, padding=pads, dilation=dilation, groups=int(a.get("group", 1)))


@pytest.fixture(scope="session")
def onnx_conv_attrs():
    """``onnx_conv_attrs(node, x_shape, w_shape)`` -> stride/padding/dilation/groups keywords."""
    return _conv_attrs
