"""Sparse fp32 conv2d: unstructured CSR, 4x1 block-sparse (BSR) and N:M (2:4) weights.

A conv is a GEMM ``out (O, P) = W (O, K) @ cols (K, P)`` with ``K = C * KH * KW`` (C outermost,
i.e. ``w.reshape(O, -1)``) and ``P = OH * OW``. With sparse W and dense activations each output
channel is ``sum_j value_j * cols[k_j, :]`` over that row's nonzeros: contiguous AXPYs along P
(the sparse-weight x dense-activation product of "Fast Sparse ConvNets", Elsen et al., CVPR
2020, arXiv:1911.09723, which XNNPACK ships for 1x1 convs).

Operand: a 1x1 stride-1 conv reads the NCHW activation itself (it *is* ``cols``). Any other
stride-1 conv reads the zero-padded input flattened per channel: on the padded-width output
grid, tap (c, i, j) of every output pixel q is ``xp[c, q + i*dh*Wp + j*dw]``, so a nonzero is
one row offset and no im2col copy is made (the Wp - OW extra columns are computed and dropped).
Strided convs im2col first. Each nonzero becomes one offset into the flattened operand.

Product: P is walked in register tiles (``TILE`` = 64 pixels = 8 AVX2 vectors). The tile's
accumulators live on the stack (``_stack_f32``) with constant indices only, so LLVM keeps them
in registers for the whole nonzero loop: per nonzero one broadcast and 8 FMAs with memory
operands, nothing stored until the row is done. Tasks are (pixel tile, block of 16 output
channels), tiles outermost, so the column tile stays in cache across the output channels.

BSR (4x1 blocks: 4 consecutive output channels share a K column) is the "blocked" variant:
one column load feeds 4 FMAs and the per-row overhead is shared by 4 channels, ~1.4-1.6x faster
per stored weight than CSR on this CPU; it pays only for weights pruned in such blocks (an
unstructured mask fills most blocks partly, and ``BSRWeights.density`` says how many entries
are stored). CSR is the format for unstructured masks.

N:M sparsity (Mishra et al., "Accelerating Sparse Deep Neural Networks", arXiv:2104.08378,
NVIDIA's 2:4) keeps at most N nonzeros in every group of M consecutive K entries; the
compressed format stores the N kept values per group plus their positions inside the group
(uint8 here, 2 bits in hardware). The fixed count per row needs no indptr; the product is the
CSR one. On a CPU 2:4 is only 50% sparse, so it is slower than a dense GEMM (measured ~0.5x of
ONNX Runtime); it is here to run 2:4-pruned layers exactly, not for speed.

Only ``groups == 1``: depthwise and grouped convs have K = KH * KW (* C/groups) per output
channel, too short to profit from skipping zeros, so they are rejected with a clear error.

A leaf module: NumPy and numba only. Compiled kernels are cached on disk (``cache=True``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from edge_compress.errors import ConfigError
from edge_compress.kernels.int8 import conv_geometry

# Output pixels per register tile of the CSR / N:M product: 8 AVX2 registers of accumulators
# (LLVM prefers 256-bit vectors on Intel CPUs even with AVX-512, and numba does not let a
# function ask for 512), leaving registers for the broadcast weight and the addresses. 32-pixel
# tiles get fully unrolled into scalar code before vectorisation; 128 was no faster.
TILE = 64
# Block-sparse product: BSR_ROWS output channels share each nonzero column, so one load of a
# column tile feeds BSR_ROWS FMAs; 4 channels x 32 pixels = 16 AVX2 accumulators.
BSR_ROWS = 4
BSR_TILE = 32
_BSR_ACC = BSR_ROWS * BSR_TILE


# --------------------------------------------------------------------------- formats


def _as_weight_2d(w2d, what: str) -> np.ndarray:
    w = np.asarray(w2d)
    if w.ndim != 2 or min(w.shape) < 1:
        raise ConfigError(f"{what} needs a 2-D weight (O, K) = w.reshape(O, -1), got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise ConfigError(f"{what} needs floating-point weights, got {w.dtype}")
    if not np.all(np.isfinite(w)):
        raise ConfigError(f"{what}: the weight holds NaN or inf; fix the layer's weights before packing")
    return w.astype(np.float32)


def _conv_weight_2d(w, what: str) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 4:
        raise ConfigError(f"{what} needs a conv weight (O, C, KH, KW), got shape {w.shape}")
    return w.reshape(w.shape[0], -1)


@dataclass(frozen=True, eq=False)
class CSRWeights:
    """Compressed sparse rows of a (O, K) weight: row ``o``'s nonzeros are
    ``values[indptr[o]:indptr[o+1]]`` at columns ``indices[...]`` (ascending)."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        o, k = self.shape
        if self.indptr.dtype != np.int32 or self.indices.dtype != np.int32 or self.values.dtype != np.float32:
            raise ConfigError(f"CSRWeights needs int32 indptr/indices and float32 values, got "
                              f"{self.indptr.dtype}, {self.indices.dtype}, {self.values.dtype}; build it with csr_pack")
        if self.indptr.shape != (o + 1,) or self.indptr[0] != 0 or np.any(np.diff(self.indptr) < 0):
            raise ConfigError(f"CSRWeights.indptr must be {o + 1} non-decreasing offsets from 0, "
                              f"got shape {self.indptr.shape}")
        nnz = int(self.indptr[-1])
        if self.indices.shape != (nnz,) or self.values.shape != (nnz,):
            raise ConfigError(f"CSRWeights: indptr says {nnz} nonzeros but indices/values have "
                              f"{self.indices.shape}/{self.values.shape}")
        if nnz and (self.indices.min() < 0 or self.indices.max() >= k):
            raise ConfigError(f"CSRWeights.indices must lie in [0, {k}), got [{self.indices.min()}, {self.indices.max()}]")

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def density(self) -> float:
        """Fraction of stored entries (1 - sparsity)."""
        return self.nnz / (self.shape[0] * self.shape[1])

    @classmethod
    def from_conv_weight(cls, w) -> "CSRWeights":
        """Pack a conv weight (O, C, KH, KW); K is the flattened (C, KH, KW), C outermost."""
        return csr_pack(_conv_weight_2d(w, "CSRWeights.from_conv_weight"))

    def to_dense(self) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        out[rows, self.indices] = self.values
        return out


