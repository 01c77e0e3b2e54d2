"""The fp32 glue ops of a lowered detector, with ONNX semantics (NCHW float32).

Each op is the ONNX operator of the same name restricted to what the zoo detectors
export (see ``edge_compress.lower``): convs through im2col + BLAS (``np.dot``) and a
numba loop for depthwise, elementwise activations in NumPy, MaxPool with -inf
padding and ONNX's ceil-mode rule, nearest Resize with integer scales. Quantize /
dequantize follow QuantizeLinear / DequantizeLinear (round half to even, saturate).

A leaf module: NumPy and numba only. Tests compare every op with
``onnx.reference.ReferenceEvaluator`` on single-node models (tests/kernels/test_ops.py).
"""

from __future__ import annotations

import ctypes
import glob
import os

import numba
import numpy as np

from edge_compress.errors import ConfigError
from edge_compress.kernels.int8 import conv_geometry

# --------------------------------------------------------------------------- convolution


def _windows(xp: np.ndarray, kh: int, kw: int, stride, dilation, out_hw) -> np.ndarray:
    """(N, C, KH, KW, OH, OW) strided view of the padded input: the im2col columns, uncopied."""
    (sh, sw), (dh, dw), (oh, ow) = stride, dilation, out_hw
    n, c, hp, wp = xp.shape
    s = xp.strides
    return np.lib.stride_tricks.as_strided(
        xp, (n, c, kh, kw, oh, ow), (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw), writeable=False)


def _pad(x: np.ndarray, pads, value: float = 0.0) -> np.ndarray:
    pt, pl, pb, pr = pads
    if not any(pads):
        return x
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=value)


@numba.njit(cache=True, parallel=True)
def _depthwise(xp, w, bias, sh, sw, dh, dw, out):
    """out[n, c] = bias + sum_k xp[n, c // m] * w[c, 0]: channel multiplier m = OC / C; parallel over
    (n, oc). Taps outermost, output row innermost: a contiguous multiply-add along the row that
    LLVM vectorises at stride 1 (per pixel, the taps still add in (kh, kw) order after the bias)."""
    batch, c_in = xp.shape[0], xp.shape[1]
    oc_n, _, kh_n, kw_n = w.shape
    mult = oc_n // c_in
    _, _, oh_n, ow_n = out.shape
    for task in numba.prange(batch * oc_n):
        n = task // oc_n
        oc = task % oc_n
        ic = oc // mult
        o = out[n, oc]
        o[:, :] = bias[oc]
        for kh in range(kh_n):
            for kw in range(kw_n):
                wv = w[oc, 0, kh, kw]
                for oh in range(oh_n):
                    row = xp[n, ic, oh * sh + kh * dh]
                    base = kw * dw
                    for ow in range(ow_n):
                        o[oh, ow] += row[base + ow * sw] * wv


def conv2d_fp32(x, w, bias=None, stride=1, padding=0, dilation=1, groups: int = 1) -> np.ndarray:
    """ONNX Conv, NCHW float32: x (N, C, H, W), w (OC, C/groups, KH, KW), zero padding.

    Dense and grouped convs are im2col + one ``np.dot`` per group (BLAS); depthwise
    (``w.shape[1] == 1`` and ``groups == C``) is a direct numba loop, where im2col would
    multiply 1-row matrices.
    """
    x = np.ascontiguousarray(x, np.float32)
    w = np.ascontiguousarray(w, np.float32)
    if x.ndim != 4 or w.ndim != 4:
        raise ConfigError(f"conv2d_fp32 needs x (N, C, H, W) and w (OC, C/groups, KH, KW), got {x.shape}, {w.shape}")
    n, c, h, wd = x.shape
    oc, icg, kh, kw = w.shape
    if groups < 1 or c % groups or oc % groups or icg != c // groups:
        raise ConfigError(f"groups={groups} does not fit x with {c} channels and w {w.shape}")
    stride, dil, pads, (oh, ow) = conv_geometry(h, wd, kh, kw, stride, padding, dilation)
    b = np.zeros(oc, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32).reshape(oc)
    xp = _pad(x, pads)
    if groups == c and icg == 1:
        out = np.empty((n, oc, oh, ow), np.float32)
        _depthwise(np.ascontiguousarray(xp), w, b, stride[0], stride[1], dil[0], dil[1], out)
        return out
    if kh == kw == 1 and stride == (1, 1) and not any(pads):
        cols = x.reshape(n, c, 1, 1, h * wd)           # a pointwise conv reads the activation as is
    else:
        cols = _windows(xp, kh, kw, stride, dil, (oh, ow))               # (N, C, KH, KW, OH, OW)
    out = np.empty((n, oc, oh * ow), np.float32)
    ocg = oc // groups
    for g in range(groups):
        wg = w[g * ocg:(g + 1) * ocg].reshape(ocg, -1)
        for i in range(n):
            cg = cols[i, g * icg:(g + 1) * icg].reshape(icg * kh * kw, oh * ow)
            out[i, g * ocg:(g + 1) * ocg] = np.dot(wg, cg)
    out += b[None, :, None]
    return out.reshape(n, oc, oh, ow)


