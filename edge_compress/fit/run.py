"""``fit``: per-layer pruning ratios and precisions that meet a budget measured on the device.

The loop (DESIGN.md "fit"):

1. **preflight**: the device answers, it has the backend, the backend exports
   here, the data matches the model: all before anything long starts;
2. **sensitivity** of every knob and precision layer (``accuracy.Sensitivity``);
3. **baselines** on the device: fp32, int8 everywhere, and the smallest candidate,
   whose measurement is the floor: a budget below it is an error that says the floor;
4. **initial samples** (uniform and random candidates), then **search rounds**:
   fit the latency model on every measurement of this environment, run the
   greedy and the evolutionary search against it, measure the promising
   candidates and the adaptive-sampling picks, refit; until nothing new is
   proposed or ``max_measurements`` is reached. Every batch is measured beside
   the reference (the uncompressed model): a batch measured while the reference
   ran more than ``NORMALIZE_ABOVE`` off its median in this run (its drift)
   counts in the latency model and the choice at the typical speed (its
   latencies divided by the drift), so one slow phase does not skew the model
   for the rest of the run;
5. **choice**: the best measured candidates that meet the budget on the device,
   checked by a short fine-tune and a real mAP;
6. **result**: fine-tune with distillation, export (full calibration, mAP through
   the runtime), measure on the device, interleaved with the reference; a miss
   while the reference runs more than ``DRIFT`` slower than its median in this
   run is the device's slow phase (a throttled board, a busy host), not the
   result's: the pair is measured again, up to
   ``DRIFT_RETRIES`` times, before the miss counts. A miss tightens the search's
   budget and goes back to 4 with room for one more batch of measurements
   beyond ``max_measurements`` (the tightened budget may exclude every
   candidate measured so far), ``verify_rounds`` at most;
7. ``OUT/artifact``, ``OUT/fit_result.json`` and ``OUT/report.html``.

Everything measured is in the profile store and in ``OUT/state.json`` (rewritten
after every step), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_compress.errors import BackendUnavailableError, ConfigError, DataError, EdgeCompressError
from edge_compress.fit.accuracy import Sensitivity
from edge_compress.fit.config import FitConfig
from edge_compress.fit.executor import make_executor
from edge_compress.fit.finetune import FinetuneJob, finetune_candidate
from edge_compress.fit.latency import LatencyModel, LayerCosts, environment_key, features, fit_latency, \
    holdout_report, measurement_repeatability, profiled_conv_ms, sampling_scores
from edge_compress.fit.measure import CANDIDATE_BUILD, BuildJob, MeasureJob, build_candidate, interleaved, \
    measure_settings, profile_session
from edge_compress.fit.search import Memo, evolve, greedy, pareto
from edge_compress.fit.space import Candidate, SearchSpace
from edge_compress.fit.state import FitState

ADAPTIVE_PER_ROUND = 2
SAFETY = 0.98          # after a miss, the search budget is tightened to SAFETY * budget / measured of it
DRIFT = 0.10           # the reference this much slower than its median in the run: the device is in a slow phase
DRIFT_RETRIES = 2      # a miss in a slow phase is measured again this many times (after DRIFT_PAUSE_S) first
DRIFT_PAUSE_S = 30.0
NORMALIZE_ABOVE = 0.05  # a batch's reference drift beyond this (the noise of a 3-session median): latencies / drift


class FitError(EdgeCompressError, RuntimeError):
    """The budget cannot be met (below the floor the device measured) or the search found nothing."""


@dataclass
class FitResult:
    out: Path
    artifact: Path | None
    report: Path
    result: dict[str, Any]


def fit(checkpoint: str | Path, data: str | Path, config: FitConfig, out: str | Path, device: str = "local",
        backend: str = "openvino", devices_path: str | Path = "devices.yaml", store: str | Path = "profiles",
        executor: str = "process", workers: int | None = None, ray_address: str | None = None,
        sensitivity: str | Path | None = None, log: Callable[[str], None] | None = None) -> FitResult:
    """Search, fine-tune, export and verify a compressed ``checkpoint`` meeting ``config``'s budget on
    ``device`` with ``backend``; results under ``out`` (resumed when it holds this run's state).
    ``sensitivity``: the ``sensitivity.json`` of an earlier fit of the same model and space, reused."""
    run = FitRun(checkpoint, data, config, out, device, backend, devices_path, store, log or (lambda s: None),
                 sensitivity)
    run.executor = make_executor(executor, workers, ray_address)
    try:
        return run.run()
    finally:
        run.executor.close()


class FitRun:
    """One fit: its model, space, device and state; ``run`` goes through the steps of the module docstring."""

    def __init__(self, checkpoint, data, config: FitConfig, out, device: str, backend: str, devices_path, store,
                 log: Callable[[str], None], sensitivity: str | Path | None = None):
        from edge_compress.profile.devices import get_device

        self.config, self.log = config, log
        self.checkpoint, self.data = Path(checkpoint), Path(data)
        self.out, self.store = Path(out), Path(store)
        self.device = get_device(device, devices_path)
        self.backend = backend
        self._preflight()
        self.space = SearchSpace.for_config(self.model, config, self.precisions)
        self.threads = config.threads or self.device.threads
        self.state = FitState.open(self.out, self._identity())
        own = self.out / "sensitivity.json"
        if sensitivity is not None and not own.exists():
            if not Path(sensitivity).is_file():
                raise ConfigError(f"--sensitivity {sensitivity}: no such file (a sensitivity.json of an earlier fit)")
            Sensitivity.load_or_new(Path(sensitivity), self.space)      # another model or space: an error here
            shutil.copyfile(sensitivity, own)
        self.sens = Sensitivity.load_or_new(own, self.space)
        self.rng = random.Random(config.seed)
        self.env: dict[str, Any] | None = None
        self.reference: tuple[Candidate, str] | None = None   # (the uncompressed model, its artifact)
        self.costs: LayerCosts | None = None
        self.cap = config.max_measurements      # this run's own measurements, at most (see ``run``)
        self.executor = make_executor("inline")

    # ---- 1. preflight

    def _preflight(self) -> None:
        from edge_compress.backends import get_backend
        from edge_compress.compress.recipe import open_data
        from edge_compress.profile.remote import check_reachable
        from edge_compress.train import load_detector

        if self.backend not in self.device.backends:
            raise ConfigError(f"device '{self.device.name}' has backends {list(self.device.backends)}; "
                              f"'{self.backend}' is not among them: pick one of those, or add it to the device's "
                              "'backends' in devices.yaml once its runtime is installed there")
        be = get_backend(self.backend, require_available=False)
        ok, why = be.available()
        if not ok:
            raise BackendUnavailableError(f"backend '{self.backend}' cannot export here: {why}")
        self.precisions = tuple(p for p in ("fp32", "int8") if p in be.precisions
                                and (p == "fp32" or self.config.precision != "fp32"))
        if self.config.precision == "int8" and "int8" not in self.precisions:
            raise ConfigError(f"--precision int8: backend '{self.backend}' has no int8 export here "
                              f"(it takes {list(be.precisions)}); use --precision fp32 or per-layer")
        if not self.checkpoint.is_file():
            raise ConfigError(f"--model {self.checkpoint}: no such checkpoint (a best.pt of `edge-compress train` "
                              "or a model.pt of `edge-compress compress`)")
        if not (self.data / "annotations").is_dir():
            raise DataError(f"--data {self.data}: not a dataset folder (expected annotations/ and images/; "
                            "`edge-compress data synth` makes one)")
        self.model = load_detector(self.checkpoint).cpu().eval()
        self.train_ds, self.val_ds = open_data(self.model, self.data)
        check_reachable(self.device)

    def _identity(self) -> dict[str, Any]:
        from edge_compress.artifact import sha256_file

        return {"checkpoint_sha256": sha256_file(self.checkpoint), "data": str(self.data.resolve()),
                "device": self.device.name, "backend": self.backend, "space": self.space.fingerprint(),
                "threads": self.threads, "search": self.config.search_dict()}

    # ---- the run

    def run(self) -> FitResult:
        self.log(f"fit: {self.model.name} on '{self.device.name}' with {self.backend}, {self.threads} thread(s); "
                 f"{len(self.space.knobs)} pruning knobs x {len(self.space.ratios)} ratios, "
                 + ("every conv int8" if self.space.int8_everywhere else
                    f"{len(self.space.precision_layers)} precision layers") + f"; budget {self._budget_text()}"
                 + (f"; resuming {self.out} ({len(self.state.valid())} measurements)" if self.state.resumed else ""))
        rounds = self.state.data["rounds"]
        if rounds and rounds[-1]["passed"] and Path(rounds[-1]["artifact"]).is_dir():
            self.log(f"fit: {self.out} is finished already; its result is returned as it is")
            return self._finish()
        self._harvest_store()
        self._baselines()       # the floor first: an impossible budget fails in a minute, not after the sensitivity
        self._sensitivity()
        self._initial_samples()
        for round_no in range(len(self.state.data["rounds"]), self.config.verify_rounds):
            self.cap = self.config.max_measurements + round_no * self.config.batch
            self._explore()
            chosen = self._choose()
            if self._finalize(chosen, round_no):
                return self._finish()
            self._tighten()
        raise FitError(f"no result met the budget on the device after {self.config.verify_rounds} verification "
                       f"rounds (see {self.out / 'state.json'} 'rounds'); raise --verify-rounds or the budget")

    def _budget_text(self) -> str:
        c = self.config
        parts = [f"{c.budget_ms:g} ms at {c.percentile}" if c.budget_ms else "",
                 f"{c.budget_mj:g} mJ" if c.budget_mj else "", f"{c.budget_bytes} bytes" if c.budget_bytes else ""]
        return ", ".join(p for p in parts if p)

    # ---- 2. sensitivity

    def _sensitivity(self) -> None:
        if not self.sens.complete:
            self.log(f"sensitivity: {len(self.space.knobs)} knobs x {len(self.space.ratios) - 1} ratios, "
                     f"{len(self.space.precision_layers)} int8 layers on {self.config.sensitivity_images} val images")
            from edge_compress.pipeline import open_split

            spec = self.model.input_spec
            plain_train = open_split(self.data, "train", (spec.height, spec.width), augment=False)
            self.sens.measure(self.model, self.val_ds, plain_train, self.config.sensitivity_images, self.log)
        self.log(f"sensitivity: baseline AP {self.sens.data['baseline_ap']:.4f}")

    # ---- 3. baselines and the floor

    def _baselines(self) -> None:
        base = self.space.baseline()
        # this session's environment, every start, with the runtime's per-layer profile
        probe = self._measure([base], "probe", force=True, per_layer=True, keep=True)
        if not probe or "error" in probe[0]:
            raise FitError(f"the uncompressed model could not be measured on '{self.device.name}': "
                           f"{probe[0].get('error') if probe else 'nothing returned'}")
        # the reference, measured again beside every batch and the result: it tells a slow phase of the device
        # from a slow candidate
        self.reference = (base, probe[0]["artifact"])
        self._set_environment(probe[0]["environment"])
        self._drift(probe[0])
        int8 = self.space.uniform(0.0, True)
        if self.space.precision_layers:
            self._measure([int8], "baselines", per_layer=True)
        # measured again where an earlier fit measured them without the profile
        self._measure([c for c in self._pruned_profiles() if self._profiled_ms(c) is None], "baselines",
                      force=True, per_layer=True)
        self._measure([self.space.smallest()], "baselines")
        floor = self._latest(self.space.smallest())
        if floor is None:
            raise FitError("the smallest candidate could not be built or measured; see state.json builds_failed")
        self._check_floor(floor)
        self._layer_costs(base, int8)

    def _pruned_profiles(self) -> list[Candidate]:
        """The uniformly pruned candidates (the space's ratio nearest 0.5, fp32 and int8) whose per-layer
        profiles give each conv's second point in ``LayerCosts``: how its time falls with its MACs."""
        pruned = [r for r in self.space.ratios if r > 0]
        if not pruned:
            return []
        mid = min(pruned, key=lambda r: abs(r - 0.5))
        return list(dict.fromkeys(self.space.uniform(mid, int8) for int8 in (False, True)))

    def _profiled_ms(self, c: Candidate) -> dict[str, float] | None:
        """Each conv's kernel ms in the per-layer profile of ``c``'s latest measurement that has one (None:
        none has)."""
        for m in reversed([m for m in self.state.valid() if m["key"] == c.key()]):
            if not m.get("record") or not Path(m["record"]).is_file():
                continue
            per_layer = json.loads(Path(m["record"]).read_text()).get("per_layer") or {}
            found = profiled_conv_ms(per_layer, self.space.conv_profile_names) if per_layer.get("layers") else {}
            if found:
                return found
        return None

    def _layer_costs(self, base: Candidate, int8: Candidate) -> None:
        """The latency model weighs each conv by its profiled time (``LayerCosts``) where the runtime's
        per-layer profiles of the unpruned model are there (and of a pruned one: how that time falls with the
        MACs kept); else by kind (dense, 1x1, depthwise)."""
        profiles = {("int8" if self.space.any_int8(c) else "fp32"): ms for c in (base, int8)
                    if (ms := self._profiled_ms(c))}
        pruned = {("int8" if self.space.any_int8(c) else "fp32"): (ms, {r.name: r.macs for r in self.space.layers(c)})
                  for c in self._pruned_profiles() if (ms := self._profiled_ms(c))}
        if not profiles:
            self.costs = None
            self.log("latency model: no per-layer profile from the device; conv costs by kind (dense, 1x1, "
                     "depthwise) instead of by layer")
            return
        self.costs = LayerCosts.from_profiles(profiles, {n: self.space.full_macs(n) for n in self.space.convs}, pruned)
        missing = [p for p in self.precisions if p not in profiles]
        self.log("latency model: per-layer costs from the runtime's profile of "
                 + " and ".join(f"{p} ({len(ms)} of {len(self.space.convs)} convs)" for p, ms in profiles.items())
                 + (f"; {' and '.join(missing)} costs scaled from it (no {' or '.join(missing)} baseline with a "
                    "per-layer profile here)" if missing else "")
                 + (f"; pruned: {', '.join(f'{p} ({len(v)} convs)' for p, v in self.costs.pruned.items())}"
                    if self.costs.pruned else "; no pruned profile: conv times proportional to the MACs kept"))

    def _set_environment(self, env: dict[str, Any]) -> None:
        """Measurements of another environment (runtime version, device settings, threads) go stale."""
        self.env = env
        key = environment_key(env)
        stale = [m for m in self.state.data["measurements"]
                 if "environment" in m and environment_key(m["environment"]) != key and not m.get("stale")]
        for m in stale:
            old = m["environment"]
            m["stale"] = "measured in another environment: " + ", ".join(
                f"{k} {old.get(k)} -> {env.get(k)}" for k in env if old.get(k) != env.get(k))
        if stale:
            self.log(f"latency model: {len(stale)} stored measurements are stale ({stale[0]['stale']}); "
                     "they are kept in state.json but not used")
            self.state.save()

    def _check_floor(self, floor: dict[str, Any]) -> None:
        for name, limit in self.config.constraints().items():
            value = self._value(floor, name)
            if value is not None and value > limit:
                raise FitError(
                    f"budget {name} {limit:g} is below the floor on '{self.device.name}' with {self.backend}: "
                    f"the smallest candidate of the search space (every knob pruned by {max(self.space.ratios):g}"
                    f"{', every layer int8' if self.space.any_int8(self.space.smallest()) else ''}) measures "
                    f"{value:.4g}. "
                    f"Raise the budget above {value:.4g}, or widen the space (larger --ratios)")

    # ---- 4. sampling and search

    def _initial_samples(self) -> None:
        have = len(self.state.valid())
        want = self.config.initial_samples + 3
        if have >= want:
            return
        picks: list[Candidate] = []
        for r in self.space.ratios[1:-1]:
            picks += [self.space.uniform(r, True)] if self.space.precision_layers else []
            picks += [self.space.uniform(r, False)]
        while len(picks) < self.config.initial_samples * 3:
            picks.append(self.space.random(self.rng))
        todo = [c for c in dict.fromkeys(picks) if c.key() not in self.state.measured_keys()]
        self._measure(todo[:want - have], "initial samples")

    def _explore(self) -> None:
        for _ in range(self.config.search_rounds):
            if self._own() >= self.cap:
                break
            models = self._fit_models()
            proposals = self._propose(models)
            adaptive = self._adaptive(models, proposals)
            room = self.cap - self._own()
            todo = list(dict.fromkeys(proposals[:max(1, self.config.batch - ADAPTIVE_PER_ROUND)] + adaptive))
            todo = [c for c in todo if c.key() not in self.state.measured_keys()][:room]
            if not todo:
                self.log("search: every proposal is measured already; the search has converged")
                break
            self._measure(todo, f"search round ({self._own()} measured)")

    def _own(self) -> int:
        """This run's device measurements (``cap``: ``max_measurements`` and a batch more per verification
        round after the first; reused ones are free)."""
        return sum(1 for m in self.state.valid() if not m.get("from_run"))

    def _memo(self, models: dict[str, LatencyModel], tighten: float = 1.0) -> Memo:
        limits = {k: v * self.state.data["scale"].get(k, 1.0) * tighten
                  for k, v in self.config.constraints().items()}

        def cost(c: Candidate) -> float:
            x = self._x(c)
            return max(float(models[k].predict(self._feats(k, x, c))) / lim for k, lim in limits.items())

        return Memo(cost, self.sens.estimate)

    def _propose(self, models: dict[str, LatencyModel]) -> list[Candidate]:
        """Greedy and evolutionary picks at the budget and at the budget less the model's error margin."""
        margin = self._margin()
        out: list[Candidate] = []
        for tighten in (1.0, 1.0 - margin):
            m = self._memo(models, tighten)
            g = greedy(self.space, m)
            evo = evolve(self.space, m, self.rng, seeds=[g] if g else [])
            out += ([g] if g else []) + evo[:2]
        return list(dict.fromkeys(out))

    def _adaptive(self, models: dict[str, LatencyModel], proposals: list[Candidate]) -> list[Candidate]:
        """Candidates near the budget where the latency model is least sure (see ``sampling_scores``)."""
        model = models.get("latency_ms")
        if model is None:
            return []
        m = self._memo(models)
        pool = [c for c in evolve(self.space, Memo(lambda c: abs(m.cost(c) - 1.0) * 5, m.acc), self.rng,
                                  population=32, generations=10)
                if c.key() not in self.state.measured_keys() and c not in proposals]
        if not pool:
            return []
        x_seen, y_seen = self._design("latency_ms")
        scores = sampling_scores(model, np.array([self._x(c) for c in pool]), x_seen, y_seen)
        return [pool[i] for i in np.argsort(-scores)[:ADAPTIVE_PER_ROUND]]

    def _margin(self) -> float:
        rep = self._holdout()
        p95 = rep.get("p95_abs_rel_err")
        return float(min(max(p95 if p95 is not None else 0.05, 0.02), 0.2))

    # ---- the latency (and energy, size) models

    def _x(self, c: Candidate) -> np.ndarray:
        return features(self.space.layers(c), self.costs)

    def _feats(self, name: str, x: np.ndarray, c: Candidate) -> np.ndarray:
        return self._size_x(c) if name == "size_bytes" else x

    def _size_x(self, c: Candidate) -> np.ndarray:
        """Size features: a constant and the weights (parameters) held in fp32 and in int8."""
        p32 = p8 = 0.0
        for row in self.space.layers(c):
            params = row.macs / max(self.space.convs[row.name].pixels, 1)
            p8 += params if row.precision == "int8" else 0.0
            p32 += params if row.precision != "int8" else 0.0
        return np.array([1.0, p32 / 1e6, p8 / 1e6])

    def _value(self, m: dict[str, Any], name: str) -> float | None:
        """``m``'s ``name``; a latency at the device's typical speed in this run (``_speed``)."""
        if name == "latency_ms":
            v = m.get(self.config.percentile)
            return None if v is None else v / self._speed(m)
        return {"energy_mj": m.get("energy_mj"), "size_bytes": m.get("size_bytes")}[name]

    @staticmethod
    def _speed(m: dict[str, Any]) -> float:
        """The factor ``m``'s latency is divided by: its batch's reference drift where that is beyond
        ``NORMALIZE_ABOVE``, else 1 (within the reference's own noise a correction adds noise). The result's
        verification has no drift: its raw latency meets the budget or not."""
        d = m.get("drift")
        return d if d is not None and abs(d - 1.0) > NORMALIZE_ABOVE else 1.0

    def _usable(self) -> list[dict[str, Any]]:
        return [m for m in self.state.valid() if m.get("candidate")]

    def _design(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [(m, self._value(m, name)) for m in self._usable()]
        rows = [(m, v) for m, v in rows if v is not None]
        if not rows:
            return np.zeros((0, 1)), np.zeros(0)
        cands = [Candidate.from_dict(m["candidate"]) for m, _ in rows]
        x = np.array([self._feats(name, self._x(c), c) for c in cands])
        return x, np.array([v for _, v in rows], float)

    def _fit_models(self) -> dict[str, LatencyModel]:
        models = {}
        for name in self.config.constraints():
            x, y = self._design(name)
            if len(y) < 3:
                raise FitError(f"only {len(y)} candidates have a measured {name}; the {name} model needs 3 "
                               "(does the device's energy sensor report energy? see `edge-compress profile`)")
            models[name] = fit_latency(x, y, self.env or {}, costs=self.costs if name != "size_bytes" else None)
        return models

    def _holdout(self) -> dict[str, Any]:
        usable = [m for m in self._usable() if m.get(self.config.percentile) is not None]
        if not usable:
            return {}
        x, y = self._design("latency_ms")
        held = np.array([bool(m.get("heldout")) and self._heldout(m["key"]) for m in usable])
        rep = holdout_report(x, y, held, self.env or {}, [m["key"] for m in usable], self.costs)
        speeds = [self._speed(m) for m, h in zip(usable, held) if h]
        for h, sp in zip(rep["heldout"], speeds):    # the latency as measured, before the division by the drift
            h["raw_ms"], h["speed"] = h["measured_ms"] * sp, sp
        if rep["heldout"]:
            rep["raw_within_10pct"] = float(np.mean([abs(h["predicted_ms"] - h["raw_ms"]) <= 0.10 * h["raw_ms"]
                                                     for h in rep["heldout"]]))
        return {**rep, "measurement": measurement_repeatability([m.get("sessions_p50") or [] for m in usable])}

    # ---- measuring

    def _heldout(self, key: str) -> bool:
        """A fixed ``holdout`` share of the candidates, by key; never the baselines (fp32, int8 everywhere,
        the floor, the pruned profiles): every fit measures them, and a model fitted without its only fp32
        candidate has nothing to learn fp32 costs from (ONNX Runtime, yolo_tiny: the fp32 model predicted at
        4.6 ms, measured 10.3); the pruned profiles are in every candidate's features (``LayerCosts``)."""
        anchors = {c.key() for c in (self.space.baseline(), self.space.uniform(0.0, True), self.space.smallest(),
                                     *self._pruned_profiles())}
        return key not in anchors and int(key[:8], 16) % 1000 < self.config.holdout * 1000

    def _measure(self, cands: list[Candidate], label: str, force: bool = False, per_layer: bool = False,
                 keep: bool = False) -> list[dict[str, Any]]:
        """Build (in parallel) then measure (one at a time) ``cands``; every result goes into the state
        (``keep``: their artifacts stay, their paths in ``"artifact"``)."""
        todo = [c for c in dict.fromkeys(cands) if force or c.key() not in self.state.measured_keys()]
        if not todo:
            return []
        self.log(f"{label}: building {len(todo)} candidate(s) for {self.backend}")
        built = self.executor.map(build_candidate, [self._build_job(c) for c in todo])
        results, ok = [], []
        for c, b in zip(todo, built):
            if "error" in b:
                self.state.data["builds_failed"][c.key()] = b["error"]
                self.state.save()
                self.log(f"  {c.key()}: build failed: {b['error']}")
                results.append(b)
            else:
                ok.append((c, b["artifact"]))
        jobs = [self._measure_job(c, artifact, keep, per_layer) for c, artifact in ok]
        if jobs and self.reference is not None:      # the reference beside every batch: the device's speed now
            jobs.append(self._measure_job(*self.reference, keep=True, reference=True))
        measured = self._on_device(jobs) if jobs else []
        drift = self._batch_drift(measured.pop()) if jobs and self.reference is not None else None
        for (c, artifact), m in zip(ok, measured):
            m.update(candidate=c.to_dict(), heldout=self._heldout(c.key()), drift=drift,
                     est_ap=self.sens.estimate(c) if self.sens.complete else None)
            if keep and "error" not in m:
                m["artifact"] = artifact
            self.state.add_measurement(m)
            results.append(m)
            self.log(self._measure_line(c, m))
        return results

    def _drift(self, ref: dict[str, Any]) -> float | None:
        """The reference's latency in ``ref`` against its median over this run's earlier measurements of it
        (> 1: the device runs slow now; None: no earlier one, or ``ref`` failed), then filed with them
        (``state.json`` ``references``). A median, not the first measurement: one lucky session at the start
        would make every later batch look slow, and the latencies divided by that too optimistic to meet
        the budget on verification."""
        value = ref.get(self.config.percentile) if "error" not in ref else None
        if not value:
            return None
        key = environment_key(self.env or {})
        refs = self.state.data.setdefault("references", [])
        earlier = [r["ms"] for r in refs if r["environment_key"] == key]
        refs.append({"ms": value, "environment_key": key, "record": ref.get("record")})
        self.state.save()
        return value / float(np.median(earlier)) if earlier else None

    def _batch_drift(self, ref: dict[str, Any]) -> float | None:
        """The drift of the reference measured beside a batch (``_drift``), logged."""
        drift = self._drift(ref)
        if drift is None:
            self.log(f"  the reference could not be measured beside this batch ({ref.get('error')}); its "
                     "latencies are taken as they are")
            return None
        self.log(f"  reference {ref[self.config.percentile]:.3f} ms, {drift - 1:+.1%} against its median in this run"
                 + (": this batch's latencies count divided by that" if abs(drift - 1) > NORMALIZE_ABOVE else ""))
        return drift

    def _on_device(self, jobs: list[MeasureJob]) -> list[dict[str, Any]]:
        """``jobs``' sessions one by one on the device (each in a fresh process on ``local``), interleaved
        across the jobs (``measure.interleaved``), then filed. A batch interrupted before its last
        session round files none of its candidates: their sessions are measured again on resume."""
        local = self.device.connection == "local"
        return interleaved(jobs, lambda order: self.executor.measure_all(profile_session, order, local))

    def _measure_line(self, c: Candidate, m: dict[str, Any]) -> str:
        n = self._own()
        if "error" in m:
            return f"  [{n}/{self.cap}] {c.key()}: measurement failed: {m['error']}"
        est = "" if m["est_ap"] is None else f", est AP {m['est_ap']:.4f}"
        speed = self._speed(m)
        return (f"  [{n}/{self.cap}] {c.key()}: {self.config.percentile} "
                f"{m[self.config.percentile]:.3f} ms" + (f" ({m[self.config.percentile] / speed:.3f} at the typical "
                                                           "speed)" if speed != 1.0 else "")
                + est + (" (held out)" if m["heldout"] else ""))

    def _build_job(self, c: Candidate, out: Path | None = None) -> BuildJob:
        folder = out or self.out / "candidates" / f"{c.key()}-{len(self.state.data['measurements']):04d}"
        return BuildJob(str(self.checkpoint), c.key(), self.space.prune_ratios(c), self.space.round_to,
                        self.space.min_channels, self.space.keep_fp32(c), self.space.any_int8(c), self.backend,
                        str(self.data), str(folder), self.threads, 8, self.state.run_id)

    def _measure_job(self, c: Candidate, artifact: str, keep: bool = False, per_layer: bool = False,
                     reference: bool = False) -> MeasureJob:
        energy = self.device.energy_sensor if self.config.budget_mj is not None else "none"
        settings = measure_settings(self.config.profile_seconds, self.threads, per_layer, energy)
        return MeasureJob(c.key(), artifact, self.device.to_dict(), settings, str(self.store), keep,
                          {"run": self.state.run_id, "space": self.space.fingerprint(), "candidate_dict": c.to_dict(),
                           "build": CANDIDATE_BUILD, **({"reference": True} if reference else {})},
                          self.config.measure_sessions)

    def _latest(self, c: Candidate) -> dict[str, Any] | None:
        found = [m for m in self.state.valid() if m["key"] == c.key()]
        return found[-1] if found else None

    def _harvest_store(self) -> None:
        """Measurements in the profile store this run's state lacks: its own, filed after the last state
        write (an interrupted run), and those of other fits of the same search space on this device and
        backend (the latency of a candidate does not depend on its weights); their environment is checked
        like any other measurement's."""
        from edge_compress.fit.measure import summarize_record
        from edge_compress.profile.store import ProfileStore

        known = self.state.known_records()
        entries = ProfileStore(self.store).list(device=self.device.name, backend=self.backend)
        # in the order filed (a batch's jobs' order), not by created_utc (its median session's start)
        entries = sorted(entries, key=lambda e: str(e.record.get("fit", {}).get("filed_utc")
                                                    or e.record.get("created_utc", "")))
        own = other = 0
        for e in entries:
            tag = e.record.get("fit", {})
            if str(e.path) in known or "candidate_dict" not in tag or tag.get("reference"):
                continue    # a reference re-measured at verification is a probe of the device's speed then
            mine = tag.get("run") == self.state.run_id
            if not mine and tag.get("space") != self.space.fingerprint():
                continue
            c = Candidate.from_dict(tag["candidate_dict"])
            m = summarize_record(c.key(), e.record, e.path)
            m.update(candidate=c.to_dict(), heldout=self._heldout(c.key()), est_ap=None,
                     **({"recovered": True} if mine else {"from_run": tag.get("run")}))
            self.state.data["measurements"].append(m)
            own, other = own + mine, other + (not mine)
        if own or other:
            self.state.save()
        if own:
            self.log(f"resume: {own} measurement(s) recovered from the profile store")
        if other:
            self.log(f"profile store: {other} measurement(s) of this search space from earlier fits reused")

    # ---- 5. choice

    def _meets(self, m: dict[str, Any], scaled: bool = True, every_session: bool = False) -> bool:
        """``m`` within the budget (``scaled``: the search budget, tightened after a miss); ``every_session``:
        each of its sessions' p50 too, not just their median (a p50 budget)."""
        return not self._misses(m, scaled, every_session)

    def _misses(self, m: dict[str, Any], scaled: bool = True, every_session: bool = False) -> list[str]:
        """The constraints ``m`` misses (or has no value for), as ``_meets`` reads them."""
        missed = []
        for name, limit in self.config.constraints().items():
            value = self._value(m, name)
            if every_session and name == "latency_ms" and self.config.percentile == "p50" and m.get("sessions_p50"):
                value = max(m["sessions_p50"]) / self._speed(m)
            lim = limit * (self.state.data["scale"].get(name, 1.0) if scaled else 1.0)
            if value is None or value > lim:
                missed.append(name)
        return missed

    def _choose(self) -> Candidate:
        """The best estimated of the measured candidates within the budget. On a noisy device the best of
        many candidates measured near the budget is often the luckiest measurement, and the verification
        measures it again (the demo's picodet_s chose one measured at 5.69 ms under a 6.14 ms budget; the
        same artifact then timed 5.8-7.4 ms in 5 sessions): of the candidates estimated within the noise
        of the best (``Sensitivity.noise``, at least 0.5 AP points) those whose every session met the
        budget come first (by estimate, then the fastest). A safe candidate further down is not taken:
        a miss costs a verification round, a worse candidate costs AP.

        The short fine-tune check (``check_candidates``) also takes the least pruned uniform candidate (one
        ratio, every layer int8) whose every session met the budget: the estimate sums per-knob drops,
        which is pessimistic for deep uniform pruning (yolo_tiny on ONNX Runtime at 3.09 ms: the search's
        pick reached 0.549 AP fine-tuned, uniform 0.5 int8 0.578), and the fit should not return less than
        the baseline it measured."""
        usable = self._usable()
        feasible = {m["key"]: m for m in usable if self._meets(m)}
        if not feasible:
            raise FitError(f"no measured candidate meets the budget ({self._budget_text()}) on the device; "
                           "raise --max-measurements or the budget")
        # equal estimates (drops within the noise count zero) go to the fastest: the most margin to verify
        est = {k: self.sens.estimate(Candidate.from_dict(m["candidate"])) for k, m in feasible.items()}
        near = max(est.values()) - max(self.sens.noise(), 0.005)
        ranked = sorted(feasible.values(), key=lambda m: (
            est[m["key"]] >= near and self._meets(m, every_session=True), est[m["key"]] >= near,
            est[m["key"]], -m[self.config.percentile]), reverse=True)
        top = [Candidate.from_dict(m["candidate"]) for m in ranked[:max(1, self.config.check_candidates)]]
        if self.config.check_candidates == 0 or self.config.check_epochs == 0:
            return top[0]
        safe = [Candidate.from_dict(m["candidate"]) for m in feasible.values() if self._meets(m, every_session=True)]
        uniform = [c for c in safe if len(set(c.ratios)) == 1 and all(c.int8)]
        if uniform:
            challenger = min(uniform, key=lambda c: c.ratios[0])
            top += [challenger] if challenger not in top else []
        self._check(top)
        checks = self.state.data["checks"]
        return max(top, key=lambda c: checks[c.key()]["ap"])

    def _check(self, cands: list[Candidate]) -> None:
        """A short fine-tune with distillation and a real fp32 mAP for each pruned candidate; the score is
        that mAP less the estimated int8 drops (the check runs in torch, in float). A candidate that prunes
        nothing is not fine-tuned (it keeps the trained weights): its mAP is the model's own."""
        todo = [c for c in cands if c.key() not in self.state.data["checks"]]
        pruned = [c for c in todo if self.space.prune_ratios(c)]
        for c in todo:
            if c not in pruned:
                self._record_check(c, {"ap": self._baseline_val()["ap"], "ap50": self._baseline_val()["ap50"],
                                       "epochs": 0, "seconds": 0.0})
        if not pruned:
            return
        self.log(f"check: {len(pruned)} candidate(s), {self.config.check_epochs} epoch(s) of fine-tune with "
                 "distillation each, mAP on the val split")
        jobs = [self._finetune_job(c, self.out / "checks" / c.key(), self.config.check_epochs) for c in pruned]
        for c, r in zip(pruned, self.executor.map(finetune_candidate, jobs)):
            self._record_check(c, r)
            shutil.rmtree(self.out / "checks" / c.key(), ignore_errors=True)

    def _record_check(self, c: Candidate, r: dict[str, Any]) -> None:
        int8_drop = self.sens.drop(Candidate((0.0,) * len(c.ratios), c.int8))
        check = {"ap_fp32": r["ap"], "ap50_fp32": r["ap50"], "int8_drop_est": int8_drop, "ap": r["ap"] - int8_drop,
                 "est_ap": self.sens.estimate(c), "epochs": r["epochs"], "seconds": r["seconds"]}
        self.state.data["checks"][c.key()] = check
        self.state.save()
        self.log(f"  {c.key()}: AP {r['ap']:.4f} in fp32 after {r['epochs']} epoch(s), less the int8 estimate "
                 f"{int8_drop:.4f}: {check['ap']:.4f} (search estimate {check['est_ap']:.4f})")

    def _baseline_val(self) -> dict[str, float]:
        """The uncompressed model's fp32 mAP on the whole val split (computed once)."""
        if "baseline_val" not in self.state.data:
            from edge_compress.eval.runner import evaluate_model

            r = evaluate_model(self.model, self.val_ds)
            self.state.data["baseline_val"] = {"ap": float(r.ap), "ap50": float(r.ap50)}
            self.state.save()
        return self.state.data["baseline_val"]

    def _finetune_job(self, c: Candidate, out: Path, epochs: int) -> FinetuneJob:
        shutil.rmtree(out, ignore_errors=True)   # a half-finished fine-tune of an interrupted run
        return FinetuneJob(str(self.checkpoint), c.key(), self.space.prune_ratios(c), self.space.round_to,
                           self.space.min_channels, str(self.data), str(out), epochs, self.config.finetune_lr,
                           seed=self.config.seed)

    # ---- 6. result and verification

    def _finalize(self, c: Candidate, round_no: int) -> bool:
        from edge_compress.export import export_model
        from edge_compress.quant import QuantConfig
        from edge_compress.train import load_detector

        folder = self.out / f"round{round_no}"
        shutil.rmtree(folder, ignore_errors=True)
        self.log(f"result round {round_no}: {c.key()}, "
                 + (f"{self.config.finetune_epochs} epoch(s) of fine-tune with distillation, " if
                    self.space.prune_ratios(c) else "nothing pruned (no fine-tune), ")
                 + "export, verification on the device")
        if self.space.prune_ratios(c):
            ft = self.executor.map(finetune_candidate, [self._finetune_job(c, folder / "model",
                                                                           self.config.finetune_epochs)])[0]
        else:   # nothing pruned: the trained weights are the uncompressed model's, a fine-tune only perturbs them
            ft = {"key": c.key(), "checkpoint": str(self.checkpoint), "epochs": 0, **self._baseline_val()}
        model = load_detector(ft["checkpoint"])
        quant = QuantConfig(num_images=self.config.calib_images, keep_fp32=self.space.keep_fp32(c)) \
            if self.space.any_int8(c) else None
        art = export_model(model, self.backend, folder / "artifact", quant=quant, data=self.data,
                           threads=self.threads, recipe={"steps": [], "fit": {"run": self.state.run_id,
                                                                                "candidate": c.key()}})
        m, passed, tries = self._verify(c, str(art.path))
        metrics = art.manifest["metrics"]
        self.state.data["rounds"].append({
            "round": round_no, "candidate": c.to_dict(), "key": c.key(), "scale": dict(self.state.data["scale"]),
            "search_budget_ms": (self.config.budget_ms or 0) * self.state.data["scale"].get("latency_ms", 1.0),
            "measured": m, "measured_ms": m[self.config.percentile], "passed": passed, "artifact": str(art.path),
            "reference": tries,
            "ap": metrics["map"]["ap"], "ap50": metrics["map"]["ap50"], "finetune": ft,
            "map_fp32": metrics.get("map_fp32", {}).get("ap")})
        self.state.save()
        ref = tries[-1]["drift"]
        self.log(f"  measured {self.config.percentile} {m[self.config.percentile]:.3f} ms, runtime AP "
                 f"{metrics['map']['ap']:.4f}: {'meets' if passed else 'MISSES'} the budget"
                 + ("" if ref is None else f" (the reference {ref - 1:+.0%} against its median in this run)"))
        return passed

    def _verify(self, c: Candidate, artifact: str) -> tuple[dict[str, Any], bool, list[dict[str, Any]]]:
        """The result measured on the device, interleaved with the reference (the uncompressed model);
        whether it meets the budget; the reference's drift (``_drift``) at each try.
        A miss while the reference runs more than ``DRIFT`` slower than its median is measured again (up
        to ``DRIFT_RETRIES`` times, ``DRIFT_PAUSE_S`` apart) before it counts: on a device in a slow phase
        (thermal throttling, a busy host) a miss says nothing about the result, and tightening the budget
        for it would cost mAP."""
        pct, tries = self.config.percentile, []
        for attempt in range(DRIFT_RETRIES + 1):
            if attempt:
                self.log(f"  the reference ran {tries[-1]['drift'] - 1:+.0%} against its median in this run: the "
                         f"device is in a slow phase; measuring again in {DRIFT_PAUSE_S:.0f} s "
                         f"({attempt} of {DRIFT_RETRIES})")
                time.sleep(DRIFT_PAUSE_S)
            m, ref = self._on_device([self._measure_job(c, artifact, keep=True, per_layer=True),
                                      self._measure_job(*self.reference, keep=True, reference=True)])
            if "error" in m:
                raise FitError(f"the result could not be measured on '{self.device.name}': {m['error']}")
            drift = self._drift(ref)
            tries.append({"now_ms": ref.get(pct), "drift": drift, "result_ms": m[pct]})
            missed = self._misses(m, scaled=False)
            passed, timed = not missed, bool(set(missed) - {"size_bytes"})
            if passed or not timed or drift is None or drift <= 1.0 + DRIFT:
                break
        else:   # every try missed in a slow phase
            self.log(f"  the device stayed {drift - 1:+.0%} slow; the miss counts")
        return m, passed, tries

    def _tighten(self) -> None:
        last = self.state.data["rounds"][-1]["measured"]
        for name, limit in self.config.constraints().items():
            value = self._value(last, name)
            if value is not None and value > limit:
                s = self.state.data["scale"].get(name, 1.0)
                self.state.data["scale"][name] = s * SAFETY * limit / value
        self.state.save()
        self.log(f"tightened the search budget: {self.state.data['scale']}")

    # ---- 7. outputs

    def _finish(self) -> FitResult:
        from edge_compress.fit.report import write_report
        from edge_compress.io import write_json_atomic

        last = self.state.data["rounds"][-1]
        final = self.out / "artifact"
        if not final.exists():
            shutil.copytree(last["artifact"], final)
        result = self.report_data(last, final)
        self.state.data["result"] = result["result"]
        self.state.save()
        write_json_atomic(self.out / "fit_result.json", result)
        report = write_report(result, self.out / "report.html")
        self.log(f"fit: {final} ({self.config.percentile} {last['measured_ms']:.3f} ms, AP {last['ap']:.4f}); "
                 f"report {report}")
        return FitResult(self.out, final, report, result)

    def report_data(self, last: dict[str, Any], artifact: Path) -> dict[str, Any]:
        """The JSON the report renders (and ``fit_result.json`` holds)."""
        c = Candidate.from_dict(last["candidate"])
        return {
            "model": {"name": self.model.name, "family": self.model.family}, "device": self.device.name,
            "backend": self.backend, "threads": self.threads,
            "budget": {"latency_ms": self.config.budget_ms, "percentile": self.config.percentile,
                       "energy_mj": self.config.budget_mj, "size_bytes": self.config.budget_bytes},
            "baselines": self._baseline_points(), "candidates": self._candidate_points(),
            "result": {"key": c.key(), "latency_ms": last["measured_ms"], "ap": last["ap"], "ap50": last["ap50"],
                       "energy_mj": last["measured"].get("energy_mj"),
                       "energy_label": last["measured"].get("energy_label"),
                       "size_bytes": last["measured"].get("size_bytes"), "artifact": str(artifact),
                       "record": last["measured"].get("record"),
                       "rounds": [{"round": r["round"], "search_budget_ms": r["search_budget_ms"],
                                   "measured_ms": r["measured_ms"], "passed": r["passed"],
                                   "reference": r.get("reference", [])}
                                  for r in self.state.data["rounds"]]},
            "layers": [row.to_dict() for row in self.space.layers(c)],
            "latency_model": {**self._holdout(), "environment": self.env or {},
                              "coefficients": fit_latency(*self._design("latency_ms"), self.env or {},
                                                          costs=self.costs).to_dict()},
            "notes": self._notes(),
        }

    def _baseline_points(self) -> list[dict[str, Any]]:
        points = []
        named = [("int8, unpruned" if self.space.int8_everywhere else "fp32", self.space.baseline())]
        if self.space.precision_layers:
            named.append(("int8 everywhere", self.space.uniform(0.0, True)))
        named.append(("smallest (floor)", self.space.smallest()))
        for name, c in named:
            m = self._latest(c)
            if m is not None:
                points.append({"name": name, "latency_ms": m[self.config.percentile],
                               "ap": self._baseline_val()["ap"] if name == "fp32" else None,
                               "est_ap": self.sens.estimate(c), "size_bytes": m.get("size_bytes")})
        return points

    def _candidate_points(self) -> list[dict[str, Any]]:
        ms = [m for m in self._usable() if m.get(self.config.percentile) is not None]
        models = self._fit_models() if len(ms) >= 3 else {}
        pts = []
        for m in ms:
            c = Candidate.from_dict(m["candidate"])
            pred = float(models["latency_ms"].predict(self._x(c))) if "latency_ms" in models else None
            check = self.state.data["checks"].get(m["key"], {})
            pts.append({"key": m["key"], "measured_ms": m[self.config.percentile], "predicted_ms": pred,
                        "est_ap": max(0.0, self.sens.estimate(c)), "ap": check.get("ap"),
                        "heldout": bool(m.get("heldout")) and self._heldout(m["key"]),
                        "energy_mj": m.get("energy_mj"), "size_bytes": m.get("size_bytes"), "pareto": False})
        for i in pareto([(p["measured_ms"], p["ap"] if p["ap"] is not None else p["est_ap"]) for p in pts]):
            pts[i]["pareto"] = True
        return pts

    def _notes(self) -> list[str]:
        n_stale = sum(1 for m in self.state.data["measurements"] if m.get("stale"))
        notes = [f"{len(self._usable())} candidates measured on '{self.device.name}' ({self.backend}, "
                 f"{self.threads} thread(s)); {len(self.state.data['builds_failed'])} failed to build",
                 "estimated AP: baseline AP minus the per-layer sensitivity drops (no fine-tune); measured AP: "
                 "after the check fine-tune (candidates) or the final fine-tune, through the runtime (result)",
                 "latency-model error: fitted without the held-out candidates, measured on them; the search uses "
                 "a fit on all measurements"]
        if n_stale:
            notes.append(f"{n_stale} measurements from another environment were not used (see state.json)")
        return notes
