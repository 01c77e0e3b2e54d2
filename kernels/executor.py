"""Runs a ``LoweredGraph`` op by op on the kernels, with a timer around every op.

Each op's weights are prepared once (sparse formats rebuilt from their arrays); a
tensor is dropped as soon as its last reader has run, so peak memory is the live
set, not the whole graph. ``profile`` gives per-op medians for the profiler
(``edge_compress.backends.kernels.profile_layers``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy as np

from edge_compress.errors import ConfigError
from edge_compress.kernels import binary, int8, ops, sparse
from edge_compress.kernels.graph import LoweredGraph, Op

Kernel = Callable[[list, dict], np.ndarray]


def _conv(x, p, a):
    return ops.conv2d_fp32(x, p["W"], p["B"], a["stride"], a["pads"], a["dilation"], a["group"])


def _conv_int8(x, p, a):
    q = x if p.get("uint8_in") else ops.quantize(x, a["x_scale"], a["x_zp"], np.uint8)
    y = int8.conv2d_int8(q, p["W_run"], p["B"], x_zp=a["x_zp"], w_zp=0, stride=a["stride"], padding=a["pads"],
                         dilation=a["dilation"], groups=a["group"], multiplier=p["multiplier"], shift=p["shift"],
                         out_zp=a["y_zp"], qmin=a["qmin"], qmax=a["qmax"], out_dtype=np.uint8)
    return y if p.get("uint8_out") else ops.dequantize(y, a["y_scale"], a["y_zp"])


def _conv_binary(x, p, a):
    y = binary.binary_conv2d(binary.pack_bits(x, axis=1), p["W"], a["in_channels"], a["stride"], a["pads"],
                             a["dilation"], scale=p["scale"])
    return y + p["B"][None, :, None, None]


def _conv_sparse(fn):
    def run(x, p, a):
        kh, kw = a["kernel"]
        return fn(x, p["packed"], kh, kw, a["in_channels"], a["stride"], a["pads"], a["dilation"], p["B"])
    return run


_UNARY: dict[str, Callable[[np.ndarray, dict, dict], np.ndarray]] = {
    "conv": _conv, "conv_int8": _conv_int8, "conv_binary": _conv_binary,
    "conv_sparse_csr": _conv_sparse(sparse.sparse_conv2d_csr),
    "conv_sparse_2_4": _conv_sparse(sparse.sparse_conv2d_nm),
    "slice": lambda x, p, a: ops.slice_(x, a["starts"], a["ends"], a["axes"], a["steps"]),
    "reshape": lambda x, p, a: ops.reshape(x, a["shape"]),
    "transpose": lambda x, p, a: ops.transpose(x, a["perm"]),
    "pad": lambda x, p, a: ops.pad_constant(x, a["pads"], a["value"]),
    "resize_nearest": lambda x, p, a: ops.resize_nearest(x, a["scale_h"], a["scale_w"]),
    "maxpool": lambda x, p, a: ops.maxpool(x, a["kernel"], a["stride"], a["pads"], bool(a["ceil_mode"])),
    "global_avgpool": lambda x, p, a: ops.global_avgpool(x),
    "relu": lambda x, p, a: ops.relu(x),
    "sigmoid": lambda x, p, a: ops.sigmoid(x),
    "hard_swish": lambda x, p, a: ops.hard_swish(x),
    "binarize": lambda x, p, a: ops.binarize(x),
    "clip": lambda x, p, a: ops.clip(x, a["min"], a["max"]),
    "leaky_relu": lambda x, p, a: ops.leaky_relu(x, a["alpha"]),
    "hard_sigmoid": lambda x, p, a: ops.hard_sigmoid(x, a["alpha"], a["beta"]),
}
_NARY: dict[str, Callable[[list, dict, dict], np.ndarray]] = {
    "add": lambda xs, p, a: ops.add(xs[0], xs[1]),
    "mul": lambda xs, p, a: ops.mul(xs[0], xs[1]),
    "concat": lambda xs, p, a: ops.concat(xs, a["axis"]),
}


def _prepare(op: Op, weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """The op's arrays by role; sparse weights rebuilt into the kernels' formats once."""
    p = {role: weights[key] for role, key in op.weights.items()}
    shape = tuple(op.attrs.get("shape", ()))
    if op.type == "conv_int8":   # weights laid out once for the int8 kernel where it offers that
        pack = getattr(int8, "pack_conv_weights", None)
        p["W_run"] = p["W"] if pack is None else pack(p["W"], int(op.attrs["group"]))
    elif op.type == "conv_sparse_csr":
        p["packed"] = sparse.CSRWeights(p["indptr"], p["indices"], p["values"], shape)
    elif op.type == "conv_sparse_2_4":
        p["packed"] = sparse.NMWeights(p["values"], p["indices"], int(op.attrs["n"]), int(op.attrs["m"]), shape)
    return p


def _chain_int8(steps: list[tuple[Op, dict]], outputs: set[str]) -> None:
    """Let an int8 conv hand its uint8 output straight to the int8 convs that alone read it.

    They quantize that tensor with the same (scale, zero point), taken from the same calibrated
    range, so ``quantize(dequantize(q)) == q`` and the round trip is skipped without changing a
    bit (``|q - zp| <= 255``: the float32 product and quotient land within far less than half a
    step of the integer)."""
    readers: dict[str, list[tuple[Op, dict]]] = {}
    for op, p in steps:
        for t in op.inputs:
            readers.setdefault(t, []).append((op, p))
    for op, p in steps:
        if op.type != "conv_int8" or op.outputs[0] in outputs:
            continue
        rs = readers.get(op.outputs[0], [])
        if rs and all(r.type == "conv_int8" and (r.attrs["x_scale"], r.attrs["x_zp"]) ==
                      (op.attrs["y_scale"], op.attrs["y_zp"]) for r, _ in rs):
            p["uint8_out"] = True
            for _, rp in rs:
                rp["uint8_in"] = True


class Executor:
    """``Executor(graph).run(x)``: the graph's output for one float32 NCHW input of its declared shape."""

    def __init__(self, graph: LoweredGraph, chain_int8: bool = True):
        self.graph = graph
        if len(graph.inputs) != 1 or len(graph.outputs) != 1:
            raise ConfigError(f"the executor runs graphs with one input and one output, this one has inputs "
                              f"{list(graph.inputs)} and outputs {list(graph.outputs)}")
        (self.input_name, self.input_shape), = graph.inputs.items()
        self._steps = [(op, _prepare(op, graph.weights)) for op in graph.ops]
        if chain_int8:
            _chain_int8(self._steps, set(graph.outputs))
        last_use: dict[str, int] = {}
        for i, op in enumerate(graph.ops):
            for t in op.inputs:
                last_use[t] = i
        keep = set(graph.outputs)
        self._free_after = [[t for t in dict.fromkeys(op.inputs) if last_use[t] == i and t not in keep]
                            for i, op in enumerate(graph.ops)]
        self.timings: dict[str, list[float]] = {op.name: [] for op in graph.ops}   # seconds per run
        self.peak_live = 0      # most tensors alive at once in the last run (freeing at work)

    def run(self, x: np.ndarray, timed: bool = False) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if x.shape != self.input_shape:
            raise ConfigError(f"the lowered graph takes input '{self.input_name}' of shape {self.input_shape}, "
                              f"got {x.shape}; resize/letterbox the image to the model's input size")
        env = {self.input_name: x}
        peak = 1
        for (op, p), free in zip(self._steps, self._free_after):
            t0 = time.perf_counter() if timed else 0.0
            if op.type in _NARY:
                y = _NARY[op.type]([env[t] for t in op.inputs], p, op.attrs)
            else:
                y = _UNARY[op.type](env[op.inputs[0]], p, op.attrs)
            if timed:
                self.timings[op.name].append(time.perf_counter() - t0)
            env[op.outputs[0]] = y
            peak = max(peak, len(env))
            for t in free:
                del env[t]
        self.peak_live = peak
        (out_name,) = self.graph.outputs
        return env[out_name]

    __call__ = run

    def profile(self, x: np.ndarray, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
        """Per-op median time in microseconds over ``repeats`` timed runs after ``warmup`` untimed ones."""
        if repeats < 1 or warmup < 0:
            raise ConfigError(f"profile: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
        for _ in range(warmup):
            self.run(x)
        for v in self.timings.values():
            v.clear()
        for _ in range(repeats):
            self.run(x, timed=True)
        return {name: 1e6 * statistics.median(v) for name, v in self.timings.items()}


def supported_op_types() -> set[str]:
    return set(_UNARY) | set(_NARY)
