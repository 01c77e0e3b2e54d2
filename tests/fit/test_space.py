"""The search space: knobs, precision layers, and analytic shapes equal to what pruning builds."""

import random

import pytest
import torch

from edge_compress.compress.structured import prune_channels
from edge_compress.errors import ConfigError
from edge_compress.fit.space import Candidate, SearchSpace
from edge_compress.models import create_detector


@pytest.fixture(scope="module", params=["yolo_tiny", "ssdlite_mbv3", "picodet_s"])
def model(request):
    torch.manual_seed(0)
    return create_detector(request.param, class_names=("a", "b", "c"), input_size=96).eval()


def _built_rows(model, space, c):
    import copy

    m = copy.deepcopy(model)
    ratios = space.prune_ratios(c)
    if ratios:
        prune_channels(m, space.prune_config(c))
    convs = dict(m.named_modules())
    return {n: (convs[n].in_channels, convs[n].out_channels) for n in space.convs}


def test_analytic_layers_match_the_pruned_model(model):
    space = SearchSpace(model)
    rng = random.Random(0)
    cands = [space.smallest(), space.uniform(0.5)] + [space.random(rng) for _ in range(4)]
    for c in cands:
        want = _built_rows(model, space, c)
        got = {r.name: (r.in_channels, r.out_channels) for r in space.layers(c)}
        assert got == want, c


def test_knobs_share_no_conv_and_skip_negligible_layers(model):
    space = SearchSpace(model)
    convs = [c for k in space.knobs for c in k.convs]
    assert len(convs) == len(set(convs)) and space.knobs
    total = sum(space.full_macs(n) for n in space.convs)
    assert all(k.macs >= 0.005 * total for k in space.knobs)
    assert not any(space.convs[n].head_output for n in space.precision_layers)


def test_baseline_and_smallest(model):
    space = SearchSpace(model)
    base = space.layers(space.baseline())
    assert all(r.in_channels == space.convs[r.name].in_channels and r.precision == "fp32" for r in base)
    small = space.layers(space.smallest())
    assert sum(r.macs for r in small) < 0.6 * sum(r.macs for r in base)
    assert {r.precision for r in small if r.name in space.precision_layers} == {"int8"}
    assert all(r.out_channels % space.round_to == 0 or r.out_channels == r.orig_out_channels for r in small)


def test_fp32_only_backend_has_no_precision_layers(model):
    space = SearchSpace(model, precisions=("fp32",))
    assert space.precision_layers == () and space.smallest().int8 == ()


def test_int8_everywhere_searches_the_pruning_only(model):
    per_layer, fixed = SearchSpace(model), SearchSpace(model, int8_everywhere=True)
    assert fixed.precision_layers == () and fixed.knobs == per_layer.knobs
    assert fixed.fingerprint() != per_layer.fingerprint()
    c = fixed.uniform(0.5)
    assert fixed.any_int8(c) and fixed.keep_fp32(c) == ()
    rows, reference = fixed.layers(c), per_layer.layers(per_layer.uniform(0.5, True))
    assert rows == reference                      # the same model as the per-layer space's all-int8 candidate
    assert {r.precision for r in rows if not fixed.convs[r.name].head_output} == {"int8"}
    with pytest.raises(ConfigError, match="int8"):
        SearchSpace(model, precisions=("fp32",), int8_everywhere=True)


def test_candidate_round_trip_and_key():
    c = Candidate((0.0, 0.5), (True, False))
    assert Candidate.from_dict(c.to_dict()) == c and c.key() == Candidate.from_dict(c.to_dict()).key()
    assert c.key() != Candidate((0.0, 0.25), (True, False)).key()


def test_bad_inputs_are_errors(model):
    with pytest.raises(ConfigError, match="must include 0"):
        SearchSpace(model, ratios=(0.25, 0.5))
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        SearchSpace(model, ratios=(0.0, 1.0))
    with pytest.raises(ConfigError, match="fp16"):
        SearchSpace(model, precisions=("fp32", "fp16"))
    space = SearchSpace(model)
    with pytest.raises(ConfigError, match="knobs"):
        space.layers(Candidate((0.0,), ()))
    bad = Candidate((0.3,) * len(space.knobs), (False,) * len(space.precision_layers))
    with pytest.raises(ConfigError, match="not among"):
        space.layers(bad)


def test_precision_boundaries_follow_the_graph(model):
    from edge_compress.fit.space import INPUT

    space = SearchSpace(model)
    first = next(iter(space.convs))
    assert space.producers[first] == (INPUT,)
    # only the stem reads the image (a Resize's empty optional input, roi "", is no graph input)
    assert [n for n, p in space.producers.items() if INPUT in p] == [first]
    assert all(space.producers[n] for n in space.convs)
    fp32 = space.layers(space.baseline())
    assert not any(r.boundary_in_elems or r.boundary_out_elems for r in fp32)
    int8 = {r.name: r for r in space.layers(space.uniform(0.0, True))}
    # all int8: the image is quantised once, and the int8 convs feeding the fp32 head outputs dequantise
    assert int8[first].boundary_in_elems == int8[first].in_elems
    heads = [n for n, c in space.convs.items() if c.head_output]
    feeding = {p for h in heads for p in space.producers[h]}
    assert {n for n, r in int8.items() if r.boundary_out_elems} == feeding
    # one fp32 layer in the middle of the int8 chain adds boundaries around it
    j = len(space.precision_layers) // 2
    bits = [True] * len(space.precision_layers)
    bits[j] = False
    mixed = space.layers(Candidate(space.uniform(0.0, True).ratios, tuple(bits)))
    assert sum(r.boundary_in_elems + r.boundary_out_elems for r in mixed) > \
        sum(r.boundary_in_elems + r.boundary_out_elems for r in int8.values())
