"""The latency model: per-layer cost terms fitted by NNLS on relative error, its held-out report,
adaptive sampling and the environment key."""

import json
import random

import numpy as np
import pytest
import torch

from edge_compress.errors import ConfigError
from edge_compress.fit.latency import (LayerCosts, environment_key, feature_names, features, fit_latency,
                                       holdout_report, profiled_conv_ms, relative_errors, sampling_scores)
from edge_compress.fit.space import SearchSpace
from edge_compress.models import create_detector


@pytest.fixture(scope="module")
def space():
    torch.manual_seed(0)
    return SearchSpace(create_detector("yolo_tiny", class_names=("a",), input_size=96).eval())


def _design(space, n, seed=0):
    rng = random.Random(seed)
    cands = [space.baseline(), space.smallest()] + [space.random(rng) for _ in range(n - 2)]
    return cands, np.array([features(space.layers(c)) for c in cands])


def _truth(x):
    """A device whose int8 convs cost 0.3x fp32 per MAC and where every element costs a little."""
    w = np.zeros(len(feature_names()))
    names = feature_names()
    w[0] = 0.4
    for i, n in enumerate(names):
        if n.startswith("macs["):
            w[i] = (0.004 if ",int8]" in n else 0.012) * (3.0 if "depthwise" in n else 1.0)
        elif n.startswith("out_elems["):
            w[i] = 0.002
    w[names.index("int8_in_elems")] = 0.001
    w[names.index("quantize_boundary_elems")] = 0.004
    w[names.index("dequantize_boundary_elems")] = 0.004
    return x @ w


def test_features_sum_layer_terms(space):
    c = space.uniform(0.25, True)
    rows = space.layers(c)
    x = features(rows)
    assert x[0] == 1.0 and len(x) == len(feature_names())
    assert np.isclose(sum(x[1:7]) * 1e6, sum(r.macs for r in rows))
    assert np.isclose(x[-3] * 1e5, sum(r.in_elems for r in rows if r.precision == "int8"))
    assert np.isclose(x[-2] * 1e5, sum(r.boundary_in_elems for r in rows))
    assert np.isclose(x[-1] * 1e5, sum(r.boundary_out_elems for r in rows))


def test_fit_recovers_a_linear_device(space):
    cands, x = _design(space, 40)
    y = _truth(x) * np.random.default_rng(0).normal(1.0, 0.01, len(x))   # 1% timing noise
    model = fit_latency(x[:30], y[:30], {"device": "d"})
    err = relative_errors(model, x[30:], y[30:])
    assert np.abs(err).max() < 0.04
    assert (model.coef >= 0).all()
    per_layer = model.layer_costs(space.layers(cands[0]))
    assert np.isclose(sum(per_layer.values()) + model.coef[0], model.predict(x[0]))


def test_profiled_conv_ms_reads_both_runtimes_naming():
    """ONNX Runtime extends the conv node's name with a token (int8) or names a Conv+LeakyRelu after the
    activation's output (fp32), OpenVINO adds /WithoutBiases; the QuantizeLinear and reorders named after
    a conv are not its kernel, and a row goes to the conv with the longest matching name."""
    nodes = {"a.conv": ("/a/conv/Conv", "/a/conv/Conv_output_0", "/a/act/LeakyRelu", "/a/act/LeakyRelu_output_0"),
             "b.conv": ("/b/Conv",), "b2.conv": ("/b/Conv_1",), "c.conv": ("/c/conv/Conv",)}
    ort = {"layers": [
        {"name": "/a/act/LeakyRelu_output_0_nchwc", "op_type": "Conv", "median_us": 300.0},
        {"name": "/a/conv/Conv_output_0_QuantizeLinear", "op_type": "QuantizeLinear", "median_us": 50.0},
        {"name": "ReorderOutput_token_26", "op_type": "ReorderOutput", "median_us": 80.0},
        {"name": "/b/Conv_token_29", "op_type": "QLinearConv", "median_us": 200.0},
        {"name": "/b/Conv_1_token_31", "op_type": "QLinearConv", "median_us": 100.0},
        {"name": "/b/act/LeakyRelu", "op_type": "QLinearLeakyRelu", "median_us": 20.0}]}
    assert profiled_conv_ms(ort, nodes) == {"a.conv": 0.3, "b.conv": 0.2, "b2.conv": 0.1}
    ov = {"layers": [
        {"name": "images_DequantizeLinear_abcd_acdb_/a/conv/Conv/WithoutBiases", "op_type": "Reorder",
         "median_us": 110.0},
        {"name": "/a/conv/Conv/WithoutBiases", "op_type": "Convolution", "median_us": 260.0},
        {"name": "/c/conv/Conv/WithoutBiases", "op_type": "GroupConvolution", "median_us": 40.0}]}
    assert profiled_conv_ms(ov, nodes) == {"a.conv": 0.26, "c.conv": 0.04}


