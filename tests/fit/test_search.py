"""The searches against synthetic cost and accuracy: feasibility, optimality on a small space, Pareto."""

import itertools
import random

import pytest
import torch

from edge_compress.fit.latency import features
from edge_compress.fit.search import Memo, compress_moves, evolve, give_back, greedy, pareto, relax_moves
from edge_compress.fit.space import Candidate, SearchSpace
from edge_compress.models import create_detector


@pytest.fixture(scope="module")
def space():
    torch.manual_seed(0)
    return SearchSpace(create_detector("yolo_tiny", class_names=("a",), input_size=64).eval())


def _memo(space, budget_frac, seed=0):
    """Cost: MACs with int8 at 0.35x, over budget_frac of the baseline. Accuracy: layer drops that differ
    per knob and per layer (some layers nearly free, some costly), so a per-layer choice beats a uniform one."""
    rng = random.Random(seed)
    prune_w = [rng.choice([0.001, 0.01, 0.05]) for _ in space.knobs]
    int8_w = [rng.choice([0.0, 0.0005, 0.02]) for _ in space.precision_layers]

    def cost_raw(c):
        return sum(r.macs * (0.35 if r.precision == "int8" else 1.0) for r in space.layers(c))

    base = cost_raw(space.baseline())
    cost = lambda c: cost_raw(c) / (budget_frac * base)                                          # noqa: E731
    acc = lambda c: 0.6 - sum(w * r / 0.25 for w, r in zip(prune_w, c.ratios)) - \
        sum(w for w, q in zip(int8_w, c.int8) if q)                                               # noqa: E731
    return Memo(cost, acc)


def test_moves_are_one_step(space):
    c = space.uniform(0.25, False)
    for n in compress_moves(space, c):
        diff = sum(a != b for a, b in zip(c.ratios, n.ratios)) + sum(a != b for a, b in zip(c.int8, n.int8))
        assert diff == 1
    assert len(list(relax_moves(space, space.baseline()))) == 0
    assert len(list(compress_moves(space, space.smallest()))) == 0


@pytest.mark.parametrize("frac", [0.6, 0.35, 0.2])
def test_greedy_meets_the_budget_and_beats_uniform(space, frac):
    m = _memo(space, frac)
    g = greedy(space, m)
    assert g is not None and m.cost(g) <= 1.0
    uniform = [space.uniform(r, q) for r in space.ratios for q in (False, True)]
    best_uniform = max((c for c in uniform if m.cost(c) <= 1.0), key=m.acc)
    assert m.acc(g) >= m.acc(best_uniform) - 1e-12
    assert give_back(space, m, g) == g    # nothing left to give back within the budget


def test_greedy_says_none_below_the_floor(space):
    m = _memo(space, 0.01)
    assert m.cost(space.smallest()) > 1.0 and greedy(space, m) is None


def test_evolution_finds_feasible_candidates_at_least_as_good_as_greedy(space):
    m = _memo(space, 0.35)
    g = greedy(space, m)
    found = evolve(space, m, random.Random(0), seeds=[g], population=32, generations=15)
    assert found and all(m.cost(c) <= 1.0 for c in found)
    assert m.acc(found[0]) >= m.acc(g) - 1e-12
    assert [m.acc(c) for c in found] == sorted((m.acc(c) for c in found), reverse=True)


def test_evolution_reaches_the_optimum_of_a_small_space():
    """Two knobs x 3 ratios x 2 precision layers: 36 candidates, brute force known."""
    class Tiny:
        ratios = (0.0, 0.25, 0.5)
        knobs = (0, 1)
        precision_layers = ("a", "b")

        def baseline(self):
            return Candidate((0.0, 0.0), (False, False))

        def uniform(self, r, q=True):
            return Candidate((r, r), (q, q))

        def random(self, rng):
            return Candidate(tuple(rng.choice(self.ratios) for _ in self.knobs),
                             tuple(rng.random() < 0.5 for _ in self.precision_layers))

    tiny = Tiny()
    cost = lambda c: (4 * (1 - c.ratios[0]) + 2 * (1 - c.ratios[1]) + 3 * (0.5 if c.int8[0] else 1) +  # noqa
                      1 * (0.5 if c.int8[1] else 1)) / 7.0
    acc = lambda c: 1 - 0.3 * c.ratios[0] - 0.05 * c.ratios[1] - 0.02 * c.int8[0] - 0.2 * c.int8[1]    # noqa
    m = Memo(cost, acc)
    every = [Candidate(r, q) for r in itertools.product(tiny.ratios, repeat=2)
             for q in itertools.product((False, True), repeat=2)]
    best = max((c for c in every if cost(c) <= 1.0), key=acc)
    found = evolve(tiny, m, random.Random(1), population=12, generations=10)
    assert acc(found[0]) == pytest.approx(acc(best))


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.6), (1.5, 0.4), (3.0, 0.6), (0.5, 0.1), (2.5, 0.7)]
    assert sorted(pareto(pts)) == [0, 1, 4, 5]
    assert pareto([]) == []


def test_cost_uses_the_latency_features(space):
    # the search's cost functions read the same features the latency model is fitted on
    x = features(space.layers(space.smallest()))
    assert x[0] == 1.0 and x[1:].sum() > 0


def test_sensitivity_drops_within_the_noise_count_zero(space, tmp_path):
    """An AP gain of a single change is the val subset's noise: drops up to the largest gain are free."""
    from edge_compress.fit.accuracy import Sensitivity

    s = Sensitivity(tmp_path / "sensitivity.json", space)
    s.data["baseline_ap"] = 0.5
    s.data["prune"] = {k.name: {f"{r:g}": 0.01 * r for r in space.ratios if r > 0} for k in space.knobs}
    s.data["int8"] = {n: 0.0005 for n in space.precision_layers}
    all_int8 = space.uniform(0.0, True)
    assert s.noise() == 0.0 and s.drop(all_int8) == pytest.approx(0.0005 * len(space.precision_layers))
    s.data["int8"][space.precision_layers[0]] = -0.001      # one layer "gained" 0.1 points in int8: noise
    s._save()
    assert s.noise() == pytest.approx(0.001) and s.drop(all_int8) == 0.0
    heavy = space.uniform(0.75, True)
    assert s.drop(heavy) == pytest.approx(0.0075 * len(space.knobs))     # real drops are kept whole
    assert s.estimate(heavy) == pytest.approx(0.5 - 0.0075 * len(space.knobs))
