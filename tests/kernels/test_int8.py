"""int8 kernels against independent references.

Integer paths: bit-exact against plain NumPy int64 loops written here (not the kernel code),
property-tested over shapes, strides, padding, dilation, groups/depthwise and zero points.
Requantisation: bit-exact against a NumPy transcription of the gemmlowp formulas and within
1 LSB of a float64 rescale. Conv and GEMM semantics: the ONNX backend node cases of ConvInteger,
QLinearConv, MatMulInteger and QLinearMatMul.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

import numba  # noqa: E402

from edge_compress.errors import ConfigError  # noqa: E402
from edge_compress.kernels import int8  # noqa: E402
from edge_compress.kernels.int8 import (  # noqa: E402
    conv2d_int8,
    gemm_s8s8_s32,
    pack_conv_weights,
    quantize_multiplier,
    requantize,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


# --------------------------------------------------------------------------- references


def ref_conv(x, w, bias, x_zp, w_zp, stride, pads, dilation, groups):
    """int64 conv: pad with x_zp, subtract zero points, sum tap by tap per group (einsum)."""
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = stride, pads, dilation
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=x_zp) - x_zp
    wz = w.astype(np.int64) - np.asarray(w_zp, np.int64).reshape(-1, 1, 1, 1)
    n, c, hp, wp = xp.shape
    oc, icg, kh, kw = w.shape
    oh = (hp - dh * (kh - 1) - 1) // sh + 1
    ow = (wp - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, oc, oh, ow), np.int64)
    ocg = oc // groups
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, g * icg:(g + 1) * icg,
                           i * dh: i * dh + sh * (oh - 1) + 1: sh,
                           j * dw: j * dw + sw * (ow - 1) + 1: sw]
                out[:, g * ocg:(g + 1) * ocg] += np.einsum("nchw,oc->nohw", patch, wz[g * ocg:(g + 1) * ocg, :, i, j])
    return out + np.asarray(bias, np.int64).reshape(1, -1, 1, 1)


def ref_srdhm(a, b):
    """gemmlowp SaturatingRoundingDoublingHighMul, int64 NumPy arrays holding int32 values."""
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    v = ab + nudge
    high = np.sign(v) * (np.abs(v) // (1 << 31))  # C division: truncate toward zero
    return np.where((a == I32_MIN) & (b == I32_MIN), I32_MAX, high)


def ref_rdbpot(x, exponent):
    """gemmlowp RoundingDivideByPOT."""
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def ref_requantize(acc, mult, shift, zp, qmin, qmax):
    """TFLite MultiplyByQuantizedMultiplier + zero point + clamp (left shift saturating to int32)."""
    acc, mult, shift = (np.asarray(v, np.int64) for v in (acc, mult, shift))
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    v = np.clip(acc * (np.int64(1) << left), I32_MIN, I32_MAX)
    return np.clip(ref_rdbpot(ref_srdhm(v, mult), right) + zp, qmin, qmax)


# --------------------------------------------------------------------------- GEMM


@SETTINGS
@given(m=st.integers(1, 9), k=st.integers(1, 40), n=st.integers(1, 9), a_signed=st.booleans(),
       per_col=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_gemm_bit_exact(m, k, n, a_signed, per_col, seed):
    rng = np.random.default_rng(seed)
    a_dt = np.int8 if a_signed else np.uint8
    info = np.iinfo(a_dt)
    a = rng.integers(info.min, info.max + 1, (m, k)).astype(a_dt)
    b = rng.integers(-128, 128, (k, n)).astype(np.int8)
    a_zp = int(rng.integers(info.min, info.max + 1))
    b_zp = rng.integers(-128, 128, n) if per_col else int(rng.integers(-128, 128))
    ref = (a.astype(np.int64) - a_zp) @ (b.astype(np.int64) - np.asarray(b_zp, np.int64))
    got = gemm_s8s8_s32(a, b, a_zp, b_zp)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)


def test_gemm_rejects_bad_input():
    a = np.zeros((2, 3), np.int8)
    with pytest.raises(ConfigError, match=r"\(M, K\)"):
        gemm_s8s8_s32(a, np.zeros((4, 2), np.int8))
    with pytest.raises(ConfigError, match="float32"):
        gemm_s8s8_s32(a.astype(np.float32), np.zeros((3, 2), np.int8))


# --------------------------------------------------------------------------- conv2d


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    icg = 1 if depthwise else draw(st.integers(1, 3))
    ocg = draw(st.integers(1, 2)) if depthwise else draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    assume(h + pads[0] + pads[2] >= dilation[0] * (kh - 1) + 1)
    assume(w + pads[1] + pads[3] >= dilation[1] * (kw - 1) + 1)
    return dict(n=draw(st.integers(1, 2)), groups=groups, icg=icg, ocg=ocg, kh=kh, kw=kw, stride=stride,
                dilation=dilation, pads=pads, h=h, w=w, x_signed=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def _random_conv(case):
    rng = np.random.default_rng(case["seed"])
    c, oc = case["groups"] * case["icg"], case["groups"] * case["ocg"]
    x_dt = np.int8 if case["x_signed"] else np.uint8
    info = np.iinfo(x_dt)
    x = rng.integers(info.min, info.max + 1, (case["n"], c, case["h"], case["w"])).astype(x_dt)
    w = rng.integers(-128, 128, (oc, case["icg"], case["kh"], case["kw"])).astype(np.int8)
    bias = rng.integers(-5000, 5000, oc).astype(np.int32)
    x_zp = int(rng.integers(info.min, info.max + 1))
    w_zp = rng.integers(-128, 128, oc).astype(np.int32)
    return x, w, bias, x_zp, w_zp


@SETTINGS
@given(case=conv_cases())
def test_conv2d_accumulators_bit_exact(case):
    x, w, bias, x_zp, w_zp = _random_conv(case)
    got = conv2d_int8(x, w, bias, x_zp, w_zp, stride=case["stride"], padding=case["pads"],
                      dilation=case["dilation"], groups=case["groups"])
    ref = ref_conv(x, w, bias, x_zp, w_zp, case["stride"], case["pads"], case["dilation"], case["groups"])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)


@SETTINGS
@given(case=conv_cases(), out_signed=st.booleans(), relu=st.sampled_from(["none", "relu", "relu6"]))
def test_conv2d_requantised_bit_exact(case, out_signed, relu):
    x, w, bias, x_zp, w_zp = _random_conv(case)
    rng = np.random.default_rng(case["seed"] + 1)
    oc = w.shape[0]
    mult, shift = quantize_multiplier(rng.uniform(1e-5, 1e-2, oc))
    out_dt = np.int8 if out_signed else np.uint8
    lo, hi = int(np.iinfo(out_dt).min), int(np.iinfo(out_dt).max)
    out_zp = int(rng.integers(lo, hi + 1))
    qmin, qmax = {"none": (lo, hi), "relu": (out_zp, hi), "relu6": (out_zp, min(hi, out_zp + 40))}[relu]
    got = conv2d_int8(x, w, bias, x_zp, w_zp, stride=case["stride"], padding=case["pads"],
                      dilation=case["dilation"], groups=case["groups"], multiplier=mult, shift=shift,
                      out_zp=out_zp, qmin=qmin, qmax=qmax, out_dtype=out_dt)
    acc = ref_conv(x, w, bias, x_zp, w_zp, case["stride"], case["pads"], case["dilation"], case["groups"])
    ref = ref_requantize(acc, mult.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1), out_zp, qmin, qmax)
    assert got.dtype == out_dt
    np.testing.assert_array_equal(got, ref)


def test_depthwise_with_channel_multiplier():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (1, 6, 9, 9)).astype(np.uint8)
    w = rng.integers(-128, 128, (12, 1, 3, 3)).astype(np.int8)
    got = conv2d_int8(x, w, None, 7, 0, stride=2, padding=1, groups=6)
    np.testing.assert_array_equal(got, ref_conv(x, w, np.zeros(12), 7, 0, (2, 2), (1, 1, 1, 1), (1, 1), 6))


def test_padding_holds_the_input_zero_point():
    """Real 0 is q = x_zp, so a padded tap must contribute nothing: an input that is all x_zp
    (real zero everywhere) gives exactly the bias, border pixels included."""
    x = np.full((1, 2, 4, 4), 37, np.uint8)
    w = np.full((3, 2, 3, 3), 5, np.int8)
    got = conv2d_int8(x, w, np.array([1, 2, 3], np.int32), x_zp=37, w_zp=1, padding=2)
    np.testing.assert_array_equal(got, np.broadcast_to(np.array([1, 2, 3]).reshape(1, 3, 1, 1), got.shape))


def test_conv2d_rejects_bad_shapes():
    x = np.zeros((1, 4, 5, 5), np.int8)
    with pytest.raises(ConfigError, match="groups=3"):
        conv2d_int8(x, np.zeros((3, 1, 3, 3), np.int8), groups=3)
    with pytest.raises(ConfigError, match="larger than the padded input"):
        conv2d_int8(x, np.zeros((2, 4, 7, 7), np.int8))
    with pytest.raises(ConfigError, match=r"x_zp must lie in the int8 range"):
        conv2d_int8(x, np.zeros((2, 4, 3, 3), np.int8), x_zp=200)
    with pytest.raises(ConfigError, match="multiplier and shift"):
        conv2d_int8(x, np.zeros((2, 4, 3, 3), np.int8), multiplier=np.int32(2**30))


# --------------------------------------------------------------------------- requantisation


@SETTINGS
@given(chans=st.integers(1, 6), log_scale=st.floats(-20, 10), out_signed=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_requantize_matches_gemmlowp_and_float(chans, log_scale, out_signed, seed):
    rng = np.random.default_rng(seed)
    scales = 2.0 ** (log_scale + rng.uniform(-1, 1, chans))
    mult, shift = quantize_multiplier(scales)
    out_dt = np.int8 if out_signed else np.uint8
    lo, hi = int(np.iinfo(out_dt).min), int(np.iinfo(out_dt).max)
    zp = int(rng.integers(lo, hi + 1))
    # Accumulators spanning the int32 range, including its ends.
    acc = rng.integers(I32_MIN, I32_MAX, (17, chans), endpoint=True)
    acc = (acc >> rng.integers(0, 31, (17, chans))).astype(np.int32)
    acc[0] = I32_MIN
    acc[1] = I32_MAX
    got = requantize(acc, mult, shift, zp, out_dtype=out_dt)
    np.testing.assert_array_equal(got, ref_requantize(acc, mult, shift, zp, lo, hi))
    real = mult.astype(np.float64) * 2.0 ** (shift.astype(np.float64) - 31)
    ref_float = np.clip(np.round(acc.astype(np.float64) * real) + zp, lo, hi)
    # A left shift that saturates int32 is the one place fixed point departs from float.
    fits = np.abs(acc.astype(np.float64) * 2.0 ** np.maximum(shift, 0)) < 2**31
    assert np.all(np.abs(got.astype(np.float64) - ref_float)[fits] <= 1)


@numba.njit(cache=False)
def _vector_requant(acc, corr, m, right, zp, qmin, qmax, out):
    """The fused epilogue's two paths on one row: 16-lane IR tiles, and ``_store_row``'s loop."""
    mask = (np.int64(1) << right) - 1
    rq = (np.int32(m), np.int32(right), np.int32(mask), np.int32(mask >> 1), np.int32(zp), np.int32(qmin),
          np.int32(qmax))
    n = acc.shape[0]
    for p in range(0, n - n % 16, 16):
        int8._requant16(acc, p, np.int32(corr), rq, out[0], p)
    int8._store_row(acc.copy(), corr, 0, acc[:0].astype(np.int64), np.int64(m), np.int64(-right), np.int64(zp),
                    np.int64(qmin), np.int64(qmax), True, out[1])


@SETTINGS
@given(log_scale=st.floats(-31, -1.01) | st.integers(-31, -2).map(float), out_signed=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_vector_requantisation_paths_are_gemmlowp_exact(log_scale, out_signed, seed):
    """(ab + 2**30) >> 31 replaces SRDHM's sign-dependent nudge and truncation in both vector paths."""
    rng = np.random.default_rng(seed)
    (m,), (shift,) = quantize_multiplier([2.0 ** log_scale])
    out_dt = np.int8 if out_signed else np.uint8
    lo, hi = int(np.iinfo(out_dt).min), int(np.iinfo(out_dt).max)
    zp = int(rng.integers(lo, hi + 1))
    corr = int(rng.integers(-2**20, 2**20))
    acc = rng.integers(I32_MIN, I32_MAX, 64, endpoint=True)
    acc = (acc >> rng.integers(0, 31, 64)).astype(np.int64) - corr
    acc[:4] = [I32_MIN - min(corr, 0), I32_MAX - max(corr, 0), -1 - corr, -corr]
    acc[4:12] = np.array([-7, -5, -3, -1, 1, 3, 5, 7]) * 2 ** int(rng.integers(0, 8)) - corr  # rounding ties
    acc = np.clip(acc, I32_MIN - min(corr, 0), I32_MAX - max(corr, 0)).astype(np.int32)  # acc + corr fits int32
    out = np.empty((2, 64), out_dt)
    _vector_requant(acc, corr, int(m), -int(shift), zp, lo, hi, out)
    want = ref_requantize(acc.astype(np.int64) + corr, m, shift, zp, lo, hi)
    np.testing.assert_array_equal(out[0], want)
    np.testing.assert_array_equal(out[1], want)