def set_blas_threads(threads: int) -> bool:
    """Limit the BLAS behind ``np.dot`` (the fp32 convs) to ``threads``, so a runner's thread count
    covers them as it covers the numba kernels. Works with the OpenBLAS that NumPy wheels bundle
    (``numpy.libs/libscipy_openblas*``); returns False, changing nothing, for any other BLAS."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas*.so"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for fn in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            if hasattr(lib, fn):
                getattr(lib, fn)(ctypes.c_int(int(threads)))
                return True
    return False


# --------------------------------------------------------------------------- elementwise


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.add(a, b, dtype=np.float32)


def mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise product with NumPy (= ONNX multidirectional) broadcasting: SE gates (N, C, 1, 1)."""
    return np.multiply(a, b, dtype=np.float32)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0))


def clip(x: np.ndarray, lo: float | None, hi: float | None) -> np.ndarray:
    """ONNX Clip (ReLU6 is ``clip(x, 0, 6)``); a missing bound is no bound."""
    lo_ = -np.inf if lo is None else lo
    hi_ = np.inf if hi is None else hi
    return np.clip(x, np.float32(lo_), np.float32(hi_)).astype(np.float32, copy=False)


@numba.njit(cache=True)
def _leaky_relu(x, alpha, out):
    for i in range(x.size):
        v = x[i]
        out[i] = v if v >= 0 else v * alpha


@numba.njit(cache=True)
def _hard_sigmoid(x, alpha, beta, times_x, out):
    """max(0, min(1, alpha * x + beta)), times x for HardSwish: one pass instead of NumPy's four."""
    for i in range(x.size):
        v = x[i]
        g = min(max(v * alpha + beta, np.float32(0)), np.float32(1))
        out[i] = v * g if times_x else g


def _flat_call(kernel, x: np.ndarray, *args) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty_like(x)
    kernel(x.reshape(-1), *args, out.reshape(-1))
    return out


def leaky_relu(x: np.ndarray, alpha: float) -> np.ndarray:
    return _flat_call(_leaky_relu, x, np.float32(alpha))


def sigmoid(x: np.ndarray) -> np.ndarray:
    # exp of -|x| never overflows; the two branches are the same function.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(np.float32, copy=False)


def hard_sigmoid(x: np.ndarray, alpha: float = 0.2, beta: float = 0.5) -> np.ndarray:
    """ONNX HardSigmoid: ``max(0, min(1, alpha * x + beta))``."""
    return _flat_call(_hard_sigmoid, x, np.float32(alpha), np.float32(beta), False)


def hard_swish(x: np.ndarray) -> np.ndarray:
    """ONNX HardSwish: ``x * max(0, min(1, x / 6 + 0.5))`` (MobileNetV3)."""
    return _flat_call(_hard_sigmoid, x, np.float32(1 / 6), np.float32(0.5), True)


def binarize(x: np.ndarray) -> np.ndarray:
    """``Where(x >= 0, 1, -1)``: the sign activation of a binary layer, with sign(0) = +1."""
    return np.where(x >= 0, np.float32(1), np.float32(-1))


# --------------------------------------------------------------------------- shape ops


def concat(xs, axis: int = 1) -> np.ndarray:
    return np.concatenate(list(xs), axis=axis)


