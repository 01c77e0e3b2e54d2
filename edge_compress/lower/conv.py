"""One ONNX Conv -> one kernels op, per choice: the check (why a conv cannot take a choice) and the packing.

- fp32: weights as they are.
- int8: integer-arithmetic-only conv (Jacob et al., arXiv:1712.05877): uint8 activations on the
  calibrated ranges (asymmetric, 0 exact), int8 symmetric per-output-channel weights, int32 bias at
  ``s_x * s_w``, requantised with integer multipliers/shifts; a following Relu/Clip is fused as
  the ``[qmin, qmax]`` clamp.
- binary: the pattern ``Where(GreaterOrEqual(x, 0), 1, -1) [-> Pad(1.0)] -> Conv(pads 0)`` written
  by ``edge_compress.compress.binary`` (XNOR-Net, arXiv:1603.05279) with weights ``+-alpha[c]``,
  lowered to sign bits of ``x`` + the XNOR-popcount conv with scale ``alpha`` (+1 padding).
- sparse_csr / sparse_2_4: the weights as exported (pruned zeros survive export), packed as CSR or
  2:4 for ``kernels.sparse``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_compress.errors import ConfigError
from edge_compress.kernels import binary, int8, ops, sparse
from edge_compress.kernels.graph import Op
from edge_compress.lower.onnx_graph import OnnxGraph, unsupported

ALPHA_RTOL = 1e-5   # |W| of a binary conv's output channel may differ this much (BN folding rounds)


@dataclass(frozen=True)
class ConvInfo:
    node: Any
    x: str
    y: str
    w: np.ndarray
    b: np.ndarray
    stride: list[int]
    pads: list[int]       # (top, left, bottom, right) = ONNX pads order for 2-D
    dilation: list[int]
    group: int

    @property
    def depthwise(self) -> bool:
        return self.group > 1 and self.w.shape[1] == 1


def conv_info(g: OnnxGraph, node) -> ConvInfo:
    a = g.attrs(node)
    w = np.asarray(g.const(node, 1, "weight"), np.float32)
    if w.ndim != 4:
        raise unsupported(node, f"only 2-D convs are supported, weight has shape {w.shape}")
    b = g.const(node, 2, "bias", optional=True)
    b = np.zeros(w.shape[0], np.float32) if b is None else np.asarray(b, np.float32)
    return ConvInfo(node, node.input[0], node.output[0], w, b, list(a.get("strides", [1, 1])),
                    list(a.get("pads", [0, 0, 0, 0])), list(a.get("dilations", [1, 1])), int(a.get("group", 1)))


# --------------------------------------------------------------------------- checks


def binary_source(g: OnnxGraph, tensor: str) -> tuple[str, list[int]] | None:
    """(pre-sign tensor x, +1 pads (t, l, b, r)) when ``tensor`` is a binarised activation, else None."""
    pads = [0, 0, 0, 0]
    node = g.producer.get(tensor)
    if node is not None and node.op_type == "Pad":
        p = g.consts.get(node.input[1]) if len(node.input) > 1 else None
        value = g.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.float32(0)
        if p is None or len(p) != 8 or any(p[[0, 1, 4, 5]]) or len(node.input) > 3 or float(value) != 1.0:
            return None
        pads = [int(p[2]), int(p[3]), int(p[6]), int(p[7])]
        node = g.producer.get(node.input[0])
    x = binarize_input(g, node)
    return None if x is None else (x, pads)


def binarize_input(g: OnnxGraph, node) -> str | None:
    """x when ``node`` is ``Where(GreaterOrEqual(x, 0), 1, -1)``, else None."""
    if node is None or node.op_type != "Where":
        return None
    ge = g.producer.get(node.input[0])
    if ge is None or ge.op_type != "GreaterOrEqual":
        return None
    zero, one, minus = (g.consts.get(t) for t in (ge.input[1], node.input[1], node.input[2]))
    if any(v is None or np.size(v) != 1 for v in (zero, one, minus)):
        return None
    return ge.input[0] if (float(zero), float(one), float(minus)) == (0.0, 1.0, -1.0) else None


def why_not(g: OnnxGraph, c: ConvInfo, choice: str) -> str | None:
    """Why conv ``c`` cannot run on ``choice`` (None: it can)."""
    if choice in ("fp32", "int8"):
        return None
    if c.group != 1:
        kind = "depthwise" if c.depthwise else f"grouped (group={c.group})"
        return (f"it is a {kind} conv; the {choice} kernels take group=1 only (a depthwise conv has only "
                f"KH*KW={c.w.shape[2] * c.w.shape[3]} weights per output channel: nothing to gain)")
    if choice == "binary":
        return _why_not_binary(g, c)
    if choice == "sparse_2_4":
        if c.w.shape[1] % 4:
            return f"its {c.w.shape[1]} input channels are not a multiple of 4 (2:4 groups run along them)"
        try:
            sparse.NMWeights.from_conv_weight(c.w, 2, 4)
        except ConfigError as e:
            return f"its weights do not have the 2:4 pattern ({e})"
    return None


def _why_not_binary(g: OnnxGraph, c: ConvInfo) -> str | None:
    if binary_source(g, c.x) is None:
        src = g.producer.get(c.x)
        return (f"its input '{c.x}' is not a binary activation (produced by "
                f"{src.op_type + ' ' + src.name if src is not None else 'the graph input'}); binary lowers "
                "only Where(GreaterOrEqual(x, 0), 1, -1) [-> Pad(value 1.0)] -> Conv, as "
                "edge_compress.compress.binary exports it")
    if any(c.pads):
        return f"the Conv pads {c.pads} with 0, which a sign bit cannot hold (pad with Pad(value=1.0) instead)"
    mag = np.abs(c.w.reshape(c.w.shape[0], -1))
    lo, hi = mag.min(axis=1), mag.max(axis=1)
    bad = np.flatnonzero((lo == 0) | (hi - lo > ALPHA_RTOL * hi))
    if bad.size:
        o = int(bad[0])
        return (f"its weights are not +-alpha per output channel (channel {o}: |W| in [{lo[o]:.6g}, {hi[o]:.6g}]; "
                f"{bad.size} channel(s) differ); binarise the layer first (edge_compress.compress.binary)")
    return None


# --------------------------------------------------------------------------- lowering


class ConvLowering:
    """Emits the op of one conv; ``weights`` collects the arrays under unique keys."""

    def __init__(self, g: OnnxGraph, weights: dict[str, np.ndarray], ranges: dict[str, tuple[float, float]] | None):
        self.g, self.weights, self.ranges = g, weights, ranges

    def _keys(self, arrays: dict[str, np.ndarray]) -> dict[str, str]:
        base = f"{len(self.weights):05d}"
        out = {}
        for role, arr in arrays.items():
            key = f"{base}.{role}"
            self.weights[key] = np.ascontiguousarray(arr)
            out[role] = key
        return out

    def _geometry(self, c: ConvInfo) -> dict[str, Any]:
        return {"stride": c.stride, "pads": c.pads, "dilation": c.dilation}

    def emit(self, c: ConvInfo, choice: str, act=None) -> Op:
        name, y = c.node.name, (act.output[0] if act is not None else c.y)
        kernel = [int(c.w.shape[2]), int(c.w.shape[3])]
        if choice == "fp32":
            return Op(name, "conv", (c.x,), (y,), {**self._geometry(c), "group": c.group},
                      self._keys({"W": c.w, "B": c.b}))
        if choice == "int8":
            return self._int8(c, y, act)
        if choice == "binary":
            x, pads = binary_source(self.g, c.x)
            alpha = np.abs(c.w.reshape(c.w.shape[0], -1)).max(axis=1).astype(np.float32)
            attrs = {"stride": c.stride, "pads": pads, "dilation": c.dilation, "in_channels": int(c.w.shape[1]),
                     "kernel": kernel}
            return Op(name, "conv_binary", (x,), (y,), attrs,
                      self._keys({"W": binary.pack_bits(c.w, axis=1), "scale": alpha, "B": c.b}))
        attrs = {**self._geometry(c), "in_channels": int(c.w.shape[1]), "kernel": kernel,
                 "shape": [int(c.w.shape[0]), int(c.w[0].size)]}
        if choice == "sparse_csr":
            p = sparse.CSRWeights.from_conv_weight(c.w)
            return Op(name, "conv_sparse_csr", (c.x,), (y,), attrs,
                      self._keys({"indptr": p.indptr, "indices": p.indices, "values": p.values, "B": c.b}))
        p = sparse.NMWeights.from_conv_weight(c.w, 2, 4)
        return Op(name, "conv_sparse_2_4", (c.x,), (y,), {**attrs, "n": p.n, "m": p.m},
                  self._keys({"values": p.values, "indices": p.indices, "B": c.b}))

    def _range(self, tensor: str, c: ConvInfo) -> tuple[float, float]:
        if self.ranges is None or tensor not in self.ranges:
            raise ConfigError(f"int8 layer '{c.node.name}': the calibration has no range for tensor '{tensor}'; "
                              "calibrate this same fp32 graph (edge_compress.quant.calibrate) and pass it")
        return self.ranges[tensor]

    def _int8(self, c: ConvInfo, y: str, act) -> Op:
        sx, zx = ops.quant_params(*self._range(c.x, c))
        sy, zy = ops.quant_params(*self._range(y, c))
        amax = np.abs(c.w.reshape(c.w.shape[0], -1)).max(axis=1).astype(np.float64)
        sw = np.where(amax > 0, amax / 127.0, 1.0)
        wq = np.clip(np.rint(c.w / sw[:, None, None, None]), -127, 127).astype(np.int8)
        acc_scale = np.float64(sx) * sw
        bq = np.clip(np.rint(c.b / acc_scale), -(2**31), 2**31 - 1).astype(np.int32)
        mult, shift = int8.quantize_multiplier(acc_scale / np.float64(sy))
        qmin, qmax = self._clamp(act, sy, zy)
        attrs = {**self._geometry(c), "group": c.group, "x_scale": sx, "x_zp": zx, "y_scale": sy, "y_zp": zy,
                 "qmin": qmin, "qmax": qmax}
        return Op(c.node.name, "conv_int8", (c.x,), (y,), attrs,
                  self._keys({"W": wq, "B": bq, "multiplier": mult, "shift": shift}))

    def _clamp(self, act, sy: float, zy: int) -> tuple[int, int]:
        """The fused activation as a uint8 clamp: Relu -> [zy, 255], Clip(lo, hi) -> their grid points."""
        if act is None:
            return 0, 255
        if act.op_type == "Relu":
            return zy, 255
        lo, hi = clip_bounds(self.g, act)
        qlo = 0 if lo is None else int(np.clip(zy + np.rint(lo / sy), 0, 255))
        qhi = 255 if hi is None else int(np.clip(zy + np.rint(hi / sy), 0, 255))
        return qlo, qhi


def clip_bounds(g: OnnxGraph, node) -> tuple[float | None, float | None]:
    lo = g.const(node, 1, "min", optional=True)
    hi = g.const(node, 2, "max", optional=True)
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def fusable_activation(g: OnnxGraph, c: ConvInfo):
    """The Relu/Clip that alone reads the conv's output (fused into an int8 conv), else None."""
    nxt = g.only_consumer(c.y)
    return nxt if nxt is not None and nxt.op_type in ("Relu", "Clip") else None
