"""Integer-only int8 kernels: GEMM, conv2d (grouped, depthwise) and fixed-point requantisation.

The arithmetic is that of integer-arithmetic-only inference (Jacob et al., CVPR 2018,
arXiv:1712.05877) as implemented by gemmlowp and TFLite: products of zero-point-corrected
int8/uint8 values accumulate in int32, and the real rescale ``s_x * s_w / s_y`` is applied
as an int32 multiplier plus a power-of-two shift (``quantize_multiplier``), with
SaturatingRoundingDoublingHighMul followed by RoundingDivideByPOT. Fused ReLU / ReLU6 are
just a tighter ``[qmin, qmax]`` clamp.

A leaf module: NumPy and numba only. Compiled kernels are cached on disk (``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np

from edge_compress.errors import ConfigError

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- requantisation


def quantize_multiplier(real_scale) -> tuple[np.ndarray, np.ndarray]:
    """Split ``real_scale`` (scalar or per-channel array, > 0) into ``multiplier * 2**(shift - 31)``.

    ``multiplier`` is an int32 in [2**30, 2**31) (Q0.31 of a value in [0.5, 1)); ``shift`` is
    the power of two (positive = left shift), as TFLite's ``QuantizeMultiplier``.
    Scales too small to represent (shift < -31) become multiplier 0 (output = zero point).
    """
    s = np.asarray(real_scale, dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ConfigError(f"real_scale must be finite and > 0, got {s.ravel()[:8]}; "
                          "pass s_x * s_w / s_y of the layer")
    q, shift = np.frexp(s)  # s = q * 2**shift, q in [0.5, 1)
    q_fixed = np.round(q * 2.0**31).astype(np.int64)
    carry = q_fixed == 2**31  # q rounded up to 1.0
    q_fixed = np.where(carry, q_fixed // 2, q_fixed)
    shift = np.where(carry, shift + 1, shift).astype(np.int64)
    if np.any(shift > 30):
        raise ConfigError(f"real_scale {s.max()} is too large for a fixed-point multiplier (needs < 2**30)")
    tiny = shift < -31
    q_fixed = np.where(tiny, 0, q_fixed)
    shift = np.where(tiny, 0, shift)
    return q_fixed.astype(np.int32), shift.astype(np.int32)


@numba.njit(cache=True, inline="always")
def _srdhm(a, b):
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 values held in int64."""
    if a == _INT32_MIN and b == _INT32_MIN:
        return _INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else (1 - (1 << 30))
    v = ab + nudge
    # C integer division truncates toward zero; numba's // floors.
    return v >> 31 if v >= 0 else -((-v) >> 31)


@numba.njit(cache=True, inline="always")
def _rdbpot(x, exponent):
    """gemmlowp RoundingDivideByPOT: x / 2**exponent rounded half away from zero."""
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


@numba.njit(cache=True, inline="always")
def _mul_by_quantized_multiplier(x, multiplier, shift):
    """TFLite MultiplyByQuantizedMultiplier; the left shift saturates to int32 instead of wrapping."""
    left = shift if shift > 0 else 0
    right = 0 if shift > 0 else -shift
    v = x << left
    v = min(max(v, _INT32_MIN), _INT32_MAX)
    return _rdbpot(_srdhm(v, multiplier), right)


@numba.njit(cache=True, parallel=True)
def _requantize_2d(acc, multiplier, shift, out_zp, qmin, qmax, out):
    rows, chans = acc.shape
    for r in numba.prange(rows):
        for c in range(chans):
            v = _mul_by_quantized_multiplier(np.int64(acc[r, c]), np.int64(multiplier[c]), np.int64(shift[c]))
            v += out_zp
            out[r, c] = min(max(v, qmin), qmax)


def _dtype_range(out_dtype) -> tuple[int, int]:
    dt = np.dtype(out_dtype)
    if dt not in (np.dtype(np.int8), np.dtype(np.uint8)):
        raise ConfigError(f"out_dtype must be int8 or uint8, got {dt}")
    info = np.iinfo(dt)
    return int(info.min), int(info.max)