def test_requantize_along_channel_axis_and_fused_relu6():
    acc = np.arange(-60, 60, dtype=np.int32).reshape(1, 3, 5, 8) * 1000
    mult, shift = quantize_multiplier([0.001, 0.002, 0.004])
    plain = requantize(acc, mult, shift, out_zp=-10, axis=1)
    fused = requantize(acc, mult, shift, out_zp=-10, qmin=-10, qmax=-10 + 50, axis=1)
    np.testing.assert_array_equal(fused, np.clip(plain, -10, 40))
    ref = ref_requantize(acc, mult.reshape(1, 3, 1, 1), shift.reshape(1, 3, 1, 1), -10, -128, 127)
    np.testing.assert_array_equal(plain, ref)


@SETTINGS
@given(scale=st.floats(1e-12, 1e8, allow_subnormal=False))
def test_quantize_multiplier_represents_the_scale(scale):
    assume(scale < 2.0**30)
    mult, shift = quantize_multiplier(scale)
    if mult == 0:  # below 2**-32: the output is the zero point, by design
        assert scale < 2.0**-31
        return
    assert 2**30 <= int(mult) < 2**31
    assert abs(int(mult) * 2.0 ** (int(shift) - 31) - scale) <= scale * 2.0**-31


def test_quantize_multiplier_rejects_non_positive():
    with pytest.raises(ConfigError, match="> 0"):
        quantize_multiplier([0.5, 0.0])