def slice_(x: np.ndarray, starts, ends, axes=None, steps=None) -> np.ndarray:
    """ONNX Slice: per-axis ``[start:end:step]`` (ends past the size, as INT64_MAX, clamp)."""
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a) % x.ndim] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


def reshape(x: np.ndarray, shape) -> np.ndarray:
    """ONNX Reshape with ``allowzero=0``: a 0 copies the input's size on that axis, -1 is inferred."""
    shape = [x.shape[i] if int(d) == 0 else int(d) for i, d in enumerate(shape)]
    return x.reshape(shape)


def transpose(x: np.ndarray, perm) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, [int(p) for p in perm]))


def pad_constant(x: np.ndarray, pads, value: float = 0.0) -> np.ndarray:
    """ONNX Pad (mode constant) with ONNX ``pads`` order: all begins, then all ends."""
    r = x.ndim
    if len(pads) != 2 * r or min(pads) < 0:
        raise ConfigError(f"pads must hold {2 * r} non-negative values (begins then ends), got {list(pads)}")
    return np.pad(x, [(int(pads[i]), int(pads[i + r])) for i in range(r)], constant_values=np.float32(value))


def resize_nearest(x: np.ndarray, scale_h: int, scale_w: int) -> np.ndarray:
    """ONNX Resize mode=nearest, asymmetric coordinates, nearest_mode=floor, integer scales:
    output pixel i reads input pixel ``floor(i / scale)``, i.e. each pixel repeated."""
    if scale_h < 1 or scale_w < 1:
        raise ConfigError(f"resize_nearest needs integer scales >= 1, got {scale_h}, {scale_w}")
    return np.repeat(np.repeat(x, scale_h, axis=2), scale_w, axis=3)


# --------------------------------------------------------------------------- pooling


def pool_output_size(size: int, k: int, s: int, pad_begin: int, pad_end: int, ceil_mode: bool) -> int:
    """ONNX pooling output length; in ceil mode a last window that starts in the end padding is dropped."""
    span = size + pad_begin + pad_end - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + pad_begin:
        out -= 1
    return out


def maxpool(x: np.ndarray, kernel, stride, pads=(0, 0, 0, 0), ceil_mode: bool = False) -> np.ndarray:
    """ONNX MaxPool (no dilation): padding and the ceil-mode overhang hold -inf, so they never win."""
    kh, kw = kernel
    sh, sw = stride
    pt, pl, pb, pr = pads
    n, c, h, w = x.shape
    oh = pool_output_size(h, kh, sh, pt, pb, ceil_mode)
    ow = pool_output_size(w, kw, sw, pl, pr, ceil_mode)
    if oh < 1 or ow < 1:
        raise ConfigError(f"maxpool kernel {kh}x{kw} is larger than the padded input {h + pt + pb}x{w + pl + pr}")
    need_h = (oh - 1) * sh + kh
    need_w = (ow - 1) * sw + kw
    xp = np.full((n, c, max(need_h, h + pt), max(need_w, w + pl)), -np.inf, np.float32)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    out = None
    for i in range(kh):   # KH*KW elementwise maxima of strided planes: far faster than a 6-D reduction
        for j in range(kw):
            tap = xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            out = tap.copy() if out is None else np.maximum(out, tap, out=out)
    return out


def global_avgpool(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=(2, 3), keepdims=True, dtype=np.float32)


# --------------------------------------------------------------------------- quantisation


def quant_params(lo: float, hi: float, dtype=np.uint8) -> tuple[float, int]:
    """(scale, zero point) of the asymmetric 8-bit grid over ``[lo, hi]`` widened to hold 0,
    as ONNX Runtime's quantizer computes them (so 0.0 is exact: padding and ReLU are lossless)."""
    info = np.iinfo(dtype)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / (info.max - info.min)
    if scale == 0.0:
        return 1.0, 0
    zp = int(np.clip(np.rint(info.min - lo / scale), info.min, info.max))
    return float(np.float32(scale)), zp


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype=np.uint8) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)``."""
    info = np.iinfo(dtype)
    q = np.rint(np.asarray(x, np.float32) / np.float32(scale)) + np.float32(zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` in float32."""
    return ((q.astype(np.int32) - np.int32(zero_point)).astype(np.float32) * np.float32(scale))