def requantize(acc, multiplier, shift, out_zp: int = 0, qmin: int | None = None, qmax: int | None = None,
               *, axis: int = -1, out_dtype=np.int8) -> np.ndarray:
    """int32 accumulators -> int8/uint8: ``clamp(round(acc * M * 2**(shift-31)) + out_zp, qmin, qmax)``.

    ``multiplier``/``shift`` are scalars or per-channel arrays along ``axis`` (from
    ``quantize_multiplier``). ``qmin``/``qmax`` default to the range of ``out_dtype``; a fused
    ReLU is ``qmin=out_zp``, ReLU6 adds ``qmax=out_zp + round(6 / s_y)``.
    """
    acc = np.asarray(acc)
    if acc.dtype != np.int32:
        raise ConfigError(f"acc must be int32 accumulators, got {acc.dtype}")
    lo, hi = _dtype_range(out_dtype)
    qmin = lo if qmin is None else int(qmin)
    qmax = hi if qmax is None else int(qmax)
    if not lo <= qmin <= qmax <= hi:
        raise ConfigError(f"need {lo} <= qmin <= qmax <= {hi} for {np.dtype(out_dtype)}, got qmin={qmin}, qmax={qmax}")
    moved = np.moveaxis(acc, axis, -1) if acc.ndim else acc.reshape(1)
    chans = moved.shape[-1]
    mult = _per_channel(multiplier, chans, "multiplier", np.int32)
    shf = _per_channel(shift, chans, "shift", np.int32)
    flat = np.ascontiguousarray(moved).reshape(-1, chans)
    out = np.empty(flat.shape, dtype=out_dtype)
    _requantize_2d(flat, mult, shf, np.int64(out_zp), np.int64(qmin), np.int64(qmax), out)
    out = out.reshape(moved.shape)
    return np.moveaxis(out, -1, axis) if acc.ndim else out.reshape(())


def _per_channel(value, chans: int, name: str, dtype) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return np.full(chans, arr, dtype=dtype)
    if arr.shape != (chans,):
        raise ConfigError(f"{name} must be a scalar or have {chans} per-channel values, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


# --------------------------------------------------------------------------- argument checks


def _check_zero_point(name: str, zp, dtype) -> None:
    info = np.iinfo(dtype)
    z = np.asarray(zp)
    if z.size and (z.min() < info.min or z.max() > info.max):
        raise ConfigError(f"{name} must lie in the {np.dtype(dtype).name} range [{info.min}, {info.max}], "
                          f"got {z.ravel()[:8]}")


def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if np.ndim(v) == 0 else tuple(v)
    if len(t) != 2 or min(t) < 1:
        raise ConfigError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return int(t[0]), int(t[1])


def _pads(padding) -> tuple[int, int, int, int]:
    """int | (ph, pw) | ONNX order (top, left, bottom, right) -> (top, left, bottom, right)."""
    t = (padding,) * 4 if np.ndim(padding) == 0 else tuple(padding)
    if len(t) == 2:
        t = (t[0], t[1], t[0], t[1])
    if len(t) != 4 or min(t) < 0:
        raise ConfigError(f"padding must be an int >= 0, (ph, pw) or (top, left, bottom, right), got {padding!r}")
    return tuple(int(p) for p in t)  # type: ignore[return-value]


def conv_geometry(h: int, wd: int, kh: int, kw: int, stride, padding, dilation):
    """Checked conv arguments and output size: ((sh, sw), (dh, dw), (top, left, bottom, right), (oh, ow))."""
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    pt, pl, pb, pr = _pads(padding)
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ConfigError(f"kernel {kh}x{kw} (dilation {dh},{dw}) is larger than the padded input "
                          f"{h + pt + pb}x{wd + pl + pr}")
    return (sh, sw), (dh, dw), (pt, pl, pb, pr), (oh, ow)


# --------------------------------------------------------------------------- GEMM


@numba.njit(cache=True, parallel=True)
def _gemm_i32(a, bt, out):
    m_rows, k_dim = a.shape
    n_cols = bt.shape[0]
    for m in numba.prange(m_rows):
        for n in range(n_cols):
            acc = np.int32(0)
            for k in range(k_dim):
                acc += a[m, k] * bt[n, k]
            out[m, n] = acc


def _check_int8(name: str, arr: np.ndarray, allow_uint8: bool) -> None:
    ok = (np.int8, np.uint8) if allow_uint8 else (np.int8,)
    if arr.dtype not in [np.dtype(t) for t in ok]:
        raise ConfigError(f"{name} must be {' or '.join(np.dtype(t).name for t in ok)}, got {arr.dtype}")


def gemm_s8s8_s32(a, b, a_zp: int = 0, b_zp=0) -> np.ndarray:
    """``(a - a_zp) @ (b - b_zp)`` with int32 accumulation: a (M, K) int8/uint8, b (K, N) int8.

    ``b_zp`` is a scalar or one zero point per output column (per-channel weights).
    """
    a = np.asarray(a)
    b = np.asarray(b)
    _check_int8("a", a, allow_uint8=True)
    _check_int8("b", b, allow_uint8=False)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ConfigError(f"gemm needs a (M, K) and b (K, N), got {a.shape} and {b.shape}")
    bzp = _per_channel(b_zp, b.shape[1], "b_zp", np.int32)
    _check_zero_point("a_zp", a_zp, a.dtype)
    _check_zero_point("b_zp", bzp, b.dtype)
    # Zero points are folded in once (O(MK + KN)); the differences lie in [-255, 255], so the
    # inner loop is a contiguous int16 dot with int32 sums.
    a16 = a.astype(np.int16) - np.int16(a_zp)
    bt16 = np.ascontiguousarray((b.astype(np.int16) - bzp.astype(np.int16)[None, :]).T)
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.int32)
    _gemm_i32(a16, bt16, out)
    return out