# --------------------------------------------------------------------------- ONNX node cases


def _as_int8(q, zp):
    """uint8 weights + zero point -> int8 with the same differences (both shifted by 128)."""
    q = np.asarray(q)
    if q.dtype == np.int8:
        return q, np.asarray(zp, np.int32)
    return (q.astype(np.int16) - 128).astype(np.int8), np.asarray(zp, np.int32) - 128


def test_onnx_convinteger_node_cases(onnx_node_cases, onnx_conv_attrs):
    cases = onnx_node_cases("test_convinteger", "ConvInteger", "convinteger")
    assert len(cases) >= 2
    for name, node, inputs, (y,) in cases:
        x, w, x_zp = inputs[0], inputs[1], inputs[2]
        w_zp = inputs[3] if len(inputs) > 3 else np.uint8(0) if w.dtype == np.uint8 else np.int8(0)
        w8, wzp8 = _as_int8(w, w_zp)
        got = conv2d_int8(x, w8, None, int(x_zp), wzp8, **onnx_conv_attrs(node, x.shape, w.shape))
        np.testing.assert_array_equal(got, y, err_msg=name)


def test_onnx_qlinearconv_node_cases(onnx_node_cases, onnx_conv_attrs):
    cases = onnx_node_cases("test_qlinearconv", "QLinearConv", "qlinearconv")
    assert cases
    for name, node, (x, xs, xzp, w, ws, wzp, ys, yzp), (y,) in cases:
        w8, wzp8 = _as_int8(w, wzp)
        real = np.float64(xs) * np.asarray(ws, np.float64) / np.float64(ys)
        mult, shift = quantize_multiplier(real)
        got = conv2d_int8(x, w8, None, int(xzp), wzp8, multiplier=mult, shift=shift, out_zp=int(yzp),
                          out_dtype=y.dtype, **onnx_conv_attrs(node, x.shape, w.shape))
        np.testing.assert_array_equal(got, y, err_msg=name)


