"""Binary (XNOR-popcount) conv2d on sign bits packed along input channels into uint64 words.

With activations and weights in {-1, +1} encoded as bits (1 = +1, 0 = -1), a dot product of
length K is ``K - 2 * popcount(x XOR w)`` (XNOR-Net, Rastegari et al., ECCV 2016,
arXiv:1603.05279): one XOR and one POPCNT replace 64 multiply-adds. The result is scaled per
output channel by a float (the mean |w| of XNOR-Net, or a learned scale).

Layout: ``pack_bits`` puts channels last, so a pixel is ``ceil(C / 64)`` words; channel ``c``
is bit ``c % 64`` of word ``c // 64``. Tail bits past C are 0 in both operands, so their XOR
is 0 and they never count.

Padding semantics: a padded position holds the value **+1** on every channel (bits 1).
0 is not representable in a sign encoding, so "zero padding" cannot be done; +1 is the
choice of Larq / daBNN-style kernels ("one padding"). Every output therefore sums over all
``K = C * KH * KW`` taps, border or not, and a model trained for this kernel must be trained
with +1 padding (pad the sign input with 1.0).

Speed: the conv is an implicit GEMM on the stride-phase planes of the packed words
(``edge_compress.kernels.int8.Planes``): a register tile of 4 output channels x 32 output
pixels, each step one broadcast weight word and four 8-word activation vectors, XOR then
``llvm.ctpop.v8i64`` (VPOPCNTQ where the CPU has AVX-512 VPOPCNTDQ, a shuffle-based
popcount elsewhere: the IR is portable) and a vector add.

A leaf module: NumPy and numba only; the popcount is LLVM's ``llvm.ctpop`` intrinsic.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from edge_compress.errors import ConfigError
from edge_compress.kernels.int8 import Planes, conv_geometry, tile_intrinsic

WORD_BITS = 64


@intrinsic
def _popcount64(typingctx, x):
    """popcount of a uint64 via the ``llvm.ctpop.i64`` intrinsic (numba has no np.bitwise_count)."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None
    sig = types.uint64(x)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.ctpop.i64")
        return builder.call(fn, [args[0]])

    return sig, codegen


@numba.njit(cache=True)
def popcount64(word):
    """Number of set bits in a 64-bit word (a jitted wrapper, also callable from Python)."""
    return _popcount64(np.uint64(word))


def n_words(channels: int) -> int:
    return (channels + WORD_BITS - 1) // WORD_BITS


def pack_bits(x, axis: int = 1) -> np.ndarray:
    """Signs of ``x`` (bit 1 where x >= 0, i.e. +1) packed along ``axis`` into uint64 words.

    The packed axis moves last: an activation (N, C, H, W) becomes (N, H, W, ceil(C/64)),
    a weight (OC, C, KH, KW) with ``axis=1`` becomes (OC, KH, KW, ceil(C/64)).
    """
    x = np.asarray(x)
    if x.ndim == 0:
        raise ConfigError("pack_bits needs an array with a channel axis, got a scalar")
    bits = np.moveaxis(x >= 0, axis, -1)
    c = bits.shape[-1]
    pad = n_words(c) * WORD_BITS - c
    if pad:
        bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), bool)], axis=-1)
    # Little bit order inside each byte and little-endian bytes -> channel c is bit c % 64.
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)


def _ones_word_row(channels: int) -> np.ndarray:
    """The packed pixel of an all-(+1) input: every valid channel bit set, tail bits 0."""
    words = np.zeros(n_words(channels), np.uint64)
    for i in range(len(words)):
        valid = min(WORD_BITS, channels - i * WORD_BITS)
        words[i] = np.uint64((1 << valid) - 1) if valid < WORD_BITS else np.uint64(2**64 - 1)
    return words


def _xnor_step(builder, acc, xv, wb):
    """acc += popcount(x XOR w), lane-wise on 8 words."""
    ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc.type, [acc.type]), "llvm.ctpop.v8i64")
    return builder.add(acc, builder.call(ctpop, [builder.xor(xv, wb)]))


def _xnor_finish(builder, acc, k_total):
    """K - 2 * mismatches, truncated to int32 (|result| <= K)."""
    lanes = acc.type.count
    k = builder.insert_element(ir.Constant(acc.type, ir.Undefined), k_total, ir.Constant(ir.IntType(32), 0))
    k = builder.shuffle_vector(k, ir.Constant(acc.type, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))
    r = builder.sub(k, builder.shl(acc, ir.Constant(acc.type, [1] * lanes)))
    return builder.trunc(r, ir.VectorType(ir.IntType(32), lanes))