def test_layer_costs_fill_what_a_profile_misses():
    macs = {"a": 1000, "b": 2000, "c": 4000}
    costs = LayerCosts.from_profiles({"fp32": {"a": 1.0, "b": 4.0}, "int8": {"a": 0.5, "c": 2.0}}, macs)
    assert costs.ms_per_mac["fp32"]["a"] == 1e-3 and costs.ms_per_mac["int8"]["c"] == 0.5e-3
    # b in int8 and c in fp32: the other precision's figure times the int8/fp32 ratio of a (0.5)
    assert np.isclose(costs.ms_per_mac["int8"]["b"], 2e-3 * 0.5)
    assert np.isclose(costs.ms_per_mac["fp32"]["c"], 0.5e-3 / 0.5)
    assert costs.profiled == {"fp32": 2, "int8": 2}
    assert LayerCosts.from_dict(costs.to_dict()) == costs


def test_a_pruned_profile_gives_each_conv_its_line():
    """With a second profiled point a conv's time is the line through (pruned MACs, ms) and (full MACs, ms),
    not proportional to its MACs; below the pruned point the line goes on, never under the proportional
    time of the cheaper point, flat where pruning was no faster; a conv without a second point (or one that
    did not shrink) stays proportional."""
    full = {"a": 1000, "b": 2000, "c": 1000, "d": 800}
    costs = LayerCosts.from_profiles(
        {"fp32": {"a": 1.0, "b": 4.0, "c": 0.2, "d": 0.4}, "int8": {"a": 0.5}}, full,
        {"fp32": ({"a": 0.6, "b": 0.5, "c": 0.3, "d": 0.4}, {"a": 500, "b": 500, "c": 500, "d": 800})})
    assert set(costs.pruned["fp32"]) == {"a", "b", "c"}             # d was not pruned: no second point
    assert np.isclose(costs.ms("fp32", "a", 1000), 1.0) and np.isclose(costs.ms("fp32", "a", 500), 0.6)
    assert np.isclose(costs.ms("fp32", "a", 750), 0.8)              # on the line, not 0.75
    assert np.isclose(costs.ms("fp32", "a", 250), 0.4)              # extrapolated: 0.2 fixed + 0.0008 per MAC
    # b: cheaper per MAC pruned (0.001 against 0.002): the line, then the floor at 0.001 per MAC
    assert np.isclose(costs.ms("fp32", "b", 1250), 0.5 + 3.5 / 1500 * 750)
    assert np.isclose(costs.ms("fp32", "b", 250), 0.25)
    # c: the pruned profile was slower than the unpruned one: both points kept, flat below the pruned one
    assert np.isclose(costs.ms("fp32", "c", 1000), 0.2) and np.isclose(costs.ms("fp32", "c", 750), 0.25)
    assert np.isclose(costs.ms("fp32", "c", 500), 0.3) and np.isclose(costs.ms("fp32", "c", 250), 0.3)
    assert np.isclose(costs.ms("fp32", "d", 400), 0.2) and np.isclose(costs.ms("int8", "a", 500), 0.25)
    assert LayerCosts.from_dict(json.loads(json.dumps(costs.to_dict()))) == costs


