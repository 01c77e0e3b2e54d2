"""The accuracy estimate of ``fit``: per-knob and per-layer AP drops, summed.

Each change is applied alone to a copy of the detector and scored on the first
``max_images`` val images without fine-tuning (the per-layer sensitivity of Li et
al. 2017 and of HAQ/AMC-style searches):

* ``prune``: the knob's channel groups pruned by each ratio of the space, through
  ``prune_channels`` with the space's ``round_to``/``min_channels`` (what the fit builds);
* ``int8``: that conv's weights int8 symmetric per output channel AND its input
  activation uint8 per tensor on a range calibrated on the same images (99.99th
  percentile, as the exporter's default calibrator): the two roundings an int8
  runtime applies to that layer. Weight-only rounding (``compress.sensitivity``'s
  ``bits:8``) loses nothing measurable on these detectors and would make int8 look free.

A candidate's estimate is ``baseline AP - sum of its changes' drops``. A change
cannot add information, so an AP *gain* of a single change measures the noise of
the small val subset; every drop up to the largest such gain counts as zero, so
the search never buys noise (on picodet_s, keeping a layer in fp32 to save an
int8 "drop" of 0.01 points cost a precision boundary the device measured).
The short fine-tunes of the search then check the best candidates by real mAP.
Progress is saved after every layer, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edge_compress.errors import ArtifactError, EdgeCompressError
from edge_compress.fit.space import Candidate, SearchSpace
from edge_compress.io import write_json_atomic

SCHEMA = 1
ACT_PERCENTILE = 99.99
BN_BATCHES = 4


def _input_ranges(model: nn.Module, names: tuple[str, ...], images: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Per conv, the (low, high) percentile range of its input over ``images``."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen[n].append(args[0].detach().flatten()[::7])) for n in names]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
    q = ACT_PERCENTILE / 100
    out = {}
    for n, parts in seen.items():
        v = torch.cat(parts).float()
        out[n] = (min(float(torch.quantile(v, 1 - q)), 0.0), max(float(torch.quantile(v, q)), 0.0))
    return out


def _int8_layer_(model: nn.Module, name: str, lo_hi: tuple[float, float]) -> None:
    """Round conv ``name``'s weights (int8 per channel) and its input (uint8 per tensor) in the forward."""
    from edge_compress.compress.sensitivity import quantize_weight_

    conv = model.get_submodule(name)
    quantize_weight_(conv, 8)
    lo, hi = lo_hi
    scale = max(hi - lo, 1e-8) / 255.0
    zero = round(-lo / scale)

    def fq(module, args):
        x = args[0]
        q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
        return ((q - zero) * scale,)

    conv.register_forward_pre_hook(fq)


def _val_images(val, n: int, spec) -> torch.Tensor:
    from edge_compress.data.transforms import normalize

    import numpy as np

    arrays = [normalize(np.asarray(val[i][0])[None], spec) for i in range(min(n, len(val)))]
    return torch.from_numpy(np.concatenate(arrays))


def _ap(model: nn.Module, sub) -> float:
    from edge_compress.eval.runner import evaluate_model

    return float(evaluate_model(model, sub).ap)


def _bn_batches(model: nn.Module, train):
    from edge_compress.compress.bn import BATCH_SIZE
    from edge_compress.compress.recipe import iter_training_batches

    return iter_training_batches(model, train, BN_BATCHES, BATCH_SIZE)


def _recalibrate(model: nn.Module, train) -> None:
    from edge_compress.compress.bn import recalibrate_bn

    recalibrate_bn(model, _bn_batches(model, train))


