"""Calibrators against independent computations on known distributions."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_compress.errors import ConfigError
from edge_compress.quant import QuantConfig
from edge_compress.quant.calibrators import TensorStats, compute_range, quant_error

BINS = 2048


def stats_of(x: np.ndarray) -> TensorStats:
    s = TensorStats()
    s.observe_range(x)
    s.observe_hist(x, BINS)
    return s


def brute_force_mse(x: np.ndarray, lo: float, hi: float) -> float:
    """Quantize-dequantize every sample on the uint8 grid of [lo, hi] (the reference)."""
    scale = (hi - lo) / 255
    zp = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zp, 0, 255)
    return float(np.mean((x - (q - zp) * scale) ** 2))


def test_streaming_statistics_equal_one_pass():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000)
    a, b = TensorStats(), stats_of(x)
    for part in np.array_split(x, 7):
        a.observe_range(part)
    for part in np.array_split(x, 7):
        a.observe_hist(part, BINS)
    assert (a.lo, a.hi) == (b.lo, b.hi) and np.array_equal(a.counts, b.counts)


def test_minmax_is_the_observed_range_widened_to_zero():
    x = np.array([0.5, 2.0, 3.0])
    assert compute_range(stats_of(x), "minmax", BINS) == (0.0, 3.0)
    assert compute_range(stats_of(-x), "minmax", BINS) == (-3.0, 0.0)


def test_percentile_matches_numpy_within_a_bin():
    x = np.random.default_rng(1).laplace(size=200_000)
    lo, hi = compute_range(stats_of(x), "percentile", BINS, percentile=99.9)
    width = (x.max() - x.min()) / BINS
    assert abs(hi - np.percentile(x, 99.9)) <= 2 * width
    assert abs(lo - np.percentile(x, 0.1)) <= 2 * width


def test_histogram_error_model_agrees_with_brute_force():
    x = np.random.default_rng(2).standard_normal(100_000)
    s = stats_of(x)
    edges = s.edges(BINS)
    for lo, hi in [(-4.0, 4.0), (-2.0, 2.0), (-1.0, 3.0)]:
        est = float(quant_error(s.counts.astype(float), edges, lo, hi)[0])
        assert est == pytest.approx(brute_force_mse(x, lo, hi), rel=0.05)


def test_mse_range_beats_minmax_and_every_grid_point_on_heavy_tails():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(100_000), [30.0, -25.0]])   # two outliers
    s = stats_of(x)
    lo, hi = compute_range(s, "mse", BINS)
    assert hi < 30 and lo > -25                      # the outliers are clipped
    best = brute_force_mse(x, lo, hi)
    assert best < brute_force_mse(x, x.min(), x.max())
    for f in np.linspace(0.1, 1.0, 19):              # no symmetric shrink of the range does better
        assert best <= brute_force_mse(x, x.min() * f, x.max() * f) * 1.02


def test_entropy_clips_a_long_tail_but_not_a_uniform():
    rng = np.random.default_rng(4)
    u = rng.uniform(-1, 1, 200_000)
    lo, hi = compute_range(stats_of(u), "entropy", BINS)
    assert hi >= 0.9 and lo <= -0.9                 # nothing to gain from clipping a uniform
    t = np.concatenate([rng.standard_normal(200_000), rng.standard_normal(20) * 40])
    lo, hi = compute_range(stats_of(t), "entropy", BINS)
    assert hi < 0.5 * t.max() and lo > 0.5 * t.min()


def test_non_negative_tensor_keeps_zero_as_lower_bound():
    x = np.maximum(np.random.default_rng(5).standard_normal(50_000), 0)
    for method in ("minmax", "percentile", "entropy", "mse"):
        lo, hi = compute_range(stats_of(x), method, BINS)
        assert lo == 0.0 and 0 < hi <= x.max()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=200),
       st.sampled_from(["minmax", "percentile", "entropy", "mse"]))
def test_every_range_contains_zero_and_stays_inside_the_observed_one(values, method):
    x = np.asarray(values)
    lo, hi = compute_range(stats_of(x), method, BINS)
    assert min(x.min(), 0) - 1e-9 <= lo <= 0 <= hi <= max(x.max(), 0) + 1e-9


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="calibrator='kl'"):
        QuantConfig(calibrator="kl")
    with pytest.raises(ConfigError, match="num_images"):
        QuantConfig(num_images=0)
    with pytest.raises(ConfigError, match="unknown quant setting"):
        QuantConfig.from_dict({"calibrator": "mse", "bits": 4})
    assert QuantConfig.from_dict(QuantConfig(keep_fp32=("a",)).to_dict()) == QuantConfig(keep_fp32=("a",))
