"""Integer-only int8 kernels: GEMM, conv2d (grouped, depthwise) and fixed-point requantisation.

The arithmetic is that of integer-arithmetic-only inference (Jacob et al., CVPR 2018,
arXiv:1712.05877) as implemented by gemmlowp and TFLite: products of zero-point-corrected
int8/uint8 values accumulate in int32, and the real rescale ``s_x * s_w / s_y`` is applied
as an int32 multiplier plus a power-of-two shift (``quantize_multiplier``), with
SaturatingRoundingDoublingHighMul followed by RoundingDivideByPOT. Fused ReLU / ReLU6 are
just a tighter ``[qmin, qmax]`` clamp.

Speed: a conv is an implicit GEMM over "phase planes" (``phase_planes``): the padded input
split by stride phase into planes whose rows are padded to a common width, so the input
pixels under one kernel tap for a run of consecutive outputs are *contiguous* in memory and
no im2col is built. The inner tile (``tile_intrinsic``) is written in LLVM IR: a block of
output channels x a block of output pixels held in vector registers, one weight word
broadcast per channel and one activation vector load per pixel block and tap. On a CPU with
AVX-512 VNNI the int8 tile is VPDPBUSD (64 u8 x s8 products into 16 int32 per instruction,
the instruction ONNX Runtime's MLAS uses); without it the direct int16 kernel runs.
The requantisation is fused into a vectorised epilogue (16 outputs per step, the
fixed-point multiply in VPMULDQ lanes). Depthwise convs (one input channel per group) run a
separate direct kernel (``_depthwise_direct``): each channel's padded image, row tiles of 16
to 64 output pixels held in registers over the taps, requantised in registers and stored
with a masked store straight into the output; stride 2 reads every other byte, so no
stride-phase planes are built.

A leaf module: NumPy and numba only. Compiled kernels are cached on disk (``cache=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

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


_RANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}   # np.iinfo costs ~1 us a call


def _dtype_range(out_dtype) -> tuple[int, int]:
    dt = np.dtype(out_dtype)
    if dt not in _RANGE:
        raise ConfigError(f"out_dtype must be int8 or uint8, got {dt}")
    return _RANGE[dt]


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
    if type(value) is np.ndarray and value.shape == (chans,) and value.dtype == dtype and value.flags.c_contiguous:
        return value   # already per channel (the packed/lowered case): no copy, no checks
    arr = np.asarray(value)
    if arr.ndim == 0:
        return np.full(chans, arr, dtype=dtype)
    if arr.shape != (chans,):
        raise ConfigError(f"{name} must be a scalar or have {chans} per-channel values, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=dtype)


# --------------------------------------------------------------------------- argument checks


def _check_zero_point(name: str, zp, dtype) -> None:
    if type(zp) is int or np.ndim(zp) == 0:   # the usual scalar: no np.iinfo, no array reductions
        lo, hi = _RANGE.get(dtype) or (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if not lo <= int(zp) <= hi:
            info = np.iinfo(dtype)
            raise ConfigError(f"{name} must lie in the {np.dtype(dtype).name} range [{info.min}, {info.max}], "
                              f"got {zp}")
        return
    z, info = np.asarray(zp), np.iinfo(dtype)
    if z.size and (z.min() < info.min or z.max() > info.max):
        raise ConfigError(f"{name} must lie in the {np.dtype(dtype).name} range [{info.min}, {info.max}], "
                          f"got {z.ravel()[:8]}")


def _pair(v, name: str) -> tuple[int, int]:
    if type(v) is int and v >= 1:   # the common case, without NumPy's per-call cost
        return v, v
    t = (v, v) if np.ndim(v) == 0 else tuple(v)
    if len(t) != 2 or min(t) < 1:
        raise ConfigError(f"{name} must be a positive int or a pair of them, got {v!r}")
    return int(t[0]), int(t[1])


def _pads(padding) -> tuple[int, int, int, int]:
    """int | (ph, pw) | ONNX order (top, left, bottom, right) -> (top, left, bottom, right)."""
    if type(padding) is int and padding >= 0:
        return padding, padding, padding, padding
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


# --------------------------------------------------------------------------- implicit-GEMM tiles

_I32 = ir.IntType(32)


def _splat(builder, value, vec_ty):
    """``value`` broadcast to every lane of ``vec_ty`` (insertelement + zero shuffle)."""
    undef = ir.Constant(vec_ty, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, vec_ty.count), [0] * vec_ty.count))


_I8, _I64 = ir.IntType(8), ir.IntType(64)


def requantize_ir(builder, acc, m, right, mask, half, zp, qmin, qmax):
    """``_requant_right`` + zero point + clamp on a vector of int32 accumulators, in LLVM IR
    (all scalars i32, m >= 0): SaturatingRoundingDoublingHighMul as ``(v * m + 2**30) >> 31``
    in i64 lanes from sign-extended operands (VPMULDQ; see ``_requant_right`` for why this is
    exact), RoundingDivideByPOT in i32 lanes."""
    n = acc.type.count
    i64v = ir.VectorType(_I64, n)
    prod = builder.mul(builder.sext(acc, i64v), _splat(builder, builder.sext(m, _I64), i64v))
    hi = builder.trunc(builder.ashr(builder.add(prod, ir.Constant(i64v, [1 << 30] * n)), ir.Constant(i64v, [31] * n)),
                       acc.type)
    below = builder.zext(builder.icmp_signed("<", hi, ir.Constant(acc.type, None)), acc.type)
    round_up = builder.icmp_signed(">", builder.and_(hi, _splat(builder, mask, acc.type)),
                                   builder.add(_splat(builder, half, acc.type), below))
    res = builder.add(builder.ashr(hi, _splat(builder, right, acc.type)), builder.zext(round_up, acc.type))
    res = builder.add(res, _splat(builder, zp, acc.type))
    lo, up = _splat(builder, qmin, acc.type), _splat(builder, qmax, acc.type)
    res = builder.select(builder.icmp_signed("<", res, lo), lo, res)
    return builder.select(builder.icmp_signed(">", res, up), up, res)


def tile_intrinsic(lanes: int, elem_bits: int, ob: int, pv: int, accumulate, finish):
    """A numba intrinsic computing one output tile of ``ob`` channels x ``pv * lanes`` pixels.

    ``tile(x, offs, wt, out, p0, oc0, extra)``: for each k, the activation vectors are
    ``x[offs[k] + p0 + v * lanes:][:lanes]`` and channel ``oc0 + j`` broadcasts the weight word
    ``wt[oc0 + j, k]``; ``accumulate(builder, acc, xv, wb)`` folds them into an accumulator
    vector and ``finish(builder, acc, extra)`` turns it into ``lanes`` int32 stored at
    ``out[oc0 + j, p0 + v * lanes:]``. The accumulators are allocas that LLVM promotes to
    registers; weights are loaded once per k and channel, activations once per k and vector
    (a register-blocked outer product, as in BLIS micro-kernels). No bounds checks: callers
    pad x, wt and out to whole tiles.
    """
    vty = ir.VectorType(ir.IntType(elem_bits), lanes)
    oty = ir.VectorType(_I32, lanes)

    @intrinsic
    def tile(typingctx, x, offs, wt, out, p0, oc0, extra):
        sig = types.void(x, offs, wt, out, types.intp, types.intp, types.int64)

        def codegen(context, builder, signature, args):
            xa, oa, wa, outa = (context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:4], args[:4]))
            p0v, oc0v, extra_v = args[4], args[5], args[6]
            wk = builder.extract_value(wa.shape, 1)
            row_len = builder.extract_value(outa.shape, 1)
            accs = [[cgutils.alloca_once_value(builder, ir.Constant(vty, None)) for _ in range(pv)] for _ in range(ob)]
            chans = [builder.add(oc0v, ir.Constant(oc0v.type, j)) for j in range(ob)]
            wrows = [builder.gep(wa.data, [builder.mul(c, wk)]) for c in chans]
            with cgutils.for_range(builder, builder.extract_value(oa.shape, 0)) as loop:
                k = loop.index
                base = builder.gep(xa.data, [builder.add(builder.load(builder.gep(oa.data, [k])), p0v)])
                xs = [builder.load(builder.bitcast(builder.gep(base, [ir.Constant(k.type, lanes * v)]), vty.as_pointer()),
                                   align=elem_bits // 8) for v in range(pv)]
                for j in range(ob):
                    wb = _splat(builder, builder.load(builder.gep(wrows[j], [k])), vty)
                    for v in range(pv):
                        builder.store(accumulate(builder, builder.load(accs[j][v]), xs[v], wb), accs[j][v])
            for j in range(ob):
                row = builder.gep(outa.data, [builder.add(builder.mul(chans[j], row_len), p0v)])
                for v in range(pv):
                    ptr = builder.bitcast(builder.gep(row, [ir.Constant(p0v.type, lanes * v)]), oty.as_pointer())
                    builder.store(finish(builder, builder.load(accs[j][v]), extra_v), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


def _vpdpbusd(builder, acc, xv, wb):
    """acc[i] += sum_j u8(x[4i + j]) * s8(w[4i + j]): AVX-512 VNNI, no saturation (VPDPBUSD)."""
    b8 = ir.VectorType(ir.IntType(8), 64)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc.type, [acc.type, b8, b8]),
                                        "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, builder.bitcast(xv, b8), builder.bitcast(wb, b8)])


def _host_has_vnni() -> bool:
    """VPDPBUSD is emitted only when numba compiles for this host and the host has AVX-512 VNNI
    (LLVM >= 21 spells the intrinsic with <64 x i8> operands)."""
    if numba.config.CPU_NAME not in (None, "host") or llvm_binding.llvm_version_info < (21,):
        return False
    return "+avx512vnni" in llvm_binding.get_host_cpu_features().flatten().split(",")


USE_VNNI = _host_has_vnni()  # tests switch it off to cover the portable direct kernel
_OB, _PV, _LANES = 6, 3, 16
_PB = _PV * _LANES  # output pixels per tile
_vnni_tile = tile_intrinsic(_LANES, 32, _OB, _PV, _vpdpbusd, lambda builder, acc, extra: acc)


@numba.njit(cache=True, parallel=True)
def _vnni_gemm(x, offs, wt, out):
    """out (OCp, Pp) = implicit GEMM of weight quads wt (OCp, K) with the planes x at offs; parallel over pixel blocks."""
    n_ob = wt.shape[0] // _OB
    for pb in numba.prange(out.shape[1] // _PB):
        for ob in range(n_ob):
            _vnni_tile(x, offs, wt, out, pb * _PB, ob * _OB, 0)


def _vpdpbusd_unsigned_weights(builder, acc, xv, wb):
    """VPDPBUSD with the roles swapped: the broadcast word holds the unsigned bytes (GEMM's a)."""
    return _vpdpbusd(builder, acc, wb, xv)


_vnni_tile_t = tile_intrinsic(_LANES, 32, _OB, _PV, _vpdpbusd_unsigned_weights, lambda builder, acc, extra: acc)


@numba.njit(cache=True, parallel=True)
def _vnni_gemm_t(b, offs, a, out):
    """out (Mp, Np) = a (Mp, K/4 u8 quads) @ b (K/4 rows of Np s8 quads at offs); parallel over column blocks."""
    n_ob = a.shape[0] // _OB
    for pb in numba.prange(out.shape[1] // _PB):
        for ob in range(n_ob):
            _vnni_tile_t(b, offs, a, out, pb * _PB, ob * _OB, 0)


@numba.njit(cache=True)
def _fill_planes(xw, fill, pt, pl, sh, sw, hs, ws, out):
    """Padded pixel (a + sh*r, b + sw*q) of word plane i of xw (words, H, W) -> out[((i*sh + a)*sw + b)*hs*ws + r*ws + q]."""
    nw, h, wd = xw.shape
    for i in range(nw):
        f = fill[i]
        for a in range(sh):
            for b in range(sw):
                base = ((i * sh + a) * sw + b) * hs * ws
                q0 = min(max(0, -(-(pl - b) // sw)), ws)  # the columns q that fall inside the input
                q1 = min(max(q0, -(-(wd + pl - b) // sw)), ws)
                for r in range(hs):
                    row, o = a + sh * r - pt, base + r * ws
                    inside = 0 <= row < h
                    for q in range(ws if not inside else q0):
                        out[o + q] = f
                    if inside:
                        c0 = b + sw * q0 - pl
                        for q in range(q1 - q0):
                            out[o + q0 + q] = xw[i, row, c0 + sw * q]
                        for q in range(q1, ws):
                            out[o + q] = f


@numba.njit(cache=True)
def _fill_quad_planes(x, fill, pt, pl, sh, sw, hs, ws, out):
    """_fill_planes for bytes (C, H, W), C % 4 == 0, packed 4 channels to an int32 word (channel
    4j + t in byte t of word j); built as whole words so the inner loop vectorises."""
    c, h, wd = x.shape
    if sh == sw == 1 and pt == pl == 0 and hs == h and ws == wd:  # unpadded (1x1 convs): one flat run per word
        xf = x.reshape(c, h * wd)
        n = h * wd
        for cq in range(c // 4):
            x0, x1, x2, x3, dst = xf[4 * cq], xf[4 * cq + 1], xf[4 * cq + 2], xf[4 * cq + 3], out[cq * n:(cq + 1) * n]
            for i in range(n):
                dst[i] = (np.uint32(x0[i]) | (np.uint32(x1[i]) << 8) | (np.uint32(x2[i]) << 16)
                          | (np.uint32(x3[i]) << 24))
        return
    for cq in range(c // 4):
        f = fill[cq]
        c4 = 4 * cq
        for a in range(sh):
            for b in range(sw):
                base = ((cq * sh + a) * sw + b) * hs * ws
                q0 = min(max(0, -(-(pl - b) // sw)), ws)
                q1 = min(max(q0, -(-(wd + pl - b) // sw)), ws)
                for r in range(hs):
                    row, o = a + sh * r - pt, base + r * ws
                    inside = 0 <= row < h
                    for q in range(ws if not inside else q0):
                        out[o + q] = f
                    if inside:
                        x0, x1, x2, x3 = x[c4, row], x[c4 + 1, row], x[c4 + 2, row], x[c4 + 3, row]
                        c0 = b + sw * q0 - pl
                        for q in range(q1 - q0):
                            col = c0 + sw * q
                            out[o + q0 + q] = (np.uint32(x0[col]) | (np.uint32(x1[col]) << 8)
                                               | (np.uint32(x2[col]) << 16) | (np.uint32(x3[col]) << 24))
                        for q in range(q1, ws):
                            out[o + q] = f


class Planes:
    """Phase planes of one image and the flat offsets of every (tap, word) for an implicit GEMM.

    Output pixel (oh, ow) is flat index ``oh * ws + ow`` (columns ow >= OW are computed and
    dropped); the input word under tap (kh, kw) for it is ``x[offs[k] + oh * ws + ow]``,
    contiguous in ow for every stride because each stride phase has its own plane.
    """

    def __init__(self, xw, fill, kh: int, kw: int, stride, dilation, pads, out_hw, block: int, quads: bool = False):
        """xw: (words, H, W) planes of one image, ``fill[i]``: the padding value of word i; with
        ``quads`` xw is (C, H, W) uint8 (C % 4 == 0) packed into int32 words of 4 channels and
        ``fill`` holds one padding word per 4 channels."""
        (sh, sw), (dh, dw), (pt, pl, pb, pr), (oh, _) = stride, dilation, pads, out_hw
        nw, h, wd = xw.shape
        nw = nw // 4 if quads else nw
        self.hs, self.ws = -(-(h + pt + pb) // sh), -(-(wd + pl + pr) // sw)
        plane = self.hs * self.ws
        self.pixels = oh * self.ws
        self.padded = -(-self.pixels // block) * block
        self.x = np.empty(nw * sh * sw * plane + self.padded + plane, np.int32 if quads else xw.dtype)
        self.x[nw * sh * sw * plane:] = 0  # read only by dropped outputs; zeroed to stay deterministic
        if sh == sw == 1 and not quads:  # one plane per word: the padded image, copied by NumPy
            padded = self.x[:nw * plane].reshape(nw, self.hs, self.ws)
            padded[...] = np.asarray(fill, xw.dtype)[:, None, None]
            padded[:, pt:pt + h, pl:pl + wd] = xw
        else:
            (_fill_quad_planes if quads else _fill_planes)(xw, fill, pt, pl, sh, sw, self.hs, self.ws, self.x)
        taps = [((i * dh) % sh * sw + (j * dw) % sw, (i * dh) // sh * self.ws + (j * dw) // sw)
                for i in range(kh) for j in range(kw)]
        self.tap_phase = np.array([t[0] for t in taps], np.int64)
        self.tap_off = np.array([t[1] for t in taps], np.int64)
        word = np.arange(nw, dtype=np.int64) * (sh * sw * plane)
        # k = (word, tap): the taps of one word plane are neighbouring rows, read one after another
        self.offs = (word[:, None] + self.tap_phase[None, :] * plane + self.tap_off[None, :]).ravel()


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


_S8, _U8 = np.dtype(np.int8), np.dtype(np.uint8)


def _check_int8(name: str, arr: np.ndarray, allow_uint8: bool) -> None:
    if arr.dtype == _S8 or (allow_uint8 and arr.dtype == _U8):
        return
    raise ConfigError(f"{name} must be {'int8 or uint8' if allow_uint8 else 'int8'}, got {arr.dtype}")


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
    if USE_VNNI:
        return _gemm_vnni(a, b, int(a_zp), bzp)
    # Zero points are folded in once (O(MK + KN)); the differences lie in [-255, 255], so the
    # inner loop is a contiguous int16 dot with int32 sums.
    a16 = a.astype(np.int16) - np.int16(a_zp)
    bt16 = np.ascontiguousarray((b.astype(np.int16) - bzp.astype(np.int16)[None, :]).T)
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.int32)
    _gemm_i32(a16, bt16, out)
    return out


def _gemm_vnni(a, b, a_zp: int, bzp) -> np.ndarray:
    """VPDPBUSD GEMM on u8 a (zero point moved with the sign flip) and s8 b, zero points folded in after:
    sum (a - za)(b - zb) = sum ab - za sum_k b - zb sum_k a + K za zb."""
    au, za = _as_uint8(a, a_zp)
    (m, k), n = a.shape, b.shape[1]
    kp, mp, n_pad = -(-k // 4) * 4, -(-m // _OB) * _OB, -(-n // _PB) * _PB
    if (mp, kp) == (m, k):
        ap = np.ascontiguousarray(au)
    else:
        ap = np.zeros((mp, kp), np.uint8)
        ap[:m, :k] = au
    bp = np.zeros((kp, n_pad), np.int8)
    bp[:k, :n] = b
    bq = np.ascontiguousarray(bp.reshape(kp // 4, 4, n_pad).transpose(0, 2, 1)).view(np.int32).ravel()
    out = np.empty((mp, n_pad), np.int32)
    _vnni_gemm_t(bq, np.arange(kp // 4, dtype=np.int64) * n_pad, ap.view(np.int32), out)
    zb = bzp.astype(np.int64)
    # int32 arithmetic wraps like the accumulators; the sum of a is needed only for b zero points
    corr = (k * za * zb - za * b.sum(axis=0, dtype=np.int64)).astype(np.int32)[None, :]
    if np.any(zb):
        corr = corr - (zb[None, :] * au.sum(axis=1, dtype=np.int64)[:, None]).astype(np.int32)
    return out[:m, :n] + corr


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


@numba.njit(cache=True)
def _window_sums(xb, n_words, nphase, plane, tap_phase, tap_off, xsum):
    """xsum[p] = sum of the input bytes under output pixel p's window (needed for w_zp != 0)."""
    per_phase = np.zeros((nphase, plane + xsum.shape[0]), np.int64)
    for i in range(n_words):
        for ph in range(nphase):
            base = (i * nphase + ph) * plane * 4
            for pos in range(plane * 4):
                per_phase[ph, pos // 4] += xb[base + pos]
    for p in range(xsum.shape[0]):
        xsum[p] = 0
    for t in range(tap_phase.shape[0]):
        for p in range(xsum.shape[0]):
            xsum[p] += per_phase[tap_phase[t], tap_off[t] + p]


@numba.njit(cache=True, inline="always")
def _requant_lanes(v, m, left, right, mask, half):
    """_mul_by_quantized_multiplier without branches (selects), so the epilogue vectorises.

    Multipliers from quantize_multiplier are never INT32_MIN, so SRDHM's one saturating
    case cannot occur and is left out.
    """
    v = min(max(v << left, _INT32_MIN), _INT32_MAX)
    ab = v * m
    t = ab + ((1 << 30) if ab >= 0 else (1 - (1 << 30)))
    hi = (t >> 31) if t >= 0 else -((-t) >> 31)
    return (hi >> right) + (1 if (hi & mask) > half + (1 if hi < 0 else 0) else 0)


@numba.njit(cache=True, inline="always")
def _requant_right(v, m, right, mask, half):
    """_requant_lanes for shift <= 0 (real scale < 0.5, the usual case): no left shift, and
    the roundings written as shifts and masks (about half the time of the general form).

    SRDHM is ``(ab + nudge) / 2**31`` truncated toward zero, nudge 2**30 (ab >= 0) or
    1 - 2**30 (ab < 0). Below zero, truncation is ``(t + 2**31 - 1) >> 31`` (floor), and
    1 - 2**30 + 2**31 - 1 = 2**30: so both signs are ``(ab + 2**30) >> 31``, one add and one
    arithmetic shift (tested bit for bit against ``_srdhm``)."""
    hi = (v * m + (1 << 30)) >> 31
    return (hi >> right) + np.int64((hi & mask) > half + ((hi >> 63) & 1))


@numba.njit(cache=True, inline="always")
def _store_row(row, corr, z, xs, m, s, out_zp, qmin, qmax, requant, dst):
    """dst[i] = row[i] + corr - z * xs[i] as int32, requantised with (m, s) when ``requant``;
    the branches are per row, each inner loop is straight-line so LLVM vectorises it."""
    n = dst.shape[0]
    left, right = max(s, 0), max(-s, 0)
    mask = (np.int64(1) << right) - 1
    half = mask >> 1
    if z != 0:
        for i in range(n):
            row[i] = np.int32(np.int64(row[i]) - z * xs[i])
    if not requant:
        for i in range(n):
            dst[i] = np.int32(np.int64(row[i]) + corr)
    elif left == 0:
        for i in range(n):
            v = np.int64(np.int32(np.int64(row[i]) + corr))
            dst[i] = min(max(_requant_right(v, m, right, mask, half) + out_zp, qmin), qmax)
    else:
        for i in range(n):
            v = np.int64(np.int32(np.int64(row[i]) + corr))
            dst[i] = min(max(_requant_lanes(v, m, left, right, mask, half) + out_zp, qmin), qmax)


@numba.njit(cache=True, inline="always")
def _rq_args(m, s, out_zp, qmin, qmax):
    """The scalars of ``requantize_ir`` as int32: (m, right, mask, half, zp, qmin, qmax) for a
    shift s <= 0 (right = -s; a positive shift gives right 0, for callers that do not use them)."""
    right = max(-s, 0)
    mask = (np.int64(1) << right) - 1
    return (np.int32(m), np.int32(right), np.int32(mask), np.int32(mask >> 1), np.int32(out_zp), np.int32(qmin),
            np.int32(qmax))


@intrinsic
def _requant16(typingctx, src, src_off, corr, rq, dst, dst_off):
    """dst[dst_off:+16] = requantize_ir(src[src_off:+16] + corr) as bytes (no bounds checks)."""
    sig = types.void(src, types.intp, types.int32, rq, dst, types.intp)

    def codegen(context, builder, signature, args):
        sa = context.make_array(signature.args[0])(context, builder, args[0])
        da = context.make_array(signature.args[4])(context, builder, args[4])
        vty = ir.VectorType(_I32, 16)
        ptr = builder.bitcast(builder.gep(sa.data, [args[1]]), vty.as_pointer())
        v = builder.add(builder.load(ptr, align=4), _splat(builder, args[2], vty))
        rq = [builder.extract_value(args[3], i) for i in range(7)]
        res = builder.trunc(requantize_ir(builder, v, *rq), ir.VectorType(_I8, 16))
        builder.store(res, builder.bitcast(builder.gep(da.data, [args[5]]), res.type.as_pointer()), align=1)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, parallel=True)
def _epilogue(acc, ws, corr, wz, xsum, mult, shift, out_zp, qmin, qmax, requant, out):
    """out[oc, oh, ow] = acc[oc, oh*ws + ow] + corr[oc] - wz[oc] * xsum[.] in int32, then optionally
    requantised. Overwrites acc's rows in place when wz[oc] != 0. The usual channel (requantised,
    shift <= 0, wz 0) goes 16 outputs at a time through ``_requant16``; rows that do not fill a
    vector, and the other cases, through ``_store_row``."""
    oc_n, oh_n, ow_n = out.shape
    flat = ws == ow_n
    for oc in numba.prange(oc_n):
        s = np.int64(shift[oc])
        if requant and s <= 0 and wz[oc] == 0 and -(2**31) <= corr[oc] < 2**31:
            rq = _rq_args(mult[oc], s, out_zp, qmin, qmax)
            c32 = np.int32(corr[oc])
            row, dst = acc[oc], out[oc]
            if flat:   # rows back to back in both: one run over the whole channel
                n = oh_n * ow_n
                body = n - n % 16
                d = dst.reshape(n)
                for p in range(0, body, 16):
                    _requant16(row, p, c32, rq, d, p)
                _store_row(row[body:n], corr[oc], 0, xsum[:0], np.int64(mult[oc]), s, out_zp, qmin, qmax, True,
                           d[body:n])
            else:
                body = ow_n - ow_n % 16
                for oh in range(oh_n):
                    for p in range(0, body, 16):
                        _requant16(row, oh * ws + p, c32, rq, dst[oh], p)
                    _store_row(row[oh * ws + body:oh * ws + ow_n], corr[oc], 0, xsum[:0], np.int64(mult[oc]), s,
                               out_zp, qmin, qmax, True, dst[oh, body:])
            continue
        for oh in range(oh_n):
            _store_row(acc[oc, oh * ws:oh * ws + ow_n], corr[oc], wz[oc], xsum[oh * ws:oh * ws + ow_n],
                       np.int64(mult[oc]), s, out_zp, qmin, qmax, requant, out[oc, oh])


def _as_uint8(x: np.ndarray, x_zp: int) -> tuple[np.ndarray, int]:
    """int8 -> uint8 by flipping the sign bit (q + 128) and moving the zero point alike: same differences."""
    if x.dtype == np.int8:
        return x.view(np.uint8) ^ np.uint8(0x80), int(x_zp) + 128
    return x, int(x_zp)


@numba.njit(cache=True)
def _pack_weight_quads(w, wt, wsum):
    """w (OC, C, KH, KW) int8 -> wt (OCp, Cpad/4 * KH*KW * 4) int8 in the planes' k order
    (word of 4 channels, then tap, then the channel's byte), zero padded; wsum[oc] = sum of w[oc]."""
    oc_n, c_n, kh_n, kw_n = w.shape
    taps = kh_n * kw_n
    wt[:] = 0
    for o in range(oc_n):
        wo, dst = w[o].reshape(c_n, taps), wt[o]
        total = 0
        for c in range(c_n):
            base = (c // 4) * taps * 4 + c % 4
            for t in range(taps):
                dst[base + 4 * t] = wo[c, t]
                total += wo[c, t]
        wsum[o] = total


@dataclass(frozen=True, eq=False)
class PackedConvWeights:
    """int8 conv weights packed once for the VNNI implicit GEMM (ONNX Runtime likewise packs its
    weights when a session is created); pass it as ``w`` to ``conv2d_int8``.

    ``wt[g]`` (OCp, K) int8 and ``wsum[g]`` (OC/groups,) int64 per group; ``w`` is the original.
    Depthwise weights (one input channel per group) are kept as ``taps`` (OC, KH*KW) int32 for
    the direct depthwise kernel instead (``wt`` empty).
    """

    w: np.ndarray
    groups: int
    wt: tuple
    wsum: tuple
    taps: np.ndarray | None = None


def pack_conv_weights(w, groups: int = 1) -> PackedConvWeights:
    """Pack an int8 conv weight (OC, C/groups, KH, KW) for repeated ``conv2d_int8`` calls."""
    w = np.ascontiguousarray(w)
    _check_int8("w", w, allow_uint8=False)
    if w.ndim != 4 or groups < 1 or w.shape[0] % groups:
        raise ConfigError(f"pack_conv_weights needs w (OC, C/groups, KH, KW) with OC divisible by groups={groups}, "
                          f"got {w.shape}")
    if w.shape[1] == 1 and groups > 1:
        return PackedConvWeights(w, groups, (), (), w.reshape(w.shape[0], -1).astype(np.int32))
    return _pack_quads(w, groups)


def _pack_quads(w: np.ndarray, groups: int) -> PackedConvWeights:
    oc, icg, kh, kw = w.shape
    ocg = oc // groups
    ocp, cpad = -(-ocg // _OB) * _OB, -(-icg // 4) * 4
    wts, sums = [], []
    for g in range(groups):
        wt, wsum = np.empty((ocp, kh * kw * cpad), np.int8), np.empty(ocg, np.int64)
        _pack_weight_quads(w[g * ocg:(g + 1) * ocg], wt, wsum)
        wts.append(wt)
        sums.append(wsum)
    return PackedConvWeights(w, groups, tuple(wts), tuple(sums))


def _conv_vnni(x, packed: PackedConvWeights, geo, b32, x_zp, wzp, req, out) -> None:
    """Grouped conv as one VNNI implicit GEMM per (image, group); see the module doc."""
    stride, dilation, pads, (oh, ow) = geo
    w, groups = packed.w, packed.groups
    n, _, h, wd = x.shape
    oc, icg, kh, kw = w.shape
    ocg, cpad = oc // groups, -(-icg // 4) * 4
    xu, xz = _as_uint8(x, x_zp)
    if cpad != icg:  # pad every group's channels to whole 4-channel words with zeros
        xu = np.pad(xu.reshape(n, groups, icg, h, wd), ((0, 0), (0, 0), (0, cpad - icg), (0, 0), (0, 0)))
    xu = xu.reshape(n, groups * cpad, h, wd)
    fill = np.zeros(cpad, np.uint8)
    fill[:icg] = xz  # padding holds the zero point on real channels, 0 on the pad channels
    fill = fill.view(np.int32)
    for g in range(groups):
        sel = slice(g * ocg, (g + 1) * ocg)
        wt, wsum = packed.wt[g], packed.wsum[g]
        zg = wzp[sel].astype(np.int64)
        # sum (x-xz)(w-wz) = sum xw - xz sum w - wz sum x + K xz wz (the kernel computes sum xw)
        corr = b32[sel].astype(np.int64) - xz * wsum + icg * kh * kw * xz * zg
        for i in range(n):
            pl = Planes(xu[i, g * cpad:(g + 1) * cpad], fill, kh, kw, stride, dilation, pads, (oh, ow), _PB, quads=True)
            acc = np.empty((wt.shape[0], pl.padded), np.int32)
            _vnni_gemm(pl.x, pl.offs, wt.view(np.int32), acc)
            xsum = np.zeros(pl.pixels, np.int64)
            if np.any(zg):
                _window_sums(pl.x.view(np.uint8), cpad // 4, stride[0] * stride[1], pl.hs * pl.ws,
                             pl.tap_phase, pl.tap_off, xsum)
            _epilogue(acc, pl.ws, corr, zg, xsum, req[0][sel], req[1][sel], *req[2:], out[i, sel])


# --------------------------------------------------------------------------- depthwise

_DW_LANES, _DW_PV = 16, 4
_DW_PX = _DW_LANES * _DW_PV  # output pixels per wide depthwise tile


def _masked_store(builder, value, ptr, n_valid, first_lane: int) -> None:
    """Store lanes i of ``value`` with ``first_lane + i < n_valid`` (llvm.masked.store: one
    AVX-512 masked move; LLVM expands it elsewhere). Nothing past a row's end is touched."""
    n = value.type.count
    i64v = ir.VectorType(_I64, n)
    lanes = ir.Constant(i64v, [first_lane + i for i in range(n)])
    mask = builder.icmp_unsigned("<", lanes, _splat(builder, n_valid, i64v))
    elem = value.type.element
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [value.type, value.type.as_pointer(), _I32, mask.type]),
        f"llvm.masked.store.v{n}i{elem.width}.p0")
    builder.call(fn, [value, builder.bitcast(ptr, value.type.as_pointer()), ir.Constant(_I32, 1), mask])


def depthwise_tile(step: int, fused: bool, pv: int):
    """A numba intrinsic for up to ``16 * pv`` consecutive output pixels of one depthwise channel.

    ``tile(img, offs, w, out, p0, corr, rq, o0, n)``: output pixel i < min(16 * pv, n) is
    ``corr + sum_k img[offs[k] + step * (p0 + i)] * w[k]`` over the taps k, stored at
    ``out[o0 + i]`` (masked: nothing at or past n). ``img`` is the channel's padded image (int8 or
    uint8, widened to int32 lanes); ``step`` the horizontal stride (2: 32 bytes loaded as 16
    words, each word's low byte kept). ``pv`` vectors of 16 int32 accumulators stay in
    registers over all taps. ``fused``: requantised in registers with ``rq`` = (m, right, mask,
    half, zp, qmin, qmax) and stored as bytes; else the int32 accumulators are stored.
    """
    lanes = _DW_LANES
    vty = ir.VectorType(_I32, lanes)
    # step 2: 16 little-endian i16 words whose low bytes are the even pixels (one widening, one mask)
    bty = ir.VectorType(_I8 if step == 1 else ir.IntType(16), lanes)

    @intrinsic
    def tile(typingctx, img, offs, w, out, p0, corr, rq, o0, n):
        sig = types.void(img, offs, w, out, types.intp, types.int32, rq, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            xa, oa, wa, outa = (context.make_array(t)(context, builder, v) for t, v in zip(signature.args[:4], args[:4]))
            p0v = args[4]
            signed = signature.args[0].dtype.signed
            accs = [cgutils.alloca_once_value(builder, _splat(builder, args[5], vty)) for _ in range(pv)]
            xbase = builder.gep(xa.data, [builder.mul(p0v, ir.Constant(p0v.type, step))])
            c24, c255 = ir.Constant(vty, [24] * lanes), ir.Constant(vty, [255] * lanes)
            with cgutils.for_range(builder, builder.extract_value(oa.shape, 0)) as loop:
                k = loop.index
                base = builder.gep(xbase, [builder.load(builder.gep(oa.data, [k]))])
                wb = _splat(builder, builder.load(builder.gep(wa.data, [k])), vty)
                for v in range(pv):
                    ptr = builder.bitcast(builder.gep(base, [ir.Constant(_I64, step * lanes * v)]), bty.as_pointer())
                    raw = builder.load(ptr, align=1)
                    if step == 1:
                        xv = builder.sext(raw, vty) if signed else builder.zext(raw, vty)
                    elif signed:   # the low byte, sign-extended: << 24 then >> 24
                        xv = builder.ashr(builder.shl(builder.zext(raw, vty), c24), c24)
                    else:
                        xv = builder.and_(builder.zext(raw, vty), c255)
                    builder.store(builder.add(builder.load(accs[v]), builder.mul(xv, wb)), accs[v])
            row = builder.gep(outa.data, [args[7]])
            rq = [builder.extract_value(args[6], i) for i in range(7)]
            for v in range(pv):
                acc = builder.load(accs[v])
                if fused:
                    acc = builder.trunc(requantize_ir(builder, acc, *rq), ir.VectorType(_I8, lanes))
                _masked_store(builder, acc, builder.gep(row, [ir.Constant(_I64, lanes * v)]), args[8], lanes * v)
            return context.get_dummy_value()

        return sig, codegen

    return tile


@intrinsic
def _copy16(typingctx, dst, dst_off, src, src_off):
    """``dst[dst_off:dst_off + 16] = src[src_off:src_off + 16]`` as one unaligned vector load and
    store of 16 elements (same dtype; no bounds checks)."""
    sig = types.void(dst, types.intp, src, types.intp)

    def codegen(context, builder, signature, args):
        da = context.make_array(signature.args[0])(context, builder, args[0])
        sa = context.make_array(signature.args[2])(context, builder, args[2])
        vty = ir.VectorType(context.get_data_type(signature.args[0].dtype), 16).as_pointer()
        v = builder.load(builder.bitcast(builder.gep(sa.data, [args[3]]), vty), align=1)
        builder.store(v, builder.bitcast(builder.gep(da.data, [args[1]]), vty), align=1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _copy_masked16(typingctx, dst, dst_off, src, src_off, n):
    """``dst[dst_off:+n] = src[src_off:+n]`` for n <= 16 as one masked vector load and store
    (llvm.masked.load/store: nothing outside the n elements is read or written)."""
    sig = types.void(dst, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        da = context.make_array(signature.args[0])(context, builder, args[0])
        sa = context.make_array(signature.args[2])(context, builder, args[2])
        vty = ir.VectorType(context.get_data_type(signature.args[0].dtype), 16)
        i64v = ir.VectorType(_I64, 16)
        mask = builder.icmp_unsigned("<", ir.Constant(i64v, list(range(16))), _splat(builder, args[4], i64v))
        load = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [vty.as_pointer(), _I32, mask.type, vty]),
            f"llvm.masked.load.v16i{vty.element.width}.p0")
        src_ptr = builder.bitcast(builder.gep(sa.data, [args[3]]), vty.as_pointer())
        v = builder.call(load, [src_ptr, ir.Constant(_I32, 1), mask, ir.Constant(vty, None)])
        _masked_store(builder, v, builder.gep(da.data, [args[1]]), args[4], 0)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, inline="always")
def _copy_row(dst, dst_off, src, src_off, n):
    """``dst[dst_off:+n] = src[src_off:+n]``: 16-element vectors, the last one overlapping the one
    before (rows are short: a libc memcpy call per row costs more than the copy); one masked
    vector below 16."""
    if n < 16:
        _copy_masked16(dst, dst_off, src, src_off, n)
        return
    for i in range(0, n - 16, 16):
        _copy16(dst, dst_off + i, src, src_off + i)
    _copy16(dst, dst_off + n - 16, src, src_off + n - 16)


# (step, fused): the 64-pixel and the 16-pixel tile
_DW = {(s, f): (depthwise_tile(s, f, _DW_PV), depthwise_tile(s, f, 1)) for s in (1, 2) for f in (False, True)}
_dw1, _dw1_16 = _DW[1, False]
_dw2, _dw2_16 = _DW[2, False]
_dw1_rq, _dw1_rq_16 = _DW[1, True]
_dw2_rq, _dw2_rq_16 = _DW[2, True]


@numba.njit(cache=True, inline="always")
def _dw_tile(img, offs, wrow, dst, p0, corr, rq, o0, n, step, fused, wide):
    """One ``depthwise_tile`` call: the 64-pixel (``wide``) or 16-pixel tile for this stride and
    output kind (numba cannot pick an intrinsic from a table at run time)."""
    if step == 1:
        if fused:
            if wide:
                _dw1_rq(img, offs, wrow, dst, p0, corr, rq, o0, n)
            else:
                _dw1_rq_16(img, offs, wrow, dst, p0, corr, rq, o0, n)
        elif wide:
            _dw1(img, offs, wrow, dst, p0, corr, rq, o0, n)
        else:
            _dw1_16(img, offs, wrow, dst, p0, corr, rq, o0, n)
    elif fused:
        if wide:
            _dw2_rq(img, offs, wrow, dst, p0, corr, rq, o0, n)
        else:
            _dw2_rq_16(img, offs, wrow, dst, p0, corr, rq, o0, n)
    elif wide:
        _dw2(img, offs, wrow, dst, p0, corr, rq, o0, n)
    else:
        _dw2_16(img, offs, wrow, dst, p0, corr, rq, o0, n)


@numba.njit(cache=True, inline="always")
def _depthwise_rows(img, offs, wrow, dst, corr, rq, step, fused, pitch, oh_n, ow_n):
    """Every output row of one channel into dst (OH * OW, flat): 64-pixel tiles while 64 columns
    remain, then 16-pixel tiles, the last one masked at the row's end."""
    for oh in range(oh_n):
        j = 0
        while j < ow_n:
            n = ow_n - j
            wide = n >= _DW_PX
            _dw_tile(img, offs, wrow, dst, oh * pitch + j, corr, rq, oh * ow_n + j, n, step, fused, wide)
            j += _DW_PX if wide else _DW_LANES


@numba.njit(cache=True, inline="always")
def _depthwise_flat(img, offs, wrow, dst, corr, rq, step, fused, pixels):
    """Flat output pixels [0, pixels) into dst: 64-pixel tiles while more than 48 remain, then
    16-pixel ones (the buffers have room for the last tile's overrun)."""
    p0 = 0
    while p0 < pixels:
        wide = pixels - p0 > 3 * _DW_LANES
        _dw_tile(img, offs, wrow, dst, p0, corr, rq, p0, _DW_PX if wide else _DW_LANES, step, fused, wide)
        p0 += _DW_PX if wide else _DW_LANES


@numba.njit(cache=True, inline="always")
def _depthwise_channel(xc, img, pt, pl, pitch_in, step, pitch, offs, wrow, corr, m, s, out_zp, qmin, qmax, requant,
                       oh_n, ow_n, acc, out):
    """One output channel: its input channel xc (H, W) copied into the padded image's interior,
    then its rows (``_depthwise_rows``) straight into out (OH * OW, flat), requantised in
    registers; through the int32 accumulators acc and ``_store_row`` when the shift is positive
    or the output is int32."""
    h, wd = xc.shape
    for r in range(h):
        _copy_row(img, (r + pt) * pitch_in + pl, xc[r], 0, wd)
    rq = _rq_args(m, s, out_zp, qmin, qmax)
    if requant and s <= 0:  # the usual case (real scale < 0.5)
        _depthwise_rows(img, offs, wrow, out, corr, rq, step, True, pitch, oh_n, ow_n)
    else:
        _depthwise_rows(img, offs, wrow, acc, corr, rq, step, False, pitch, oh_n, ow_n)
        _store_row(acc, 0, 0, acc[:0], m, s, out_zp, qmin, qmax, requant, out)


@numba.njit(cache=True, parallel=True)
def _depthwise_direct(x, x_zp, pt, pl, dh, dw, pitch_in, rows_in, step, pitch, w, kw, bias, n_chunks, req_m, req_s,
                      out_zp, qmin, qmax, requant, out):
    """Depthwise conv of one image x (C, H, W) into out (OC, OH, OW), OC = mult * C.

    Output pixel (oh, ow) has the flat input index f = oh * pitch + ow, and its tap k reads the
    channel's padded image (rows_in x pitch_in, padding = x_zp) at step * f + offs[k]:
    contiguous for step 1, every other byte for step 2, so no im2col and no stride-phase
    planes are built. w (OC, KH*KW) int32 = w - w_zp (kw: KW); each channel adds
    bias - x_zp * sum_k w[oc, k]. Parallel over ``n_chunks`` chunks of channels; each chunk fills
    its padded image once (the padding never changes) and rewrites the interior per channel.
    """
    c_n = x.shape[0]
    oc_n, oh_n, ow_n = out.shape
    mult = oc_n // c_n
    taps = w.shape[1]
    offs = np.empty(taps, np.int64)
    for k in range(taps):
        offs[k] = (k // kw) * dh * pitch_in + (k % kw) * dw
    # the last tile of a row reads up to 16 pixels past its end
    size = max(rows_in * pitch_in, offs.max() + step * (oh_n * pitch + _DW_PX))
    n_chunks = min(oc_n, n_chunks)
    flat = out.reshape(oc_n, oh_n * ow_n)
    for chunk in numba.prange(n_chunks):
        img = np.empty(size, x.dtype)
        fill = x.dtype.type(x_zp)
        for i in range(size):
            img[i] = fill
        acc = np.empty(oh_n * ow_n, np.int32)
        for oc in range(chunk * oc_n // n_chunks, (chunk + 1) * oc_n // n_chunks):
            wrow = w[oc]
            corr = np.int64(bias[oc])
            for k in range(taps):
                corr -= np.int64(x_zp) * wrow[k]
            _depthwise_channel(x[oc // mult], img, pt, pl, pitch_in, step, pitch, offs, wrow,
                               np.int32(corr), np.int64(req_m[oc]), np.int64(req_s[oc]), out_zp, qmin, qmax,
                               requant, oh_n, ow_n, acc, flat[oc])


@numba.njit(cache=True, parallel=True)
def _depthwise_gathered(x, x_zp, pt, pl, pr, sh, sw, dh, dw, kh_n, kw_n, w, bias, n_chunks, req_m, req_s, out_zp,
                        qmin, qmax, requant, out):
    """``_depthwise_direct`` for a vertical stride sh > 1 (sw <= 2): sh row-phase images, image a
    holding the padded input rows sh * r + a as its rows r, each sw * P long, P = ceil(Wp / sw).
    Output pixel f = oh * P + ow under tap (i, j) then reads image (i * dh) % sh at row
    oh + (i * dh) // sh, column sw * ow + j * dw: sw * f plus a per-tap offset, so the flat
    output grid has pitch P (about Wp / 2 at stride 2, where the shared padded image needs
    Wp) and each input row is copied once. 64-pixel tiles over that grid into a row buffer,
    the OW valid columns of each row copied out with one masked vector."""
    c_n, h, wd = x.shape
    oc_n, oh_n, ow_n = out.shape
    mult = oc_n // c_n
    pitch = -(-(wd + pl + pr) // sw)
    row_len = sw * pitch
    pixels = oh_n * pitch
    padded = -(-pixels // _DW_PX) * _DW_PX
    rows = oh_n + (kh_n - 1) * dh // sh                  # rows of each phase image
    reach = ((kh_n - 1) * dh // sh) * row_len + (kw_n - 1) * dw
    image = max(rows * row_len, sw * padded + reach) + _DW_LANES   # with the last tile's reach
    taps = kh_n * kw_n
    offs = np.empty(taps, np.int64)
    for k in range(taps):
        i, j = k // kw_n, k % kw_n
        offs[k] = ((i * dh) % sh) * image + ((i * dh) // sh) * row_len + j * dw
    n_chunks = min(oc_n, n_chunks)
    flat = out.reshape(oc_n, oh_n * ow_n)
    for chunk in numba.prange(n_chunks):
        img = np.empty(sh * image, x.dtype)
        fill = x.dtype.type(x_zp)
        for i in range(sh * image):
            img[i] = fill
        res = np.empty(padded + _DW_LANES, out.dtype)
        acc = np.empty(padded, np.int32)
        for oc in range(chunk * oc_n // n_chunks, (chunk + 1) * oc_n // n_chunks):
            xc, wrow, dst = x[oc // mult], w[oc], flat[oc]
            corr = np.int64(bias[oc])
            for k in range(taps):
                corr -= np.int64(x_zp) * wrow[k]
            for a in range(sh):
                for ri in range(rows):
                    r = sh * ri + a - pt
                    if 0 <= r < h:
                        _copy_row(img, a * image + ri * row_len + pl, xc[r], 0, wd)
            m, s = np.int64(req_m[oc]), np.int64(req_s[oc])
            rq = _rq_args(m, s, out_zp, qmin, qmax)
            if requant and s <= 0:
                _depthwise_flat(img, offs, wrow, res, np.int32(corr), rq, sw, True, pixels)
            else:
                _depthwise_flat(img, offs, wrow, acc, np.int32(corr), rq, sw, False, pixels)
                _store_row(acc[:pixels], 0, 0, acc[:0], m, s, out_zp, qmin, qmax, requant, res[:pixels])
            for oh in range(oh_n):
                _copy_row(dst, oh * ow_n, res, oh * pitch, ow_n)


def _depthwise_pitch(stride, pads, wd: int) -> int | None:
    """The output row pitch of the direct depthwise kernel, or None when the stride has no such
    layout (horizontal stride > 2, or sh * Wp not a multiple of sw)."""
    (sh, sw), (_, pl, _, pr) = stride, pads
    wp = wd + pl + pr
    if sw > 2 or (sh * wp) % sw:
        return None
    return sh * wp // sw


def _conv_depthwise(x, w, geo, b32, x_zp, wzp, req, out, taps=None) -> None:
    """One input channel per group (OC = mult * C) through the direct kernel above (the caller
    checked ``_depthwise_pitch``); ``taps``: w as (OC, KH*KW) int32 when packed beforehand."""
    stride, dilation, pads, _ = geo
    n, _, h, wd = x.shape
    oc, _, kh, kw = w.shape
    w32 = w.reshape(oc, kh * kw).astype(np.int32) if taps is None else taps
    if wzp is not None:
        w32 = w32 - wzp[:, None]
    pitch_in = wd + pads[1] + pads[3]
    chunks = 32   # parallel work items: enough for the threads of an edge CPU, each fills its own padded image
    for i in range(n):
        # scalars, not tuples: numba types those in C on every call
        if stride[0] > 1:
            _depthwise_gathered(x[i], x_zp, pads[0], pads[1], pads[3], stride[0], stride[1], dilation[0],
                                dilation[1], kh, kw, w32, b32, chunks, *req, out[i])
        else:
            _depthwise_direct(x[i], x_zp, pads[0], pads[1], dilation[0], dilation[1], pitch_in, h + pads[0] + pads[2],
                              stride[1], _depthwise_pitch(stride, pads, wd), w32, kw, b32, chunks, *req, out[i])


def conv2d_int8(x, w, bias=None, x_zp: int = 0, w_zp=0, stride=1, padding=0, dilation=1, groups: int = 1,
                multiplier=None, shift=None, out_zp: int = 0, qmin: int | None = None, qmax: int | None = None,
                out_dtype=np.int8) -> np.ndarray:
    """Quantised conv2d, NCHW: x int8/uint8 (N, C, H, W), w int8 (OC, C/groups, KH, KW).

    Returns the int32 accumulators ``sum (x - x_zp)(w - w_zp) + bias`` (ONNX ConvInteger plus
    bias) when ``multiplier`` is None, else those requantised per output channel to
    ``out_dtype`` (ONNX QLinearConv / TFLite CONV_2D; fused ReLU/ReLU6 via ``qmin``/``qmax``).
    Depthwise is ``groups == C == OC`` (or a channel multiplier, OC = k * C).

    ``w`` may also be a ``PackedConvWeights`` from ``pack_conv_weights(w, groups)``, packed once
    for many calls (the weights' layout for the VNNI GEMM), its ``groups`` matching ``groups``.

    Padding holds the *input zero point*: real 0.0 is represented by ``x_zp`` (real =
    s_x * (q - x_zp)), so this is exactly the zero padding of the float conv, and the padded
    taps contribute nothing to the accumulator (as ONNX ConvInteger/QLinearConv specify).
    """
    x = np.asarray(x)
    packed = w if isinstance(w, PackedConvWeights) else None
    if packed is not None and packed.groups != groups:
        raise ConfigError(f"weights were packed for groups={packed.groups}, the conv has groups={groups}; "
                          "pack them with pack_conv_weights(w, groups)")
    w = packed.w if packed is not None else np.asarray(w)
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
    w_zero = type(w_zp) is int and w_zp == 0   # symmetric weights, the usual case: no per-channel array
    wzp = None if w_zero else _per_channel(w_zp, oc, "w_zp", np.int32)
    _check_zero_point("x_zp", x_zp, x.dtype)
    if not w_zero:
        _check_zero_point("w_zp", w_zp if np.ndim(w_zp) == 0 else wzp, w.dtype)
    requant = multiplier is not None
    if requant and shift is None:
        raise ConfigError("requantised conv needs both multiplier and shift (from quantize_multiplier)")
    depthwise = icg == 1
    # depthwise: the direct kernel; at a horizontal stride > 2 the grouped GEMM or the portable kernel
    direct_dw = depthwise and _depthwise_pitch((sh, sw), (pt, pl, pb, pr), wd) is not None
    if not (direct_dw or USE_VNNI):
        wzp = np.zeros(oc, np.int32) if wzp is None else wzp
        acc = np.empty((n, oc, oh, ow), dtype=np.int32)
        _conv_i32(_padded_nhwc(x, x_zp, (pt, pl, pb, pr)), _weights_ohwi(w, wzp), b32, sh, sw, dh, dw, groups, acc)
        if not requant:
            return acc
        return requantize(acc, multiplier, shift, out_zp, qmin, qmax, axis=1, out_dtype=out_dtype)
    lo, hi = _dtype_range(out_dtype) if requant else (_INT32_MIN, _INT32_MAX)
    qmin = lo if qmin is None else int(qmin)
    qmax = hi if qmax is None else int(qmax)
    if requant and not lo <= qmin <= qmax <= hi:
        raise ConfigError(f"need {lo} <= qmin <= qmax <= {hi} for {np.dtype(out_dtype)}, got qmin={qmin}, qmax={qmax}")
    mult = _per_channel(multiplier if requant else 0, oc, "multiplier", np.int32)
    shf = _per_channel(shift if requant else 0, oc, "shift", np.int32)
    req = (mult, shf, np.int64(out_zp), np.int64(qmin), np.int64(qmax), requant)
    out = np.empty((n, oc, oh, ow), dtype=out_dtype if requant else np.int32)
    geo = ((sh, sw), (dh, dw), (pt, pl, pb, pr), (oh, ow))
    if direct_dw:
        wz = None if w_zero or not np.any(wzp) else wzp
        _conv_depthwise(x, w, geo, b32, int(x_zp), wz, req, out, None if packed is None else packed.taps)
    else:
        wzp = np.zeros(oc, np.int32) if wzp is None else wzp
        _conv_vnni(x, packed if packed is not None and packed.wt else _pack_quads(w, groups), geo, b32, int(x_zp),
                   wzp, req, out)
    return out


def _padded_nhwc(x, x_zp, pads) -> np.ndarray:
    """x - x_zp as int16, zero-padded, channels last (the portable direct kernel's input)."""
    pt, pl, pb, pr = pads
    xs = x.astype(np.int16) - np.int16(x_zp)
    return np.ascontiguousarray(np.pad(xs, ((0, 0), (0, 0), (pt, pb), (pl, pr))).transpose(0, 2, 3, 1))


def _weights_ohwi(w, wzp) -> np.ndarray:
    return np.ascontiguousarray((w.astype(np.int16) - wzp.astype(np.int16)[:, None, None, None]).transpose(0, 2, 3, 1))