def csr_pack(w2d) -> CSRWeights:
    """CSR of the nonzeros of a (O, K) weight (exact zeros are dropped, values kept bit for bit)."""
    w = _as_weight_2d(w2d, "csr_pack")
    rows, cols = np.nonzero(w)  # row-major order: rows ascending, columns ascending inside a row
    indptr = np.zeros(w.shape[0] + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=w.shape[0]), out=indptr[1:])
    return CSRWeights(indptr, cols.astype(np.int32), w[rows, cols], (int(w.shape[0]), int(w.shape[1])))


@dataclass(frozen=True, eq=False)
class NMWeights:
    """N:M compressed (O, K) weight: ``values`` (O, K*n/m) are the n kept entries of each group of
    m consecutive K entries, ``indices`` (O, K*n/m, uint8) their ascending positions in the group."""

    values: np.ndarray
    indices: np.ndarray
    n: int
    m: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        o, k = self.shape
        if not 1 <= self.n <= self.m <= 255 or k % self.m:
            raise ConfigError(f"NMWeights needs 1 <= n <= m <= 255 and K={k} a multiple of m={self.m}, got n={self.n}")
        kept = (o, k // self.m * self.n)
        if self.values.dtype != np.float32 or self.indices.dtype != np.uint8:
            raise ConfigError(f"NMWeights needs float32 values and uint8 indices, got {self.values.dtype}, "
                              f"{self.indices.dtype}; build it with nm_pack")
        if self.values.shape != kept or self.indices.shape != kept:
            raise ConfigError(f"NMWeights for shape {self.shape} at {self.n}:{self.m} needs values and indices of "
                              f"shape {kept}, got {self.values.shape}, {self.indices.shape}")
        pos = self.indices.reshape(o, -1, self.n)
        if pos.size and (pos.max() >= self.m or np.any(np.diff(pos.astype(np.int16), axis=-1) <= 0)):
            raise ConfigError(f"NMWeights.indices must be strictly ascending positions in [0, {self.m}) per group")

    @property
    def density(self) -> float:
        return self.n / self.m

    @classmethod
    def from_conv_weight(cls, w, n: int = 2, m: int = 4) -> "NMWeights":
        """Pack a conv weight (O, C, KH, KW); K is the flattened (C, KH, KW), C outermost."""
        return nm_pack(_conv_weight_2d(w, "NMWeights.from_conv_weight"), n, m)

    def to_dense(self) -> np.ndarray:
        o, k = self.shape
        groups = k // self.m
        out = np.zeros((o, groups, self.m), np.float32)
        pos = self.indices.reshape(o, groups, self.n).astype(np.intp)
        np.put_along_axis(out, pos, self.values.reshape(o, groups, self.n), axis=-1)
        return out.reshape(o, k)


def nm_pack(w2d, n: int = 2, m: int = 4) -> NMWeights:
    """Compress a (O, K) weight that has at most ``n`` nonzeros in each group of ``m`` consecutive
    K entries. Groups with fewer nonzeros keep zeros at their first free positions."""
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer)) and 1 <= n <= m <= 255):
        raise ConfigError(f"nm_pack needs integers 1 <= n <= m <= 255, got n={n!r}, m={m!r}")
    w = _as_weight_2d(w2d, "nm_pack")
    o, k = w.shape
    if k % m:
        raise ConfigError(f"nm_pack: K={k} is not a multiple of m={m}; an {n}:{m} layer needs C*KH*KW divisible by {m}")
    groups = w.reshape(o, k // m, m)
    nz = groups != 0
    counts = nz.sum(axis=-1)
    if np.any(counts > n):
        bad_o, bad_g = np.argwhere(counts > n)[0]
        raise ConfigError(f"nm_pack: row {bad_o}, group {bad_g} (K entries {bad_g * m}..{bad_g * m + m - 1}) has "
                          f"{counts[bad_o, bad_g]} nonzeros, more than n={n} of m={m}; prune the layer to {n}:{m} "
                          f"first ({int((counts > n).sum())} groups violate it)")
    # Stable sort puts the nonzeros first (in position order), then the zeros; keep n, re-sort.
    order = np.argsort(~nz, axis=-1, kind="stable")[..., :n]
    pos = np.sort(order, axis=-1)
    values = np.take_along_axis(groups, pos, axis=-1)
    return NMWeights(values.reshape(o, -1), pos.astype(np.uint8).reshape(o, -1), int(n), int(m), (o, k))


@dataclass(frozen=True, eq=False)
class BSRWeights:
    """Block-sparse rows of a (O, K) weight in blocks of ``BSR_ROWS`` (4) consecutive output
    channels x 1 K entry: block row ``r`` (channels 4r..4r+3) holds blocks
    ``indptr[r]:indptr[r+1]`` at columns ``indices[...]`` (ascending) with ``values[j]`` the 4
    channels' weights (zeros where a block is partly filled). O is padded to a multiple of 4."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        o, k = self.shape
        r_n = -(-o // BSR_ROWS)
        if self.indptr.dtype != np.int32 or self.indices.dtype != np.int32 or self.values.dtype != np.float32:
            raise ConfigError(f"BSRWeights needs int32 indptr/indices and float32 values, got "
                              f"{self.indptr.dtype}, {self.indices.dtype}, {self.values.dtype}; build it with bsr_pack")
        if self.indptr.shape != (r_n + 1,) or self.indptr[0] != 0 or np.any(np.diff(self.indptr) < 0):
            raise ConfigError(f"BSRWeights.indptr must be {r_n + 1} non-decreasing offsets from 0 (one per block "
                              f"row of {BSR_ROWS} channels), got shape {self.indptr.shape}")
        blocks = int(self.indptr[-1])
        if self.indices.shape != (blocks,) or self.values.shape != (blocks, BSR_ROWS):
            raise ConfigError(f"BSRWeights: indptr says {blocks} blocks but indices/values have "
                              f"{self.indices.shape}/{self.values.shape} (values need shape ({blocks}, {BSR_ROWS}))")
        if blocks and (self.indices.min() < 0 or self.indices.max() >= k):
            raise ConfigError(f"BSRWeights.indices must lie in [0, {k}), got [{self.indices.min()}, {self.indices.max()}]")

    @property
    def density(self) -> float:
        """Fraction of the (padded) weight stored: explicit zeros of partly filled blocks count."""
        return int(self.indptr[-1]) / ((len(self.indptr) - 1) * self.shape[1])

    @classmethod
    def from_conv_weight(cls, w) -> "BSRWeights":
        """Pack a conv weight (O, C, KH, KW); K is the flattened (C, KH, KW), C outermost."""
        return bsr_pack(_conv_weight_2d(w, "BSRWeights.from_conv_weight"))

    def to_dense(self) -> np.ndarray:
        o, k = self.shape
        out = np.zeros((len(self.indptr) - 1, BSR_ROWS, k), np.float32)
        rows = np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))
        out[rows, :, self.indices] = self.values
        return out.reshape(-1, k)[:o]


def bsr_pack(w2d) -> BSRWeights:
    """Blocks of 4 output channels x 1 K entry holding any nonzero (values bit for bit, zeros kept
    inside a block). Fast when the weight was pruned in such blocks (``density`` then equals the
    kept fraction); an unstructured mask fills most blocks partly and stores far more entries."""
    w = _as_weight_2d(w2d, "bsr_pack")
    o, k = w.shape
    r_n = -(-o // BSR_ROWS)
    padded = np.zeros((r_n * BSR_ROWS, k), np.float32)
    padded[:o] = w
    blocks = padded.reshape(r_n, BSR_ROWS, k)
    rows, cols = np.nonzero(np.any(blocks != 0, axis=1))
    indptr = np.zeros(r_n + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=r_n), out=indptr[1:])
    return BSRWeights(indptr, cols.astype(np.int32), np.ascontiguousarray(blocks[rows, :, cols]), (o, k))


# --------------------------------------------------------------------------- kernels



@intrinsic
def _stack_f32(typingctx, size):
    """A float32 buffer of ``size`` (a literal) on the stack. Unlike a heap array, LLVM knows it
    aliases nothing, so with constant-trip loops over it (``TILE``) SROA keeps it in registers:
    the accumulator tile never touches memory inside the nonzero loop."""
    if not isinstance(size, types.IntegerLiteral):
        return None

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=size.literal_value)

    return types.CPointer(types.float32)(size), codegen


# Output channels per parallel task: enough to amortise the task's index arithmetic (64-bit
# divisions cost more than a tile of FMAs), few enough to balance threads on 20x20 maps.
O_BLOCK = 16


@numba.njit(cache=True, inline="always")
def _n_tiles(p_n, tile, a):
    """Pixel tiles covering [0, P): from 0, or (``a`` > 0) one tile at 0 and then tiles from the
    first 64-byte boundary ``a``, so every tile but the first and the last loads whole cache lines."""
    if a == 0:
        return (p_n + tile - 1) // tile
    return 1 + (p_n - a + tile - 1) // tile


@numba.njit(cache=True, inline="always")
def _task_range(task, n_tiles, o_blocks, p_n, o_n, tile, o_block, a):
    """(n, p0, keep, o0, o1) of a parallel task, tasks ordered (n, tile, output block).

    The task computes pixels [p0, p0 + tile) and stores those from p0 + keep on. Tiles start at
    t * tile, or with ``a`` > 0 (the operand rows start ``a`` floats before a 64-byte boundary)
    at 0 and then at a + (t - 1) * tile: aligned loads, the second tile overlapping the first
    by ``tile - a`` pixels that it does not store. When P is not reached exactly the last tile
    is shifted back to end at P (keep skips what the previous tile owns), so every tile runs
    the register path; the caller ensures P >= tile.
    """
    n = task // (n_tiles * o_blocks)
    rest = task - n * n_tiles * o_blocks
    t = rest // o_blocks
    ob = rest - t * o_blocks
    if a == 0:
        p0 = t * tile
        prev_end = p0
    elif t == 0:
        p0 = 0
        prev_end = 0
    else:
        p0 = a + (t - 1) * tile
        prev_end = tile if t == 1 else p0
    if p0 + tile > p_n:
        p0 = p_n - tile
    return n, p0, prev_end - p0 if prev_end > p0 else 0, ob * o_block, min((ob + 1) * o_block, o_n)


@numba.njit(cache=True, inline="always")
def _store_tile(acc, off, tile, dst, keep, spill):
    """dst[keep:tile] = acc[off + keep:off + tile], indexing acc only with constants (``off`` and
    ``tile`` are constants at every call): one variable index would make LLVM keep the whole
    accumulator in memory. A partial store goes through the stack buffer ``spill``."""
    if keep == 0:
        for p in range(tile):
            dst[p] = acc[off + p]
    else:
        for p in range(tile):
            spill[p] = acc[off + p]
        for p in range(keep, tile):
            dst[p] = spill[p]


@numba.njit(cache=True, parallel=True, fastmath={"contract"})
def _csr_matmul(indptr, offsets, values, cols, bias, p_n, a, out):
    """out[n, o, p] = bias[o] + sum_j values[j] * cols[n, offsets[j] + p] over row o's nonzeros
    j, for p < P (``_taps`` turns a weight's K index into the offset of its operand row).

    cols (N, L) the flattened operand, out (N, O, P), P >= TILE. One parallel task per (n, pixel tile, block of
    output channels), tiles outermost so a thread's consecutive tasks reuse the same column tile
    from L1/L2. The tile's accumulators live in registers (``_stack_f32``) across the nonzeros.
    """
    batch, o_n = out.shape[0], out.shape[1]
    n_tiles = _n_tiles(p_n, TILE, a)
    o_blocks = (o_n + O_BLOCK - 1) // O_BLOCK
    for task in numba.prange(batch * n_tiles * o_blocks):
        n, p0, keep, o0, o1 = _task_range(task, n_tiles, o_blocks, p_n, o_n, TILE, O_BLOCK, a)
        b = cols[n]
        acc = numba.carray(_stack_f32(TILE), TILE)
        spill = numba.carray(_stack_f32(TILE), TILE)
        for o in range(o0, o1):
            for p in range(TILE):
                acc[p] = bias[o]
            for j in range(indptr[o], indptr[o + 1]):
                q = offsets[j] + p0
                src = b[q:q + TILE]
                v = values[j]
                for p in range(TILE):
                    acc[p] += v * src[p]
            _store_tile(acc, 0, TILE, out[n, o, p0:p0 + TILE], keep, spill)


@numba.njit(cache=True, parallel=True, fastmath={"contract"})
def _nm_matmul(offsets, values, cols, bias, p_n, a, out):
    """``_csr_matmul`` for a weight with the same number of kept entries in every row (N:M):
    offsets and values are (O, kept), no indptr."""
    batch, o_n = out.shape[0], out.shape[1]
    kept = values.shape[1]
    n_tiles = _n_tiles(p_n, TILE, a)
    o_blocks = (o_n + O_BLOCK - 1) // O_BLOCK
    for task in numba.prange(batch * n_tiles * o_blocks):
        n, p0, keep, o0, o1 = _task_range(task, n_tiles, o_blocks, p_n, o_n, TILE, O_BLOCK, a)
        b = cols[n]
        acc = numba.carray(_stack_f32(TILE), TILE)
        spill = numba.carray(_stack_f32(TILE), TILE)
        for o in range(o0, o1):
            for p in range(TILE):
                acc[p] = bias[o]
            for i in range(kept):
                q = offsets[o, i] + p0
                src = b[q:q + TILE]
                v = values[o, i]
                for p in range(TILE):
                    acc[p] += v * src[p]
            _store_tile(acc, 0, TILE, out[n, o, p0:p0 + TILE], keep, spill)


@numba.njit(cache=True)
def _nm_columns(positions, n_keep, m_group):
    """K index of every kept N:M entry: (i // n) * m + positions[o, i]."""
    k = np.empty(positions.shape, np.int32)
    for o in range(positions.shape[0]):
        for i in range(positions.shape[1]):
            k[o, i] = (i // n_keep) * m_group + positions[o, i]
    return k


@numba.njit(cache=True, parallel=True, fastmath={"contract"})
def _bsr_matmul(indptr, offsets, values, cols, bias, p_n, a, out):
    """out[n, 4r + v, p] = bias + sum_j values[j, v] * cols[n, offsets[j] + p] over block row r.

    As ``_csr_matmul`` with a block row (4 output channels) in place of a row; ``bias`` and
    ``out`` have the channels padded to whole block rows.
    """
    batch = out.shape[0]
    r_n = indptr.shape[0] - 1
    r_block = O_BLOCK // BSR_ROWS
    n_tiles = _n_tiles(p_n, BSR_TILE, a)
    r_blocks = (r_n + r_block - 1) // r_block
    for task in numba.prange(batch * n_tiles * r_blocks):
        n, p0, keep, r0, r1 = _task_range(task, n_tiles, r_blocks, p_n, r_n, BSR_TILE, r_block, a)
        b = cols[n]
        acc = numba.carray(_stack_f32(_BSR_ACC), _BSR_ACC)
        spill = numba.carray(_stack_f32(BSR_TILE), BSR_TILE)
        for r in range(r0, r1):
            b0 = bias[r * BSR_ROWS]
            b1 = bias[r * BSR_ROWS + 1]
            b2 = bias[r * BSR_ROWS + 2]
            b3 = bias[r * BSR_ROWS + 3]
            for p in range(BSR_TILE):
                acc[p] = b0
                acc[BSR_TILE + p] = b1
                acc[2 * BSR_TILE + p] = b2
                acc[3 * BSR_TILE + p] = b3
            for j in range(indptr[r], indptr[r + 1]):
                q = offsets[j] + p0
                src = b[q:q + BSR_TILE]
                v0 = values[j, 0]
                v1 = values[j, 1]
                v2 = values[j, 2]
                v3 = values[j, 3]
                for p in range(BSR_TILE):
                    s = src[p]
                    acc[p] += v0 * s
                    acc[BSR_TILE + p] += v1 * s
                    acc[2 * BSR_TILE + p] += v2 * s
                    acc[3 * BSR_TILE + p] += v3 * s
            o = r * BSR_ROWS  # unrolled by hand: constant offsets into acc (see _store_tile)
            _store_tile(acc, 0, BSR_TILE, out[n, o, p0:p0 + BSR_TILE], keep, spill)
            _store_tile(acc, BSR_TILE, BSR_TILE, out[n, o + 1, p0:p0 + BSR_TILE], keep, spill)
            _store_tile(acc, 2 * BSR_TILE, BSR_TILE, out[n, o + 2, p0:p0 + BSR_TILE], keep, spill)
            _store_tile(acc, 3 * BSR_TILE, BSR_TILE, out[n, o + 3, p0:p0 + BSR_TILE], keep, spill)


@numba.njit(cache=True, parallel=True)
def _im2col(xp, kh_n, kw_n, sh, sw, dh, dw, oh_n, ow_n, cols):
    """cols[n, (c, i, j), oh * OW + ow] = xp[n, c, oh*sh + i*dh, ow*sw + j*dw] (xp already padded)."""
    batch, c_n = xp.shape[0], xp.shape[1]
    for task in numba.prange(batch * c_n):
        n = task // c_n
        c = task % c_n
        for i in range(kh_n):
            for j in range(kw_n):
                row = cols[n, (c * kh_n + i) * kw_n + j]
                for oh in range(oh_n):
                    src = xp[n, c, oh * sh + i * dh]
                    dst = row[oh * ow_n:(oh + 1) * ow_n]
                    if sw == 1:  # a contiguous copy LLVM vectorises
                        dst[:] = src[j * dw:j * dw + ow_n]
                    else:
                        for ow in range(ow_n):
                            dst[ow] = src[ow * sw + j * dw]


@numba.njit(cache=True)
def _decode_taps(k, direct, kh_n, kw_n, dh, dw, pitch, row_len, offsets):
    """Offset in the flattened operand of the row that weight column k multiplies. Direct: k =
    (c, i, j) reads channel c shifted by i*dh*pitch + j*dw; otherwise row k (im2col or 1x1)."""
    kf = k.ravel()
    of = offsets.ravel()
    for t in range(kf.shape[0]):
        if direct:
            c = kf[t] // (kh_n * kw_n)
            r = kf[t] - c * kh_n * kw_n
            of[t] = c * row_len + (r // kw_n) * dh * pitch + (r % kw_n) * dw
        else:
            of[t] = np.int64(kf[t]) * row_len


# --------------------------------------------------------------------------- conv2d


def _check_conv_args(x, k_weight: int, o: int, kh: int, kw: int, in_channels: int, bias, what: str):
    x = np.asarray(x)
    if x.dtype != np.float32 or x.ndim != 4:
        raise ConfigError(f"{what} needs a float32 activation (N, C, H, W), got {x.dtype} {x.shape}")
    if min(kh, kw) < 1 or in_channels < 1:
        raise ConfigError(f"{what} needs kh, kw, in_channels >= 1, got {kh}, {kw}, {in_channels}")
    if x.shape[1] != in_channels:
        raise ConfigError(f"{what}: x has {x.shape[1]} channels but in_channels={in_channels}")
    if k_weight != in_channels * kh * kw:
        per_tap = k_weight / (kh * kw)
        hint = ""
        if per_tap.is_integer() and per_tap >= 1 and in_channels % per_tap == 0:
            hint = (f" (the weight holds {int(per_tap)} input channels per output channel: a grouped/depthwise conv "
                    f"with groups={in_channels // int(per_tap)}; sparse kernels support groups=1 only, run that "
                    f"layer with the fp32 or int8 kernels)")
        raise ConfigError(f"{what}: the weight has K={k_weight} columns but in_channels * kh * kw = "
                          f"{in_channels} * {kh} * {kw} = {in_channels * kh * kw}{hint}")
    b = np.zeros(o, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)
    if b.shape != (o,):
        raise ConfigError(f"{what}: bias must have {o} values (one per output channel), got {np.shape(bias)}")
    return np.ascontiguousarray(x), b


def _column_stride(p: int) -> int:
    """Row length of the im2col buffer: P rounded up to whole 64-byte lines, an odd number of them,
    so the K rows of a pixel tile spread over the L1 sets (a row stride that is a multiple of
    1 KiB, e.g. 80x80 pixels, maps them onto a quarter of the sets)."""
    lines = -(-p // 16)
    return 16 * (lines + 1 - lines % 2)


@dataclass(frozen=True)
class _Operand:
    """The dense operand of the product and how to read the output back.

    ``cols`` (N, R, L): ``direct`` says R = C read at the tap's shift (``_decode_taps``), else
    R = K read from 0 (im2col or a 1x1 conv's own input). The product writes ``p_n`` >= TILE
    pixels; the first ``oh * pitch`` are the (OH, pitch) grid whose first OW columns are the output.
    """

    cols: np.ndarray
    direct: bool
    kh: int
    kw: int
    dh: int
    dw: int
    pitch: int
    oh: int
    ow: int
    p_n: int


def _operand(x, kh, kw, stride, padding, dilation) -> _Operand:
    """A 1x1 stride-1 conv reads x itself. Any other stride-1 conv reads the zero-padded input
    flattened per channel ("direct"): output pixel q = oh * Wp + ow and tap (c, i, j) read
    xp[c, q + i*dh*Wp + j*dw], contiguous in q, so no im2col copy (columns ow >= OW of the
    padded-width grid are computed and dropped). Strided convs im2col into (N, K, P)."""
    n, c, h, wd = x.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr), (oh, ow) = conv_geometry(h, wd, kh, kw, stride, padding, dilation)
    if kh == kw == sh == sw == 1 and pt == pl == pb == pr == 0 and h * wd >= TILE:
        return _Operand(x.reshape(n, c, h * wd), False, 1, 1, 1, 1, wd, oh, ow, h * wd)
    if sh == sw == 1:
        hp, wp = h + pt + pb, wd + pl + pr
        p_n = max(oh * wp, TILE)
        length = (kh - 1) * dh * wp + (kw - 1) * dw + p_n  # the last tap's reach
        flat = np.zeros((n, c, max(length, hp * wp)), np.float32)
        flat[:, :, :hp * wp].reshape(n, c, hp, wp)[:, :, pt:pt + h, pl:pl + wd] = x
        return _Operand(flat, True, kh, kw, dh, dw, wp, oh, ow, p_n)
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    p_n = max(oh * ow, TILE)
    cols = aligned_empty((n, c * kh * kw, _column_stride(p_n)))
    cols[:, :, oh * ow:] = 0
    _im2col(xp, kh, kw, sh, sw, dh, dw, oh, ow, cols)
    return _Operand(cols, False, kh, kw, dh, dw, ow, oh, ow, p_n)


def _taps(op: _Operand, k: np.ndarray) -> np.ndarray:
    """int64 offsets into the flattened operand rows of weight columns k (any shape)."""
    offsets = np.empty(k.shape, np.int64)
    _decode_taps(np.ascontiguousarray(k), op.direct, op.kh, op.kw, op.dh, op.dw, op.pitch, op.cols.shape[2], offsets)
    return offsets


def aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte (cache line) boundary,
    as ONNX Runtime's allocator returns them: NumPy only promises 16 bytes."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _line_shift(op: _Operand) -> int:
    """Floats from the operand's start to its next 64-byte boundary when every operand row the
    product reads starts at the same offset within a cache line (rows of whole lines, read from
    their start: a 1x1 conv's input, im2col columns), else 0. Unaligned 64-float tiles load
    five cache lines instead of four: about a third slower measured on the 1x1 convs."""
    cols = op.cols
    addr, row_bytes = cols.ctypes.data, cols.strides[1]
    if op.direct or addr % 4 or row_bytes % 64 or not cols.flags.c_contiguous:
        return 0
    return (-addr % 64) // 4


def _run(kernel, args, op: _Operand, o: int, bias) -> np.ndarray:
    """Run a product kernel into a fresh (N, O, OH, OW) output. The kernel writes ``len(bias)``
    channels (block-padded for BSR) of ``op.p_n`` pixels; the padding is cut off here."""
    n = op.cols.shape[0]
    out = aligned_empty((n, len(bias), op.p_n))   # the next layer's operand: lines whole when P % 16 == 0
    kernel(*args, op.cols.reshape(n, -1), bias, op.p_n, _line_shift(op), out)
    grid = out[:, :o, :op.oh * op.pitch].reshape(n, o, op.oh, op.pitch)[:, :, :, :op.ow]
    return grid if grid.flags.c_contiguous else np.ascontiguousarray(grid)


def sparse_conv2d_csr(x, csr: CSRWeights, kh: int, kw: int, in_channels: int, stride=1, padding=0, dilation=1,
                      bias=None) -> np.ndarray:
    """fp32 conv2d (NCHW, groups=1) with CSR weights from ``csr_pack(w.reshape(O, -1))``.

    ``padding`` is an int, (ph, pw) or ONNX (top, left, bottom, right) and pads with zeros.
    Returns float32 (N, O, OH, OW).
    """
    if not isinstance(csr, CSRWeights):
        raise ConfigError(f"sparse_conv2d_csr needs CSRWeights from csr_pack, got {type(csr).__name__}")
    o, k = csr.shape
    x, b = _check_conv_args(x, k, o, kh, kw, in_channels, bias, "sparse_conv2d_csr")
    op = _operand(x, kh, kw, stride, padding, dilation)
    return _run(_csr_matmul, (csr.indptr, _taps(op, csr.indices), csr.values), op, o, b)


def sparse_conv2d_nm(x, nmw: NMWeights, kh: int, kw: int, in_channels: int, stride=1, padding=0, dilation=1,
                     bias=None) -> np.ndarray:
    """fp32 conv2d (NCHW, groups=1) with N:M weights from ``nm_pack(w.reshape(O, -1), n, m)``."""
    if not isinstance(nmw, NMWeights):
        raise ConfigError(f"sparse_conv2d_nm needs NMWeights from nm_pack, got {type(nmw).__name__}")
    o, k = nmw.shape
    x, b = _check_conv_args(x, k, o, kh, kw, in_channels, bias, "sparse_conv2d_nm")
    op = _operand(x, kh, kw, stride, padding, dilation)
    return _run(_nm_matmul, (_taps(op, _nm_columns(nmw.indices, nmw.n, nmw.m)), nmw.values), op, o, b)


def sparse_conv2d_bsr(x, bsr: BSRWeights, kh: int, kw: int, in_channels: int, stride=1, padding=0, dilation=1,
                      bias=None) -> np.ndarray:
    """fp32 conv2d (NCHW, groups=1) with 4x1 block-sparse weights from ``bsr_pack(w.reshape(O, -1))``."""
    if not isinstance(bsr, BSRWeights):
        raise ConfigError(f"sparse_conv2d_bsr needs BSRWeights from bsr_pack, got {type(bsr).__name__}")
    o, k = bsr.shape
    x, b = _check_conv_args(x, k, o, kh, kw, in_channels, bias, "sparse_conv2d_bsr")
    op = _operand(x, kh, kw, stride, padding, dilation)
    b_padded = np.zeros((len(bsr.indptr) - 1) * BSR_ROWS, np.float32)
    b_padded[:o] = b
    return _run(_bsr_matmul, (bsr.indptr, _taps(op, bsr.indices), bsr.values), op, o, b_padded)