def _scalar(v):
    """An ONNX per-tensor value (shape () or (1,)) as a NumPy scalar of its dtype."""
    v = np.asarray(v)
    assert v.size == 1, f"per-tensor value expected, got shape {v.shape}"
    return v.reshape(())[()]


def test_onnx_matmulinteger_node_cases(onnx_node_cases):
    cases = onnx_node_cases("test_matmulinteger", "MatMulInteger", "matmulinteger")
    assert cases
    for name, _node, (a, b, a_zp, b_zp), (y,) in cases:
        b8, bzp8 = _as_int8(b, _scalar(b_zp))
        got = gemm_s8s8_s32(a, b8, int(_scalar(a_zp)), bzp8)
        np.testing.assert_array_equal(got, y, err_msg=name)


def test_onnx_qlinearmatmul_node_cases(onnx_node_cases):
    """2D and 3D (batched over the leading axis), uint8 and int8, float32 and float16 scales."""
    cases = onnx_node_cases("test_qlinearmatmul", "QLinearMatMul", "qlinearmatmul")
    assert len(cases) >= 4
    for name, _node, (a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp), (y,) in cases:
        b8, bzp8 = _as_int8(b, _scalar(b_zp))
        real = np.float64(_scalar(a_s)) * np.float64(_scalar(b_s)) / np.float64(_scalar(y_s))
        mult, shift = quantize_multiplier(real)
        a3, b3 = a.reshape((-1,) + a.shape[-2:]), np.broadcast_to(b8, a.shape[:-2] + b8.shape[-2:]).reshape((-1,) + b8.shape[-2:])
        got = np.stack([requantize(gemm_s8s8_s32(ai, np.ascontiguousarray(bi), int(_scalar(a_zp)), bzp8),
                                   mult, shift, int(_scalar(y_zp)), out_dtype=y.dtype)
                        for ai, bi in zip(a3, b3)]).reshape(y.shape)
        np.testing.assert_array_equal(got, y, err_msg=name)