_OB, _PV = 4, 4
_PB = 8 * _PV  # output pixels per tile (4 vectors of 8 words)
_xnor_tile = tile_intrinsic(8, 64, _OB, _PV, _xnor_step, _xnor_finish)


@numba.njit(cache=True, parallel=True)
def _xnor_gemm(x, offs, wt, k_total, out):
    """out (OCp, Pp) = K - 2 popcount over the planes x at offs against wt (OCp, taps*words); parallel over pixel blocks."""
    n_ob = wt.shape[0] // _OB
    for pb in numba.prange(out.shape[1] // _PB):
        for ob in range(n_ob):
            _xnor_tile(x, offs, wt, out, pb * _PB, ob * _OB, k_total)


@numba.njit(cache=True, parallel=True)
def _gather(acc, ws, scale, out):
    """out[oc, oh, ow] = acc[oc, oh*ws + ow] (times scale[oc] when out is float)."""
    oc_n, oh_n, ow_n = out.shape
    for oc in numba.prange(oc_n):
        s = scale[oc]
        for oh in range(oh_n):
            row = acc[oc, oh * ws:oh * ws + ow_n]
            for ow in range(ow_n):
                out[oc, oh, ow] = row[ow] * s


def binary_conv2d(x_packed, w_packed, in_channels: int, stride=1, padding=0, dilation=1,
                  scale=None) -> np.ndarray:
    """Binary conv2d of packed signs: x (N, H, W, words), w (OC, KH, KW, words) from ``pack_bits``.

    Returns int32 ``K - 2 * popcount(x XOR w)`` (the exact {-1,+1} dot product, K = C*KH*KW)
    in NCHW, or float32 ``scale[oc] *`` that when a per-output-channel ``scale`` is given.
    The int32 result is a strided view of the kernel's padded tile buffer (no copy); call
    ``np.ascontiguousarray`` if a consumer needs contiguous memory.
    ``padding`` (int, (ph, pw) or (top, left, bottom, right)) pads with +1, see the module doc.
    """
    x_packed = np.asarray(x_packed)
    w_packed = np.asarray(w_packed)
    if x_packed.dtype != np.uint64 or w_packed.dtype != np.uint64:
        raise ConfigError(f"binary_conv2d needs uint64 words from pack_bits, got {x_packed.dtype}, {w_packed.dtype}")
    if x_packed.ndim != 4 or w_packed.ndim != 4:
        raise ConfigError(f"need x (N, H, W, words) and w (OC, KH, KW, words), got {x_packed.shape}, {w_packed.shape}")
    nw = n_words(in_channels)
    if in_channels < 1 or x_packed.shape[-1] != nw or w_packed.shape[-1] != nw:
        raise ConfigError(f"in_channels={in_channels} needs {nw} words per pixel, got x with "
                          f"{x_packed.shape[-1]} and w with {w_packed.shape[-1]}")
    n, h, wd, _ = x_packed.shape
    oc, kh, kw, _ = w_packed.shape
    (sh, sw), (dh, dw), (pt, pl_, pb, pr), (oh, ow) = conv_geometry(h, wd, kh, kw, stride, padding, dilation)
    ocp = -(-oc // _OB) * _OB
    wt = np.zeros((ocp, kh * kw * nw), np.uint64)
    wt[:oc] = w_packed.transpose(0, 3, 1, 2).reshape(oc, -1)  # k = (word, tap), the planes' order
    scaled = scale is not None
    s = np.ones(oc, np.float32) if not scaled else np.asarray(scale, np.float32)
    if s.ndim == 0:
        s = np.full(oc, s, np.float32)
    if s.shape != (oc,):
        raise ConfigError(f"scale must be a scalar or {oc} per-output-channel values, got shape {s.shape}")
    ones = _ones_word_row(in_channels)  # +1 padding
    planes = [Planes(x_packed[i].transpose(2, 0, 1), ones, kh, kw, (sh, sw), (dh, dw), (pt, pl_, pb, pr), (oh, ow), _PB)
              for i in range(n)]
    acc = np.empty((n, ocp, planes[0].padded), np.int32)
    for i, pl in enumerate(planes):
        _xnor_gemm(pl.x, pl.offs, wt, np.int64(in_channels * kh * kw), acc[i])
    ws = planes[0].ws
    if not scaled:  # a strided view: each output row is followed by ws - OW dropped columns
        return acc[:, :oc, :oh * ws].reshape(n, oc, oh, ws)[..., :ow]
    out = np.empty((n, oc, oh, ow), np.float32)
    for i in range(n):
        _gather(acc[i], ws, s, out[i])
    return out
