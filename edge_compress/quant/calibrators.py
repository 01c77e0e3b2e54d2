"""Activation-range calibrators: one histogram of a tensor -> the range ``(lo, hi)`` to quantize.

Every calibrator reads the same statistics (exact min/max plus a fixed-range
histogram of the tensor over the calibration images), so switching calibrator
never re-runs calibration. The range always contains 0, so zero is exactly
representable (zero padding and ReLU outputs stay exact).

- ``minmax``: the observed range.
- ``percentile``: the ``p``-th and ``(100-p)``-th percentiles (Wu et al. 2020,
  "Integer quantization for deep learning inference").
- ``entropy``: the clipping threshold minimising the KL divergence between the
  histogram and its quantized version (Migacz 2017, TensorRT's calibrator),
  searched on ``|x|``; signed tensors get 128 levels per side, non-negative ones 256.
- ``mse``: the range minimising the expected squared quantization error
  (rounding inside, clipping outside) over the histogram, searched over ranges
  shrunk from the observed one (Banner et al. 2019 motivate clipping; the
  search is a plain grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_compress.errors import ConfigError

CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
LEVELS = 256   # 8-bit


@dataclass
class TensorStats:
    """Streaming statistics of one tensor: pass 1 sets ``lo``/``hi``, pass 2 fills ``counts``
    over ``bins`` equal bins spanning ``[lo, hi]`` (widened to contain 0)."""

    lo: float = np.inf
    hi: float = -np.inf
    counts: np.ndarray | None = None

    def observe_range(self, x: np.ndarray) -> None:
        if x.size:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))

    def edges(self, bins: int) -> np.ndarray:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if hi - lo <= 0:
            hi = lo + 1e-8
        return np.linspace(lo, hi, bins + 1)

    def observe_hist(self, x: np.ndarray, bins: int) -> None:
        c, _ = np.histogram(x, bins=self.edges(bins))
        self.counts = c.astype(np.int64) if self.counts is None else self.counts + c


def compute_range(stats: TensorStats, method: str, bins: int, percentile: float = 99.99) -> tuple[float, float]:
    """The calibrated ``(lo, hi)`` of one tensor (``lo <= 0 <= hi``)."""
    if method not in CALIBRATORS:
        raise ConfigError(f"unknown calibrator '{method}'; choose one of: {', '.join(CALIBRATORS)}")
    lo, hi = min(stats.lo, 0.0), max(stats.hi, 0.0)
    if method == "minmax" or stats.counts is None or stats.counts.sum() == 0 or hi - lo <= 0:
        return lo, hi
    edges = stats.edges(bins)
    if method == "percentile":
        return _percentile_range(stats.counts, edges, percentile)
    if method == "entropy":
        return _entropy_range(stats.counts, edges)
    return _mse_range(stats.counts, edges)


def _percentile_range(counts: np.ndarray, edges: np.ndarray, p: float) -> tuple[float, float]:
    if not 50.0 < p <= 100.0:
        raise ConfigError(f"percentile={p} must be in (50, 100]")
    cdf = np.cumsum(counts) / counts.sum()
    q = p / 100.0
    i_hi = int(np.searchsorted(cdf, q))                  # first bin reaching the upper quantile
    i_lo = int(np.searchsorted(cdf, 1.0 - q, side="right"))
    lo, hi = float(edges[min(i_lo, len(edges) - 1)]), float(edges[min(i_hi + 1, len(edges) - 1)])
    return min(lo, 0.0), max(hi, 0.0)


def _fold_abs(counts: np.ndarray, edges: np.ndarray, nbins: int) -> tuple[np.ndarray, float]:
    """Histogram of ``|x|`` over ``nbins`` bins on ``[0, max|x|]`` (bin centres re-binned)."""
    centres = 0.5 * (edges[:-1] + edges[1:])
    amax = float(max(abs(edges[0]), abs(edges[-1])))
    h, _ = np.histogram(np.abs(centres), bins=nbins, range=(0.0, amax), weights=counts)
    return h, amax


def _entropy_range(counts: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    lo, hi = float(edges[0]), float(edges[-1])
    signed = lo < 0 < hi and min(-lo, hi) > 1e-3 * max(-lo, hi)
    levels = LEVELS // 2 if signed else LEVELS
    h, amax = _fold_abs(counts, edges, len(counts))
    t_bin = _kl_threshold_bin(h.astype(np.float64), levels)
    t = amax * t_bin / len(h)
    return max(lo, -t), min(hi, t)


def _kl_threshold_bin(hist: np.ndarray, levels: int) -> int:
    """TensorRT's entropy calibration: for each candidate threshold bin ``i``, the reference
    P is ``hist[:i]`` with the clipped tail added to its last bin; Q spreads P's mass
    uniformly over the non-empty bins within each of ``levels`` groups; pick ``argmin KL(P||Q)``."""
    n = len(hist)
    if n <= levels:
        return n
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1, max(1, (n - levels) // 256)):
        ref = hist[:i]
        p = ref.copy()
        p[-1] += hist[i:].sum()
        if p.sum() == 0:
            continue
        nz = (p > 0).astype(np.float64)
        starts = (np.arange(levels) * i) // levels     # `levels` near-equal groups of bins
        mass, k = np.add.reduceat(ref, starts), np.add.reduceat(nz, starts)
        per = np.divide(mass, k, out=np.zeros_like(mass), where=k > 0)
        q = np.repeat(per, np.diff(np.append(starts, i))) * nz
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-30)
        m = pn > 0
        if np.any(qn[m] == 0):
            continue
        kl = float(np.sum(pn[m] * np.log(pn[m] / qn[m])))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


def quant_error(counts: np.ndarray, edges: np.ndarray, lo, hi) -> np.ndarray:
    """Expected squared error of asymmetric 8-bit quantization on ``[lo, hi]`` over the histogram.

    Values are taken at their bin centres: a clipped value errs by its distance to the
    range; a value inside errs by its rounding error when bins are finer than the
    quantization step, and by the uniform-rounding ``scale^2 / 12`` when they are coarser
    (the centre would then say nothing about where the values sit inside the step).
    ``lo``/``hi`` may be arrays of candidate ranges; returns one error per candidate."""
    centres = 0.5 * (edges[:-1] + edges[1:])
    width = float(edges[1] - edges[0])
    lo, hi = np.atleast_1d(np.asarray(lo, np.float64))[:, None], np.atleast_1d(np.asarray(hi, np.float64))[:, None]
    scale = np.maximum(hi - lo, 1e-12) / (LEVELS - 1)
    zp = np.round(-lo / scale)
    q = np.clip(np.round(centres / scale) + zp, 0, LEVELS - 1)
    err = (centres - (q - zp) * scale) ** 2
    inside = (centres >= lo) & (centres <= hi)
    err = np.where(inside & (width >= scale), scale ** 2 / 12.0, err)
    return (err @ counts) / max(counts.sum(), 1)


def _mse_range(counts: np.ndarray, edges: np.ndarray) -> tuple[float, float]:
    """Grid search over ``(lo * b, hi * a)`` with shrink factors in [0.05, 1]: a coarse 32-step
    grid, then a 16-step grid one coarse step around the best point."""
    lo, hi = float(edges[0]), float(edges[-1])
    counts = counts.astype(np.float64)
    two_sided = lo < 0 < hi

    def search(a_grid: np.ndarray, b_grid: np.ndarray) -> tuple[float, float]:
        a, b = np.meshgrid(a_grid, b_grid if two_sided else b_grid[:1] * 0 + 1, indexing="ij")
        cand_lo, cand_hi = (lo * b.ravel(), hi * a.ravel()) if hi > 0 else (lo * a.ravel(), np.zeros(a.size))
        i = int(np.argmin(quant_error(counts, edges, cand_lo, cand_hi)))
        return float(a.ravel()[i]), float(b.ravel()[i])

    coarse = np.linspace(1.0, 0.05, 32)
    step = coarse[0] - coarse[1]
    a0, b0 = search(coarse, coarse)

    def near(v: float) -> np.ndarray:
        return np.clip(np.linspace(v + step, v - step, 16), 0.05, 1.0)

    a, b = search(near(a0), near(b0))
    return (lo * b, hi * a) if hi > 0 else (lo * a, 0.0)