# --------------------------------------------------------------------------- fast paths


def test_planes_offsets_address_the_padded_input():
    """Planes' invariant: x[offs[k] + oh * ws + ow] is the padded input under tap k of output (oh, ow)."""
    from edge_compress.kernels.int8 import Planes

    rng = np.random.default_rng(5)
    for stride, dilation, pads in [((1, 1), (1, 1), (1, 1, 1, 1)), ((2, 3), (1, 2), (2, 0, 1, 3)), ((3, 2), (2, 1), (0, 1, 0, 2))]:
        xw = rng.integers(1, 1000, (3, 11, 13)).astype(np.int32)
        fill = np.array([-1, -2, -3], np.int32)
        (pt, pl, pb, pr), (sh, sw), (dh, dw) = pads, stride, dilation
        padded = np.stack([np.pad(xw[i], ((pt, pb), (pl, pr)), constant_values=fill[i]) for i in range(3)])
        oh = (11 + pt + pb - dh * 2 - 1) // sh + 1
        ow = (13 + pl + pr - dw * 2 - 1) // sw + 1
        p = Planes(xw, fill, 3, 3, stride, dilation, pads, (oh, ow), 16)
        for k, (i, t) in enumerate((i, t) for i in range(3) for t in range(9)):
            kh, kw = divmod(t, 3)
            got = p.x[p.offs[k] + np.arange(oh)[:, None] * p.ws + np.arange(ow)[None, :]]
            want = padded[i, kh * dh: kh * dh + sh * (oh - 1) + 1: sh, kw * dw: kw * dw + sw * (ow - 1) + 1: sw]
            np.testing.assert_array_equal(got, want, err_msg=f"stride {stride} dilation {dilation} tap {t}")