# --------------------------------------------------------------------------- conv2d


@numba.njit(cache=True, parallel=True)
def _conv_i32(xp, w, bias, sh, sw, dh, dw, groups, out):
    """Direct conv of a zero-point-corrected, padded NHWC input xp (N, Hp, Wp, C) with w (OC, KH, KW, C/g).

    Channels last make the innermost loop a contiguous int16 dot product that LLVM vectorises;
    one parallel task per output row (n, oh).
    """
    batch = xp.shape[0]
    oc_total, kh_n, kw_n, icg = w.shape
    _, _, oh_n, ow_n = out.shape
    ocg = oc_total // groups
    for task in numba.prange(batch * oh_n):
        n = task // oh_n
        oh = task % oh_n
        for ow in range(ow_n):
            for oc in range(oc_total):
                ic0 = (oc // ocg) * icg
                acc = np.int32(bias[oc])
                for kh in range(kh_n):
                    ih = oh * sh + kh * dh
                    for kw in range(kw_n):
                        xr = xp[n, ih, ow * sw + kw * dw, ic0:ic0 + icg]
                        wr = w[oc, kh, kw]
                        for ic in range(icg):
                            acc += xr[ic] * wr[ic]
                out[n, oc, oh, ow] = acc


def conv2d_int8(x, w, bias=None, x_zp: int = 0, w_zp=0, stride=1, padding=0, dilation=1, groups: int = 1,
                multiplier=None, shift=None, out_zp: int = 0, qmin: int | None = None, qmax: int | None = None,
                out_dtype=np.int8) -> np.ndarray:
    """Quantised conv2d, NCHW: x int8/uint8 (N, C, H, W), w int8 (OC, C/groups, KH, KW).

    Returns the int32 accumulators ``sum (x - x_zp)(w - w_zp) + bias`` (ONNX ConvInteger plus
    bias) when ``multiplier`` is None, else those requantised per output channel to
    ``out_dtype`` (ONNX QLinearConv / TFLite CONV_2D; fused ReLU/ReLU6 via ``qmin``/``qmax``).
    Depthwise is ``groups == C == OC`` (or a channel multiplier, OC = k * C).

    Padding holds the *input zero point*: real 0.0 is represented by ``x_zp`` (real =
    s_x * (q - x_zp)), so this is exactly the zero padding of the float conv, and the padded
    taps contribute nothing to the accumulator (as ONNX ConvInteger/QLinearConv specify).
    """
    x = np.asarray(x)
    w = np.asarray(w)
    _check_int8("x", x, allow_uint8=True)
    _check_int8("w", w, allow_uint8=False)
    if x.ndim != 4 or w.ndim != 4:
        raise ConfigError(f"conv2d_int8 needs x (N, C, H, W) and w (OC, C/groups, KH, KW), got {x.shape}, {w.shape}")
    n, c, h, wd = x.shape
    oc, icg, kh, kw = w.shape
    if groups < 1 or c % groups or oc % groups or icg != c // groups:
        raise ConfigError(f"groups={groups} does not fit x with {c} channels and w {w.shape} "
                          f"(need C and OC divisible by groups and w.shape[1] == C/groups)")
    (sh, sw), (dh, dw), (pt, pl, pb, pr), (oh, ow) = conv_geometry(h, wd, kh, kw, stride, padding, dilation)
    b32 = np.zeros(oc, np.int32) if bias is None else _per_channel(bias, oc, "bias", np.int32)
    wzp = _per_channel(w_zp, oc, "w_zp", np.int32)
    # Subtract the zero points once; padding with 0 here == padding x with x_zp (see docstring).
    # x - x_zp and w - w_zp lie in [-255, 255]: int16 operands, products and sums in int32.
    _check_zero_point("x_zp", x_zp, x.dtype)
    _check_zero_point("w_zp", wzp, w.dtype)
    xs = x.astype(np.int16) - np.int16(x_zp)
    xp = np.ascontiguousarray(np.pad(xs, ((0, 0), (0, 0), (pt, pb), (pl, pr))).transpose(0, 2, 3, 1))
    ws = np.ascontiguousarray((w.astype(np.int16) - wzp.astype(np.int16)[:, None, None, None]).transpose(0, 2, 3, 1))
    acc = np.empty((n, oc, oh, ow), dtype=np.int32)
    _conv_i32(xp, ws, b32, sh, sw, dh, dw, groups, acc)
    if multiplier is None:
        return acc
    if shift is None:
        raise ConfigError("requantised conv needs both multiplier and shift (from quantize_multiplier)")
    return requantize(acc, multiplier, shift, out_zp, qmin, qmax, axis=1, out_dtype=out_dtype)
