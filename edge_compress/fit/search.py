"""The two searches of ``fit`` over a ``SearchSpace``: NetAdapt-style greedy and evolutionary.

Both maximise the accuracy estimate ``acc(c)`` subject to ``cost(c) <= 1``, where
``cost`` is the largest predicted-over-budget ratio of the candidate (latency,
and energy and size when those budgets are set).

* ``greedy`` (after NetAdapt, Yang et al. ECCV 2018): from the uncompressed
  model, one layer changes per step (a knob one ratio level up, or a conv fp32 ->
  int8), the change that saves the most predicted cost per AP point it loses,
  until the budget is met; then it gives back (one level down, or int8 -> fp32)
  while the budget still holds, most AP first. NetAdapt measures each step on
  the device; here the latency model predicts and ``fit`` measures the result.
* ``evolve`` (the evolutionary search of OFA/APQ-style hardware-aware NAS):
  a population seeded with the greedy result, uniform candidates and random
  ones; tournament selection, uniform crossover, per-gene mutation; infeasible
  candidates are penalised by how far they exceed the budget.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable, Iterable

from edge_compress.fit.space import Candidate, SearchSpace

Cost = Callable[[Candidate], float]
Acc = Callable[[Candidate], float]
EPS_AP = 1e-4


class Memo:
    """``cost`` and ``acc`` cached by candidate (the search revisits the same ones often)."""

    def __init__(self, cost: Cost, acc: Acc):
        self._cost, self._acc = cost, acc
        self._c: dict[Candidate, float] = {}
        self._a: dict[Candidate, float] = {}

    def cost(self, c: Candidate) -> float:
        if c not in self._c:
            self._c[c] = self._cost(c)
        return self._c[c]

    def acc(self, c: Candidate) -> float:
        if c not in self._a:
            self._a[c] = self._acc(c)
        return self._a[c]


def _with_ratio(c: Candidate, i: int, r: float) -> Candidate:
    ratios = list(c.ratios)
    ratios[i] = r
    return replace(c, ratios=tuple(ratios))


def _with_int8(c: Candidate, j: int, q: bool) -> Candidate:
    bits = list(c.int8)
    bits[j] = q
    return replace(c, int8=tuple(bits))


def compress_moves(space: SearchSpace, c: Candidate) -> Iterable[Candidate]:
    """Every candidate one step more compressed than ``c``."""
    levels = space.ratios
    for i, r in enumerate(c.ratios):
        k = levels.index(r)
        if k + 1 < len(levels):
            yield _with_ratio(c, i, levels[k + 1])
    for j, q in enumerate(c.int8):
        if not q:
            yield _with_int8(c, j, True)


def relax_moves(space: SearchSpace, c: Candidate) -> Iterable[Candidate]:
    """Every candidate one step less compressed than ``c``."""
    levels = space.ratios
    for i, r in enumerate(c.ratios):
        k = levels.index(r)
        if k > 0:
            yield _with_ratio(c, i, levels[k - 1])
    for j, q in enumerate(c.int8):
        if q:
            yield _with_int8(c, j, False)


def greedy(space: SearchSpace, m: Memo, start: Candidate | None = None) -> Candidate | None:
    """NetAdapt-style greedy (see the module docstring) from ``start``, or from both the uncompressed model
    and the model all in int8 (one conv at a time from fp32 meets precision boundaries that cost more
    than the int8 kernel saves), the better result; None when no candidate meets the budget."""
    if start is None:
        starts = [space.baseline()] + ([space.uniform(0.0, True)] if space.precision_layers else [])
        found = [g for g in (greedy(space, m, s) for s in starts) if g is not None]
        return max(found, key=m.acc) if found else None
    c = start
    while m.cost(c) > 1.0:
        best, best_score = None, -1.0
        for n in compress_moves(space, c):
            saved = m.cost(c) - m.cost(n)
            if saved <= 0:
                continue
            score = saved / (max(m.acc(c) - m.acc(n), 0.0) + EPS_AP)
            if score > best_score:
                best, best_score = n, score
        if best is None:
            return None
        c = best
    return give_back(space, m, c)


def give_back(space: SearchSpace, m: Memo, c: Candidate) -> Candidate:
    """Undo compression while the budget holds, the largest AP gain first."""
    while True:
        ups = [n for n in relax_moves(space, c) if m.cost(n) <= 1.0 and m.acc(n) > m.acc(c)]
        if not ups:
            return c
        c = max(ups, key=m.acc)


def _fitness(m: Memo, c: Candidate) -> float:
    over = m.cost(c) - 1.0
    return m.acc(c) - (10.0 * over + 1.0 if over > 0 else 0.0)


def _mutate(space: SearchSpace, c: Candidate, rng: random.Random) -> Candidate:
    n = len(c.ratios) + len(c.int8)
    p = 1.5 / max(n, 1)
    ratios = tuple(_step_level(space.ratios, r, rng) if rng.random() < p else r for r in c.ratios)
    bits = tuple((not q) if rng.random() < p else q for q in c.int8)
    return Candidate(ratios, bits)


def _step_level(levels: tuple[float, ...], r: float, rng: random.Random) -> float:
    k = levels.index(r) + rng.choice((-1, 1))
    return levels[min(max(k, 0), len(levels) - 1)]


def _cross(a: Candidate, b: Candidate, rng: random.Random) -> Candidate:
    ratios = tuple(x if rng.random() < 0.5 else y for x, y in zip(a.ratios, b.ratios))
    bits = tuple(x if rng.random() < 0.5 else y for x, y in zip(a.int8, b.int8))
    return Candidate(ratios, bits)


def evolve(space: SearchSpace, m: Memo, rng: random.Random, seeds: Iterable[Candidate] = (),
           population: int = 48, generations: int = 40, elite: int = 8) -> list[Candidate]:
    """Evolutionary search (see the module docstring); every feasible candidate it met, best first."""
    pop = list(dict.fromkeys(seeds))
    pop += [space.uniform(r, q) for r in space.ratios for q in {False, bool(space.precision_layers)}]
    while len(pop) < population:
        pop.append(space.random(rng))
    seen: set[Candidate] = set(pop)
    for _ in range(generations):
        pop.sort(key=lambda c: _fitness(m, c), reverse=True)
        children = pop[:elite]
        while len(children) < population:
            a, b = (max(rng.sample(pop, 3), key=lambda c: _fitness(m, c)) for _ in range(2))
            child = _mutate(space, _cross(a, b, rng), rng)
            children.append(child)
            seen.add(child)
        pop = children
    feasible = [c for c in seen if m.cost(c) <= 1.0]
    return sorted(feasible, key=m.acc, reverse=True)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(latency, ap)`` no other point beats on both (lower latency, higher AP)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front
