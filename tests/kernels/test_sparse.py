"""Sparse fp32 conv (CSR, 4x1 block-sparse BSR and N:M) against a plain NumPy float64 convolution.

Formats: pack/unpack round trips give back the dense matrix bit for bit. Numerics: the
kernels' float32 output against an fp64 reference conv of the same (sparse) weight that
shares no code with the kernels, within 1e-5 of the output's largest magnitude (float32
sums of up to a few hundred terms). Property tests cover shapes, strides, padding, dilation,
sparsity levels (incl. all-zero rows) and random 2:4 patterns.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from edge_compress.errors import ConfigError  # noqa: E402
from edge_compress.kernels.sparse import (  # noqa: E402
    BSR_ROWS,
    BSRWeights,
    CSRWeights,
    NMWeights,
    bsr_pack,
    csr_pack,
    nm_pack,
    sparse_conv2d_bsr,
    sparse_conv2d_csr,
    sparse_conv2d_nm,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RTOL = 1e-5  # relative to max |reference|


def ref_conv(x, w, bias, stride, pads, dilation):
    """float64 conv: zero padding, sum tap by tap (einsum), plus bias."""
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = stride, pads, dilation
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    w = w.astype(np.float64)
    n, c, hp, wp = xp.shape
    oc, _, kh, kw = w.shape
    oh = (hp - dh * (kh - 1) - 1) // sh + 1
    ow = (wp - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, oc, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + (0 if bias is None else np.asarray(bias, np.float64).reshape(1, -1, 1, 1))


def assert_close(got, ref):
    assert got.dtype == np.float32 and got.shape == ref.shape
    scale = max(float(np.abs(ref).max()), 1e-6)
    np.testing.assert_allclose(got, ref, rtol=0, atol=RTOL * scale)


def sparse_weight(rng, shape, sparsity, zero_rows=0):
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < sparsity] = 0
    w[:zero_rows] = 0
    return w


def block_sparse_weight(rng, shape, sparsity, zero_rows=0):
    """Zeros in whole blocks of BSR_ROWS output channels x 1 K entry, plus unstructured zeros
    inside the kept blocks (partly filled blocks) and all-zero leading rows."""
    o = shape[0]
    keep = rng.random((-(-o // BSR_ROWS), int(np.prod(shape[1:])))) >= sparsity
    mask = np.repeat(keep, BSR_ROWS, axis=0)[:o].reshape(shape) & (rng.random(shape) >= 0.2)
    w = (rng.standard_normal(shape) * mask).astype(np.float32)
    w[:zero_rows] = 0
    return w


def two_four_weight(rng, shape, n=2, m=4):
    """A weight with exactly n nonzeros in each group of m along the flattened (C, KH, KW)."""
    o = shape[0]
    w = rng.standard_normal(shape).astype(np.float32).reshape(o, -1, m)
    w[w == 0] = 1.0
    keep = np.argsort(rng.random(w.shape), axis=-1)[..., :n]
    mask = np.zeros(w.shape, bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    return (w * mask).reshape(shape)


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_csr_round_trip_is_exact(sparsity):
    rng = np.random.default_rng(0)
    w = sparse_weight(rng, (37, 53), sparsity, zero_rows=3)
    csr = csr_pack(w)
    assert csr.indptr.dtype == np.int32 and csr.indices.dtype == np.int32 and csr.values.dtype == np.float32
    np.testing.assert_array_equal(csr.to_dense(), w)
    assert csr.nnz == int((w != 0).sum())
    assert csr.density == pytest.approx((w != 0).mean())
    assert np.all(np.diff(csr.indptr)[:3] == 0)  # the all-zero rows hold nothing


def test_csr_from_conv_weight_flattens_c_outermost():
    rng = np.random.default_rng(1)
    w = sparse_weight(rng, (4, 3, 2, 5), 0.5)
    csr = CSRWeights.from_conv_weight(w)
    assert csr.shape == (4, 30)
    np.testing.assert_array_equal(csr.to_dense(), w.reshape(4, -1))
    o, k = np.argwhere(w.reshape(4, -1) != 0)[0]
    c, i, j = np.unravel_index(k, (3, 2, 5))
    assert csr.values[csr.indptr[o]] == w[o, c, i, j]


@pytest.mark.parametrize("o", [1, 4, 7, 9])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_bsr_round_trip_is_exact(o, sparsity):
    rng = np.random.default_rng(o)
    w = block_sparse_weight(rng, (o, 29), sparsity, zero_rows=1)
    bsr = bsr_pack(w)
    assert bsr.values.shape == (bsr.indptr[-1], BSR_ROWS) and bsr.indices.dtype == np.int32
    np.testing.assert_array_equal(bsr.to_dense(), w)
    blocks = np.pad(w, ((0, -o % BSR_ROWS), (0, 0))).reshape(-1, BSR_ROWS, 29)
    assert bsr.indptr[-1] == int(np.any(blocks != 0, axis=1).sum())  # exactly the blocks holding a nonzero
    assert bsr.density == pytest.approx(bsr.indptr[-1] / (blocks.shape[0] * 29))


def test_bsr_from_conv_weight_and_unstructured_fill_in():
    """A 4x1 block covers channels 4r..4r+3 at one (c, i, j); unstructured zeros fill blocks partly."""
    rng = np.random.default_rng(3)
    w = sparse_weight(rng, (8, 3, 3, 3), 0.9)
    bsr = BSRWeights.from_conv_weight(w)
    np.testing.assert_array_equal(bsr.to_dense(), w.reshape(8, -1))
    assert bsr.density >= (w != 0).mean()


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_round_trip_is_exact(n, m):
    rng = np.random.default_rng(2)
    w = two_four_weight(rng, (9, 4 * m), n, m)
    w[0, :m] = 0  # a group with fewer than n nonzeros keeps zeros
    w[1, m:m + 1] = 0
    nmw = nm_pack(w, n, m)
    assert nmw.values.shape == (9, 4 * n) and nmw.indices.dtype == np.uint8
    np.testing.assert_array_equal(nmw.to_dense(), w)
    assert np.all(nmw.indices.reshape(9, 4, n) < m)
    assert np.all(np.diff(nmw.indices.reshape(9, 4, n).astype(int), axis=-1) > 0)


def test_nm_positions_are_the_kept_entries():
    w = np.array([[0, 3, 0, -2, 5, 0, 0, 0]], np.float32)
    nmw = nm_pack(w)
    np.testing.assert_array_equal(nmw.values, [[3, -2, 5, 0]])
    np.testing.assert_array_equal(nmw.indices, [[1, 3, 0, 1]])


def test_nm_pack_names_the_offending_group():
    w = np.zeros((3, 8), np.float32)
    w[2, 4:7] = 1.0  # row 2, group 1: three nonzeros
    with pytest.raises(ConfigError, match=r"row 2, group 1 .* 3 nonzeros, more than n=2 of m=4"):
        nm_pack(w)
    with pytest.raises(ConfigError, match="K=6 is not a multiple of m=4"):
        nm_pack(np.zeros((2, 6), np.float32))
    with pytest.raises(ConfigError, match="1 <= n <= m"):
        nm_pack(np.zeros((2, 8), np.float32), n=5, m=4)
    with pytest.raises(ConfigError, match="2-D weight"):
        nm_pack(np.zeros((2, 2, 2, 2), np.float32))


def test_pack_rejects_bad_weights():
    with pytest.raises(ConfigError, match="NaN or inf"):
        csr_pack(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ConfigError, match="floating-point"):
        csr_pack(np.ones((2, 2), np.int8))
    with pytest.raises(ConfigError, match=r"conv weight \(O, C, KH, KW\)"):
        CSRWeights.from_conv_weight(np.ones((2, 3)))
    csr = csr_pack(np.eye(3, dtype=np.float32))
    with pytest.raises(ConfigError, match="indices must lie in"):
        CSRWeights(csr.indptr, csr.indices + 1, csr.values, (3, 3))
    bsr = bsr_pack(np.eye(8, dtype=np.float32))
    with pytest.raises(ConfigError, match=r"values need shape \(8, 4\)"):
        BSRWeights(bsr.indptr, bsr.indices, bsr.values[:, :2].copy(), (8, 8))
    with pytest.raises(ConfigError, match="strictly ascending"):
        NMWeights(np.ones((1, 2), np.float32), np.array([[1, 1]], np.uint8), 2, 4, (1, 4))


# --------------------------------------------------------------------------- conv numerics


@st.composite
def conv_cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    assume(h + pads[0] + pads[2] >= dilation[0] * (kh - 1) + 1)
    assume(w + pads[1] + pads[3] >= dilation[1] * (kw - 1) + 1)
    return dict(n=draw(st.integers(1, 2)), c=draw(st.integers(1, 9)), oc=draw(st.integers(1, 20)), kh=kh, kw=kw,
                stride=stride, dilation=dilation, pads=pads, h=h, w=w, sparsity=draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])),
                zero_rows=draw(st.integers(0, 3)), bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _run_case(case, weight_fn, pack, conv):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"])).astype(np.float32)
    w = weight_fn(rng, (case["oc"], case["c"], case["kh"], case["kw"]))
    bias = rng.standard_normal(case["oc"]).astype(np.float32) if case["bias"] else None
    got = conv(x, pack(w), case["kh"], case["kw"], case["c"], stride=case["stride"], padding=case["pads"],
               dilation=case["dilation"], bias=bias)
    assert_close(got, ref_conv(x, w, bias, case["stride"], case["pads"], case["dilation"]))


@SETTINGS
@given(case=conv_cases())
def test_csr_conv_matches_fp64(case):
    def weight(rng, shape):
        return sparse_weight(rng, shape, case["sparsity"], case["zero_rows"])

    _run_case(case, weight, CSRWeights.from_conv_weight, sparse_conv2d_csr)


@SETTINGS
@given(case=conv_cases())
def test_bsr_conv_matches_fp64(case):
    def weight(rng, shape):
        return block_sparse_weight(rng, shape, case["sparsity"], case["zero_rows"])

    _run_case(case, weight, BSRWeights.from_conv_weight, sparse_conv2d_bsr)


@SETTINGS
@given(case=conv_cases(), nm=st.sampled_from([(2, 4), (1, 4), (2, 8)]))
def test_nm_conv_matches_fp64(case, nm):
    n, m = nm
    assume(case["c"] * case["kh"] * case["kw"] % m == 0)
    _run_case(case, lambda rng, shape: two_four_weight(rng, shape, n, m),
              lambda w: NMWeights.from_conv_weight(w, n, m), sparse_conv2d_nm)


# P = 35 (< TILE: padded), 64 (one tile), 130 and 135 (last tile shifted back), 256, 400.
@pytest.mark.parametrize("hw", [(5, 7), (8, 8), (10, 13), (9, 15), (16, 16), (20, 20)])
@pytest.mark.parametrize("ksize", [1, 3])
def test_tiles_and_shifted_last_tile(hw, ksize):
    """Maps around and above one register tile (P < TILE padded, P % TILE != 0 shifted back),
    with more output channels than one task block: every pixel of every channel is right."""
    rng = np.random.default_rng(hw[0] * 100 + hw[1] + ksize)
    x = rng.standard_normal((2, 12, *hw)).astype(np.float32)
    w = sparse_weight(rng, (40, 12, ksize, ksize), 0.8, zero_rows=2)
    bias = rng.standard_normal(40).astype(np.float32)
    ref = ref_conv(x, w, bias, (1, 1), (ksize // 2,) * 4, (1, 1))
    assert_close(sparse_conv2d_csr(x, csr_pack(w.reshape(40, -1)), ksize, ksize, 12, padding=ksize // 2, bias=bias),
                 ref)
    wb = block_sparse_weight(rng, (38, 12, ksize, ksize), 0.7, zero_rows=1)  # 38: a half-filled last block row
    assert_close(sparse_conv2d_bsr(x, bsr_pack(wb.reshape(38, -1)), ksize, ksize, 12, padding=ksize // 2, bias=bias[:38]),
                 ref_conv(x, wb, bias[:38], (1, 1), (ksize // 2,) * 4, (1, 1)))
    w24 = two_four_weight(rng, (40, 12, ksize, ksize))
    ref24 = ref_conv(x, w24, bias, (1, 1), (ksize // 2,) * 4, (1, 1))
    assert_close(sparse_conv2d_nm(x, nm_pack(w24.reshape(40, -1)), ksize, ksize, 12, padding=ksize // 2, bias=bias),
                 ref24)


def test_detector_sized_1x1_matches_fp64():
    """A 1x1 layer of the benchmark's size runs on the NCHW input directly (80x80 = 100 tiles)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 64, 80, 80)).astype(np.float32)
    bias = rng.standard_normal(128).astype(np.float32)
    w = sparse_weight(rng, (128, 64, 1, 1), 0.9)
    assert_close(sparse_conv2d_csr(x, CSRWeights.from_conv_weight(w), 1, 1, 64, bias=bias),
                 ref_conv(x, w, bias, (1, 1), (0, 0, 0, 0), (1, 1)))
    wb = block_sparse_weight(rng, (128, 64, 1, 1), 0.9)
    assert_close(sparse_conv2d_bsr(x, BSRWeights.from_conv_weight(wb), 1, 1, 64, bias=bias),
                 ref_conv(x, wb, bias, (1, 1), (0, 0, 0, 0), (1, 1)))