def test_profiled_features_weigh_each_conv_by_its_own_cost(space):
    """With layer costs, the unpruned model's profiled-ms feature is the profile's sum; pruning a layer
    scales its term by the MACs kept."""
    ms = {n: 0.01 * (i + 1) for i, n in enumerate(space.convs)}
    costs = LayerCosts.from_profiles({"fp32": ms, "int8": {n: v / 3 for n, v in ms.items()}},
                                     {n: space.full_macs(n) for n in space.convs})
    names = feature_names(costs)
    assert names[1:3] == ["profiled_ms[fp32]", "profiled_ms[int8]"] and len(names) == len(feature_names()) - 4
    x = features(space.layers(space.baseline()), costs)
    assert np.isclose(x[1], sum(ms.values())) and x[2] == 0.0
    rows = space.layers(space.uniform(0.5, True))
    x8 = features(rows, costs)
    expect = sum(ms[r.name] / (3 if r.precision == "int8" else 1) * r.macs / space.full_macs(r.name) for r in rows)
    assert np.isclose(x8[1] + x8[2], expect) and x8[2] < sum(ms.values()) / 3
    model = fit_latency(np.array([x, x8, features(space.layers(space.smallest()), costs)]),
                        np.array([2.0, 0.8, 0.5]), {}, costs=costs)
    assert model.to_dict()["features"] == names and "layer_costs" in model.to_dict()
    assert np.isclose(sum(model.layer_costs(rows).values()) + model.coef[0], model.predict(x8))


def test_holdout_report_counts_only_unseen_candidates(space):
    cands, x = _design(space, 24, seed=1)
    y = _truth(x)
    held = np.arange(24) % 4 == 0
    rep = holdout_report(x, y, held, {"device": "d"}, [c.key() for c in cands])
    assert rep["n_fit"] == 18 and rep["n_heldout"] == 6 and len(rep["heldout"]) == 6
    assert rep["within_10pct"] == 1.0 and rep["p95_abs_rel_err"] < 0.02
    assert {h["key"] for h in rep["heldout"]} == {cands[i].key() for i in np.flatnonzero(held)}
    # a model that cannot explain the device is reported as such, not hidden
    bad = y * np.where(np.arange(24) % 2 == 0, 1.0, 1.6)
    assert holdout_report(x, bad, held, {}, [])["within_10pct"] < 1.0
    assert "too few" in holdout_report(x[:3], y[:3], np.array([True, False, False]), {}, [])["note"]


def test_sampling_prefers_unexplored_and_badly_predicted_regions(space):
    cands, x = _design(space, 30, seed=2)
    y = _truth(x)
    light = np.array([c.int8.count(True) == 0 for c in cands])     # fit only on fp32-only candidates
    seen_x, seen_y = x[light | (np.arange(30) < 2)], y[light | (np.arange(30) < 2)]
    model = fit_latency(seen_x, seen_y, {})
    new = np.array([features(space.layers(space.uniform(0.25, True))),
                    features(space.layers(space.uniform(0.25, False)))])
    s = sampling_scores(model, new, seen_x, seen_y)
    assert s[0] > s[1]


def test_environment_key_changes_with_the_runtime():
    a = {"device": "local", "backend": "openvino", "runtime_version": "2026.4.1", "threads": 1}
    assert environment_key(a) == environment_key(dict(reversed(list(a.items()))))
    assert environment_key(a) != environment_key({**a, "runtime_version": "2026.5.0"})
    assert environment_key(a) != environment_key({**a, "threads": 2})


def test_bad_measurements_are_errors(space):
    _, x = _design(space, 5)
    with pytest.raises(ConfigError, match="at least 3"):
        fit_latency(x[:2], np.array([1.0, 2.0]), {})
    with pytest.raises(ConfigError, match="<= 0"):
        fit_latency(x[:3], np.array([1.0, 0.0, 2.0]), {})
