"""Binary XNOR-popcount conv against a plain NumPy int64 {-1, +1} convolution.

The reference pads the sign tensor with +1 (the kernel's stated padding semantics) and sums
products tap by tap; it shares no code with the kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from edge_compress.errors import ConfigError  # noqa: E402
from edge_compress.kernels.binary import binary_conv2d, pack_bits, popcount64  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def signs(a):
    return np.where(np.asarray(a) >= 0, 1, -1).astype(np.int64)


def ref_binary_conv(x, w, stride, pads, dilation):
    """int64 conv of sign(x) and sign(w), padded with +1."""
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = stride, pads, dilation
    xp = np.pad(signs(x), ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=1)
    ws = signs(w)
    n, c, hp, wp = xp.shape
    oc, _, kh, kw = ws.shape
    oh = (hp - dh * (kh - 1) - 1) // sh + 1
    ow = (wp - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, oc, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
            out += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return out


def test_pack_bits_layout():
    """Channel c is bit c % 64 of word c // 64; x >= 0 (zero included) is +1 = bit 1; tail bits 0."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 130, 3, 2))
    x[0, 5, 0, 0] = 0.0
    packed = pack_bits(x)
    assert packed.shape == (2, 3, 2, 3) and packed.dtype == np.uint64
    for n, h, w in np.ndindex(2, 3, 2):
        for k in range(3):
            expect = sum(1 << (c - 64 * k) for c in range(64 * k, min(130, 64 * k + 64)) if x[n, c, h, w] >= 0)
            assert int(packed[n, h, w, k]) == expect
    assert int(packed[0, 0, 0, 0]) >> 5 & 1 == 1


def test_popcount_intrinsic():
    rng = np.random.default_rng(2)
    words = rng.integers(0, 2**64, 200, dtype=np.uint64, endpoint=False)
    for v in list(words) + [np.uint64(0), np.uint64(2**64 - 1), np.uint64(1 << 63)]:
        assert popcount64(v) == int(v).bit_count()


@st.composite
def binary_cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    assume(h + pads[0] + pads[2] >= dilation[0] * (kh - 1) + 1)
    assume(w + pads[1] + pads[3] >= dilation[1] * (kw - 1) + 1)
    # Channel counts around the 64-bit word boundaries.
    c = draw(st.sampled_from([1, 3, 63, 64, 65, 100, 128, 129]))
    return dict(n=draw(st.integers(1, 2)), c=c, oc=draw(st.integers(1, 5)), kh=kh, kw=kw, stride=stride,
                dilation=dilation, pads=pads, h=h, w=w, seed=draw(st.integers(0, 2**31 - 1)))


@SETTINGS
@given(case=binary_cases())
def test_binary_conv_bit_exact(case):
    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["n"], case["c"], case["h"], case["w"]))
    w = rng.standard_normal((case["oc"], case["c"], case["kh"], case["kw"]))
    got = binary_conv2d(pack_bits(x), pack_bits(w), case["c"], stride=case["stride"], padding=case["pads"],
                        dilation=case["dilation"])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref_binary_conv(x, w, case["stride"], case["pads"], case["dilation"]))


def test_padding_is_plus_one():
    """All-(-1) input and weights: interior taps give +1 each, padded taps (+1 * -1) give -1,
    so a 3x3 corner with padding 1 sees 4 real and 5 padded taps: C * (4 - 5)."""
    c = 70
    x = -np.ones((1, c, 4, 4))
    w = -np.ones((1, c, 3, 3))
    got = binary_conv2d(pack_bits(x), pack_bits(w), c, padding=1)
    assert got[0, 0, 0, 0] == c * (4 - 5)
    assert got[0, 0, 1, 1] == c * 9
    assert got[0, 0, 0, 1] == c * (6 - 3)


def test_per_channel_scale():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 20, 5, 5))
    w = rng.standard_normal((4, 20, 3, 3))
    scale = np.abs(w).mean(axis=(1, 2, 3)).astype(np.float32)  # XNOR-Net's alpha
    got = binary_conv2d(pack_bits(x), pack_bits(w), 20, padding=1, scale=scale)
    ref = ref_binary_conv(x, w, (1, 1), (1, 1, 1, 1), (1, 1)).astype(np.float32) * scale[None, :, None, None]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)


def test_binary_conv_rejects_bad_input():
    x = pack_bits(np.ones((1, 70, 4, 4)))
    w = pack_bits(np.ones((2, 70, 3, 3)))
    with pytest.raises(ConfigError, match="in_channels=200"):
        binary_conv2d(x, w, 200)
    with pytest.raises(ConfigError, match="uint64"):
        binary_conv2d(x.astype(np.int64), w, 70)
    with pytest.raises(ConfigError, match="per-output-channel"):
        binary_conv2d(x, w, 70, scale=np.ones(3))
    with pytest.raises(ConfigError, match="larger than the padded input"):
        binary_conv2d(x, pack_bits(np.ones((2, 70, 5, 5))), 70)


def test_binary_conv_many_tiles_bit_exact():
    """Several 4-channel x 32-pixel tiles with remainders, 3 words with tail bits, strides and
    dilation through the stride-phase planes; the int32 result may be a strided view."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 150, 23, 19))
    w = rng.standard_normal((37, 150, 3, 3))
    for stride, dilation, pads in [((1, 1), (1, 1), (1, 1, 1, 1)), ((2, 1), (1, 2), (2, 0, 1, 3))]:
        got = binary_conv2d(pack_bits(x), pack_bits(w), 150, stride=stride, padding=pads, dilation=dilation)
        ref = ref_binary_conv(x, w, stride, pads, dilation)
        np.testing.assert_array_equal(np.ascontiguousarray(got), ref)
        scale = rng.uniform(0.1, 1.0, 37).astype(np.float32)
        scaled = binary_conv2d(pack_bits(x), pack_bits(w), 150, stride=stride, padding=pads, dilation=dilation,
                               scale=scale)
        np.testing.assert_array_equal(scaled, ref.astype(np.float32) * scale[None, :, None, None])