def test_all_zero_weight_gives_the_bias():
    x = np.random.default_rng(6).standard_normal((1, 5, 9, 9)).astype(np.float32)
    bias = np.arange(7, dtype=np.float32)
    got = sparse_conv2d_csr(x, csr_pack(np.zeros((7, 45), np.float32)), 3, 3, 5, padding=1, bias=bias)
    np.testing.assert_array_equal(got, np.broadcast_to(bias[None, :, None, None], (1, 7, 9, 9)))


# --------------------------------------------------------------------------- bad input


def test_conv_rejects_bad_input():
    x = np.zeros((1, 8, 6, 6), np.float32)
    csr = csr_pack(np.ones((4, 72), np.float32))
    with pytest.raises(ConfigError, match="float32 activation"):
        sparse_conv2d_csr(x.astype(np.float64), csr, 3, 3, 8)
    with pytest.raises(ConfigError, match="x has 8 channels but in_channels=4"):
        sparse_conv2d_csr(x, csr, 3, 3, 4)
    with pytest.raises(ConfigError, match="one per output channel"):
        sparse_conv2d_csr(x, csr, 3, 3, 8, bias=np.ones(3))
    with pytest.raises(ConfigError, match="larger than the padded input"):
        sparse_conv2d_csr(np.zeros((1, 8, 2, 2), np.float32), csr, 3, 3, 8)
    with pytest.raises(ConfigError, match="needs CSRWeights"):
        sparse_conv2d_csr(x, nm_pack(np.zeros((4, 72), np.float32)), 3, 3, 8)
    with pytest.raises(ConfigError, match="needs NMWeights"):
        sparse_conv2d_nm(x, csr, 3, 3, 8)
    with pytest.raises(ConfigError, match="needs BSRWeights"):
        sparse_conv2d_bsr(x, csr, 3, 3, 8)