class Sensitivity:
    """The drops of one model over one space, read from / saved to ``path`` as they are measured."""

    def __init__(self, path: Path, space: SearchSpace, data: dict[str, Any] | None = None):
        self.path, self.space = Path(path), space
        self._noise: float | None = None
        self.data = data or {"schema": SCHEMA, "space": space.fingerprint(), "baseline_ap": None,
                             "num_images": None, "prune": {}, "int8": {}}

    @classmethod
    def load_or_new(cls, path: Path, space: SearchSpace) -> "Sensitivity":
        path = Path(path)
        if not path.is_file():
            return cls(path, space)
        d = json.loads(path.read_text())
        if d.get("schema") != SCHEMA or d.get("space") != space.fingerprint():
            raise ArtifactError(f"{path} holds sensitivities of another search space (model or ratios changed); "
                                "move it away or use a new --out")
        return cls(path, space, d)

    @property
    def complete(self) -> bool:
        d = self.data
        want_prune = {k.name for k in self.space.knobs}
        return (d["baseline_ap"] is not None and want_prune <= set(d["prune"])
                and set(self.space.precision_layers) <= set(d["int8"]))

    def measure(self, model: nn.Module, val, train, max_images: int, log: Callable[[str], None]) -> None:
        """Score every missing change on the first ``max_images`` of ``val``; saved after each layer.
        A pruned trial's BatchNorm statistics are re-estimated on ``BN_BATCHES`` batches of ``train``
        (give the split without augmentation: the same images every trial) first, as the fit's own
        pruning does (without it a pruned conv's drop is mostly stale statistics); its drop is taken
        from the model recalibrated the same way with nothing pruned."""
        from edge_compress.compress.sensitivity import _subset

        sub = _subset(val, max_images)
        model = model.cpu().eval()
        if self.data["baseline_ap"] is None:
            self.data.update(baseline_ap=_ap(model, sub), num_images=len(sub))
            self._save()
        if self.space.knobs and self.data.get("recalibrated_ap") is None:
            # the reference of the prune drops: the same BatchNorm recalibration with nothing pruned, so a
            # drop is what the pruning costs, not what re-estimating the statistics moves
            self.data["recalibrated_ap"] = self._try(model, lambda m: _recalibrate(m, train), sub)
            self._save()
        base = self.data["baseline_ap"]
        prune_base = self.data.get("recalibrated_ap") or base
        for knob in self.space.knobs:
            if knob.name not in self.data["prune"]:
                self.data["prune"][knob.name] = {f"{r:g}": self._prune_drop(model, knob.name, r, sub, train,
                                                                            prune_base)
                                                 for r in self.space.ratios if r > 0}
                self._save()
                log(f"sensitivity prune {knob.name}: " + ", ".join(
                    f"{r} {d * 100:+.2f}" for r, d in self.data["prune"][knob.name].items()))
        todo = [n for n in self.space.precision_layers if n not in self.data["int8"]]
        if todo:
            ranges = _input_ranges(model, tuple(todo), _val_images(sub, 8, model.input_spec))
        for n in todo:
            self.data["int8"][n] = self._drop(base, self._try(model, lambda m: _int8_layer_(m, n, ranges[n]), sub))
            self._save()
            log(f"sensitivity int8 {n}: {self.data['int8'][n] * 100:+.2f} AP points")

    @staticmethod
    def _drop(base: float, ap: float | None) -> float:
        return 0.0 if ap is None else base - ap

    def _prune_drop(self, model: nn.Module, knob: str, ratio: float, sub, train, base: float) -> float:
        """AP lost by pruning one knob by ``ratio``; 0 when the rounding leaves every channel in place."""
        from edge_compress.compress.structured import prune_channels

        i = [k.name for k in self.space.knobs].index(knob)
        ratios = [0.0] * len(self.space.knobs)
        ratios[i] = ratio
        c = Candidate(tuple(ratios), (False,) * len(self.space.precision_layers))
        if self.space.layers(c) == self.space.layers(self.space.baseline()):
            return 0.0
        return self._drop(base, self._try(model, lambda m: prune_channels(
            m, self.space.prune_config(c, BN_BATCHES), bn_batches=_bn_batches(m, train)), sub))

    @staticmethod
    def _try(model: nn.Module, change: Callable[[nn.Module], Any], sub) -> float | None:
        """AP after ``change`` on a copy; None when the change cannot apply (the knob keeps its channels
        at that ratio, so the candidate is the unchanged model there: no drop)."""
        trial = copy.deepcopy(model)
        try:
            change(trial)
        except EdgeCompressError:
            return None
        return _ap(trial.eval(), sub)

    def _save(self) -> None:
        self._noise = None
        write_json_atomic(self.path, self.data)

    # ---- the estimate

    def noise(self) -> float:
        """The largest AP gain of any single change (0 when none gained): drops up to it are noise."""
        if self._noise is None:
            d = self.data
            changes = [v for per in d["prune"].values() for v in per.values()] + list(d["int8"].values())
            self._noise = max([0.0] + [-v for v in changes])
        return self._noise

    def drop(self, c: Candidate) -> float:
        """Estimated AP drop of candidate ``c`` (a fraction, like AP); drops within the noise count 0."""
        floor = self.noise()
        d = 0.0
        for knob, r in zip(self.space.knobs, c.ratios):
            if r > 0:
                v = self.data["prune"][knob.name][f"{r:g}"]
                d += v if v > floor else 0.0
        for n, q in zip(self.space.precision_layers, c.int8):
            if q and self.data["int8"][n] > floor:
                d += self.data["int8"][n]
        return d

    def estimate(self, c: Candidate) -> float:
        """Baseline AP less the drops. Summed drops of a heavy candidate overshoot below 0; the value is
        kept (not floored), so the search still ranks heavy candidates against each other."""
        return self.data["baseline_ap"] - self.drop(c)