def _large_case(seed, c, oc, groups, h, w, x_dt):
    rng = np.random.default_rng(seed)
    info = np.iinfo(x_dt)
    x = rng.integers(info.min, info.max + 1, (2, c, h, w)).astype(x_dt)
    wt = rng.integers(-128, 128, (oc, c // groups, 3, 3)).astype(np.int8)
    bias = rng.integers(-5000, 5000, oc).astype(np.int32)
    return x, wt, bias, int(rng.integers(info.min, info.max + 1)), rng.integers(-128, 128, oc).astype(np.int32)


@pytest.mark.parametrize("c, oc, groups, x_dt", [(72, 13, 1, np.int8), (10, 14, 2, np.uint8), (40, 80, 40, np.int8)])
def test_conv_across_many_tiles_bit_exact(c, oc, groups, x_dt):
    """Detector-like sizes: several pixel and channel tiles, channels padded to 4-byte words
    (icg=5), depthwise with a channel multiplier, signed input, per-channel weight zero points."""
    x, w, bias, x_zp, w_zp = _large_case(c + oc, c, oc, groups, 23, 17, x_dt)
    for stride, dilation, pads in [((1, 1), (1, 1), (1, 1, 1, 1)), ((2, 1), (1, 2), (2, 0, 1, 3))]:
        ref = ref_conv(x, w, bias, x_zp, w_zp, stride, pads, dilation, groups)
        got = conv2d_int8(x, w, bias, x_zp, w_zp, stride=stride, padding=pads, dilation=dilation, groups=groups)
        np.testing.assert_array_equal(got, ref)
        mult, shift = quantize_multiplier(np.geomspace(1e-4, 4.0, oc))  # right shifts and left shifts
        got8 = conv2d_int8(x, w, bias, x_zp, w_zp, stride=stride, padding=pads, dilation=dilation, groups=groups,
                           multiplier=mult, shift=shift, out_zp=-3, qmin=-3)
        want8 = ref_requantize(ref, mult.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1), -3, -3, 127)
        np.testing.assert_array_equal(got8, want8)


@pytest.mark.parametrize("x_dt", [np.int8, np.uint8])
@pytest.mark.parametrize("h, wd, k, stride, dilation", [
    (37, 83, 3, (1, 1), (1, 1)),    # rows past one 64-pixel tile, then a masked 16-pixel tail
    (20, 20, 3, (2, 2), (1, 1)),    # the detectors' stride-2 depthwise: row-phase images
    (31, 70, 5, (2, 1), (2, 1)),    # vertical stride only, dilated rows across phases
    (23, 41, 3, (3, 2), (1, 2)),    # three row phases, stride-2 columns, dilated columns
    (12, 15, 3, (1, 2), (1, 1)),    # horizontal stride only: shared image, rows under 16
])
def test_depthwise_kernels_bit_exact_on_long_rows(h, wd, k, stride, dilation, x_dt):
    """The direct and row-phase depthwise kernels at sizes the small property cases do not
    reach: several tiles per row, masked row ends, every stride path, per-channel weight zero
    points and both requantisation paths (right and left shifts)."""
    c, mult_ch = 24, 2
    rng = np.random.default_rng(h * wd + k)
    info = np.iinfo(x_dt)
    x = rng.integers(info.min, info.max + 1, (2, c, h, wd)).astype(x_dt)
    w = rng.integers(-128, 128, (c * mult_ch, 1, k, k)).astype(np.int8)
    bias = rng.integers(-5000, 5000, c * mult_ch).astype(np.int32)
    x_zp = int(rng.integers(info.min, info.max + 1))
    pads = (k // 2, k // 2 + 1, k // 2, 0)
    for w_zp in (0, rng.integers(-128, 128, c * mult_ch).astype(np.int32)):
        ref = ref_conv(x, w, bias, x_zp, np.broadcast_to(w_zp, (c * mult_ch,)), stride, pads, dilation, c)
        got = conv2d_int8(x, w, bias, x_zp, w_zp, stride=stride, padding=pads, dilation=dilation, groups=c)
        np.testing.assert_array_equal(got, ref)
        mult, shift = quantize_multiplier(np.geomspace(1e-4, 4.0, c * mult_ch))
        got8 = conv2d_int8(x, pack_conv_weights(w, c), bias, x_zp, w_zp, stride=stride, padding=pads,
                           dilation=dilation, groups=c, multiplier=mult, shift=shift, out_zp=5, qmin=-20,
                           out_dtype=np.int8)
        want8 = ref_requantize(ref, mult.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1), 5, -20, 127)
        np.testing.assert_array_equal(got8, want8)


@pytest.mark.parametrize("c, oc, groups", [(72, 13, 1), (10, 14, 2)])
def test_portable_kernel_bit_exact(c, oc, groups):
    """The direct int16 kernel that runs where the CPU has no AVX-512 VNNI (switched on here)."""
    from edge_compress.kernels import int8

    x, w, bias, x_zp, w_zp = _large_case(7, c, oc, groups, 9, 11, np.uint8)
    before = int8.USE_VNNI
    int8.USE_VNNI = False
    try:
        got = conv2d_int8(x, w, bias, x_zp, w_zp, stride=2, padding=1, groups=groups)
    finally:
        int8.USE_VNNI = before
    np.testing.assert_array_equal(got, ref_conv(x, w, bias, x_zp, w_zp, (2, 2), (1, 1, 1, 1), (1, 1), groups))


def test_packed_weights_reused_and_checked():
    from edge_compress.kernels.int8 import pack_conv_weights

    x, w, bias, x_zp, w_zp = _large_case(3, 12, 9, 3, 8, 8, np.uint8)
    packed = pack_conv_weights(w, groups=3)
    for scale in (1, 2):  # the same packed weights on two inputs
        xs = (x // scale).astype(np.uint8)
        got = conv2d_int8(xs, packed, bias, x_zp, w_zp, padding=1, groups=3)
        np.testing.assert_array_equal(got, ref_conv(xs, w, bias, x_zp, w_zp, (1, 1), (1, 1, 1, 1), (1, 1), 3))
    with pytest.raises(ConfigError, match="packed for groups=3"):
        conv2d_int8(x, packed, groups=1)
    with pytest.raises(ConfigError, match="divisible by groups"):
        pack_conv_weights(w, groups=2)


@pytest.mark.parametrize("vnni", [True, False])
def test_gemm_across_many_tiles_bit_exact(vnni):
    """A (M, K) x (K, N) larger than a tile in every direction, K not a multiple of 4, signed a."""
    from edge_compress.kernels import int8

    if vnni and not int8.USE_VNNI:
        pytest.skip("this CPU has no AVX-512 VNNI: the portable kernel is the one that runs")
    rng = np.random.default_rng(8)
    a = rng.integers(-128, 128, (70, 301)).astype(np.int8)
    b = rng.integers(-128, 128, (301, 53)).astype(np.int8)
    b_zp = rng.integers(-128, 128, 53)
    before = int8.USE_VNNI
    int8.USE_VNNI = vnni
    try:
        got = gemm_s8s8_s32(a, b, -7, b_zp)
    finally:
        int8.USE_VNNI = before
    np.testing.assert_array_equal(got, (a.astype(np.int64) + 7) @ (b.astype(np.int64) - b_zp))