def test_grouped_or_depthwise_weights_are_rejected():
    """A depthwise 3x3 weight (O, 1, 3, 3) has K = 9, not C * 9: say it is grouped, groups=1 only."""
    x = np.zeros((1, 8, 6, 6), np.float32)
    depthwise = csr_pack(np.ones((8, 9), np.float32))
    with pytest.raises(ConfigError, match=r"groups=8; sparse kernels support groups=1 only"):
        sparse_conv2d_csr(x, depthwise, 3, 3, 8)
    grouped = nm_pack(np.zeros((8, 36), np.float32))
    with pytest.raises(ConfigError, match=r"groups=2"):
        sparse_conv2d_nm(x, grouped, 3, 3, 8)
    with pytest.raises(ConfigError, match=r"groups=4"):
        sparse_conv2d_bsr(x, bsr_pack(np.ones((8, 18), np.float32)), 3, 3, 8)


# --------------------------------------------------------------------------- ONNX Runtime


def _ort_conv(x, w, bias, stride, pads, dilation):
    """ONNX Runtime's dense fp32 Conv of the same weight: a second, independent reference."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=list(stride), pads=list(pads),
                            dilations=list(dilation), kernel_shape=list(w.shape[2:]))
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("k, stride, pads, dilation", [
    (1, (1, 1), (0, 0, 0, 0), (1, 1)),
    (3, (1, 1), (1, 1, 1, 1), (1, 1)),
    (3, (2, 2), (1, 0, 2, 1), (1, 1)),
    (3, (1, 1), (2, 2, 2, 2), (2, 2)),
])
def test_formats_match_onnxruntime_conv(k, stride, pads, dilation):
    """The ONNX Conv semantics of stride, (top, left, bottom, right) pads and dilation, per format."""
    rng = np.random.default_rng(k * 10 + stride[0] + dilation[0])
    x = rng.standard_normal((2, 16, 23, 19)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    shape = (24, 16, k, k)
    for weight, pack, conv in [(sparse_weight(rng, shape, 0.9), CSRWeights.from_conv_weight, sparse_conv2d_csr),
                               (block_sparse_weight(rng, shape, 0.9), BSRWeights.from_conv_weight, sparse_conv2d_bsr),
                               (two_four_weight(rng, shape), NMWeights.from_conv_weight, sparse_conv2d_nm)]:
        got = conv(x, pack(weight), k, k, 16, stride=stride, padding=pads, dilation=dilation, bias=bias)
        assert_close(got, _ort_conv(x, weight, bias, stride, pads, dilation).astype(np.float64))


def test_formats_on_onnx_conv_node_cases(onnx_node_cases, onnx_conv_attrs):
    """onnx's own Conv node cases (pads, strides, asymmetric pads, auto_pad) through the CSR and
    BSR formats: the padding and geometry semantics, with the cases' dense weights packed as is
    (2:4 needs K divisible by 4, which their 3x3 single-channel weights are not)."""
    cases = [c for c in onnx_node_cases("test_", "Conv", "conv") if c[1].op_type == "Conv"]
    assert len(cases) >= 6
    for name, node, (x, w, *_), (y,) in cases:
        a = onnx_conv_attrs(node, x.shape, w.shape)
        if a["groups"] != 1:
            continue
        w2d = w.reshape(w.shape[0], -1)
        geo = dict(stride=a["stride"], padding=a["padding"], dilation=a["dilation"])
        kh, kw, c = w.shape[2], w.shape[3], w.shape[1]
        for fmt, conv in (("csr", lambda: sparse_conv2d_csr(x, csr_pack(w2d), kh, kw, c, **geo)),
                          ("bsr", lambda: sparse_conv2d_bsr(x, bsr_pack(w2d), kh, kw, c, **geo))):
            np.testing.assert_allclose(conv(), y, rtol=1e-5, atol=1e-5, err_msg=f"{name} {fmt}")


@pytest.mark.parametrize("shift", [0, 4, 12, 36, 60])
@pytest.mark.parametrize("hw", [(8, 8), (5, 20), (10, 10)])
def test_csr_and_nm_exact_at_every_cache_line_offset(shift, hw):
    """The pixel tiles follow the operand's offset within a cache line (a first tile at 0, the
    rest from the first boundary, the second one storing only what the first did not): every
    pixel is written once and right, whatever the offset and whether rows are whole lines."""
    from edge_compress.kernels.sparse import csr_pack, nm_pack, sparse_conv2d_csr, sparse_conv2d_nm

    rng = np.random.default_rng(shift + hw[1])
    c, o = 12, 20
    raw = np.empty(c * hw[0] * hw[1] * 4 + 128, np.uint8)
    start = (-raw.ctypes.data % 64) + shift
    x = raw[start:start + c * hw[0] * hw[1] * 4].view(np.float32).reshape(1, c, *hw)
    x[:] = rng.standard_normal(x.shape)
    w = rng.standard_normal((o, c)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0
    want = np.einsum("oc,nchw->nohw", w.astype(np.float64), x.astype(np.float64))
    np.testing.assert_allclose(sparse_conv2d_csr(x, csr_pack(w), 1, 1, c), want, rtol=1e-5, atol=1e-5)
    w24 = rng.standard_normal((o, c)).astype(np.float32)
    groups = w24.reshape(o, -1, 4)
    np.put_along_axis(groups, np.argsort(rng.random(groups.shape), axis=-1)[..., :2], 0.0, axis=-1)
    want24 = np.einsum("oc,nchw->nohw", w24.astype(np.float64), x.astype(np.float64))
    np.testing.assert_allclose(sparse_conv2d_nm(x, nm_pack(w24, 2, 4), 1, 1, c), want24, rtol=1e-5, atol=1e-5)
