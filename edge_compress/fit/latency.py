"""The latency model of one (device, backend): per-layer costs fitted on measured profiles.

A candidate's latency is predicted as a fixed cost plus the sum of its convs'
costs. A conv's cost is what the runtime runs for it after fusion: every runtime
here folds BatchNorm into the conv and fuses the activation into its kernel, and
an int8 conv's QuantizeLinear/DequantizeLinear pairs become one int8 kernel with
its requantisation, so one conv (with its BN, activation and, in int8, the
re-quantisation of its input) is one unit of cost:

    t(layer) = a[kind, precision] * MACs + b[precision] * output elements
               (+ q * input elements for an int8 layer: quantising its input)
               (+ qb * input elements where an int8 conv is fed by a float tensor,
                + db * output elements where it feeds a float consumer)

The last two are the precision boundaries of a mixed candidate: an all-int8 chain
requantises inside its kernels, but every int8 island in a float graph pays a
standalone QuantizeLinear on its way in and a DequantizeLinear on its way out
(and the layout reorders around them). (Candidates with a few int8 convs once
measured slower on OpenVINO than the same model all in fp32; that was the QDQ
graph quantizing every elementwise op of the float regions, fixed in
``quant.qdq.float_neighbours``, not a cost of the boundaries.)

with ``kind`` in conv / pointwise / depthwise. Layers of one kind are not alike,
though: a stem conv on 3 input channels, a 3x3 at 160x160 and a 1x1 at 10x10 run
at very different ms per MAC, and how much int8 saves differs per layer (on ONNX
Runtime a kind-only model left fp32 pruned candidates 25-30% off). So where the
device gives per-layer profiles of the unpruned model in fp32 and in int8
(``profiled_conv_ms``: its runtime's profiler, kernel times by the conv's ONNX
node name), the MAC terms become ``a[precision] * profiled ms of this layer at
the MACs kept`` (``LayerCosts``): each conv's own measured cost, calibrated
against the end-to-end measurements by ``a``. A conv's time is not proportional
to its MACs (what pruning leaves is partly memory traffic and the call), so with
profiles of a uniformly pruned model too it is the line through the conv's two
profiled points (on ONNX Runtime, yolo_tiny, leave-one-out over 69 measured
candidates: 67 of 69 within +-10% against 63 of 69 proportional to the MACs,
from the same profiles; on OpenVINO 50 of 50 against 48 of 50). The coefficients are non-negative
(NNLS) and fitted to *relative* error (each measured row divided by its latency),
since the budget is relative. The fixed cost absorbs what does not scale with the
convs (input copy, resize/concat, the head's decode, the call into the runtime).

The model knows which environment its measurements come from
(``environment_key``: device and its settings, backend, runtime version, threads,
CPU model); measurements from another environment are not used, and a stored model
whose key differs is stale (``fit`` says why and measures again).

``holdout_report`` fits on the measurements not held out and reports the error on
the held-out ones: the honest error of a model on candidates it has not seen.
``sampling_scores`` ranks unmeasured candidates by where the model knows least
(leverage of their features under the fitted design) times how wrong it was on
the nearest measured candidates: adaptive sampling measures there first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from edge_compress.errors import ConfigError
from edge_compress.fit.space import KINDS, LayerRow

PRECISION_TERMS = ("fp32", "int8")
# Feature scales: MACs in millions, elements in hundreds of thousands, so the NNLS columns are O(1).
MACS_SCALE, ELEMS_SCALE = 1e6, 1e5


@dataclass(frozen=True)
class LayerCosts:
    """Each conv's kernel time at each precision, read from the runtime's per-layer profiles: what the
    runtime runs for that layer, fused and laid out as it does it (a stem conv on 3 channels and a 1x1 on
    256 cost very different ms per MAC).

    The unpruned model's profiles give each conv's time at its full MACs (``ms_per_mac``). A conv's time
    does not fall in proportion to the MACs pruning removes: ONNX Runtime's int8 stem kept 83% of its time
    at half its MACs, yolo_tiny's stage3.conv1 in fp32 33% at a quarter (what stays is memory traffic, the
    requantisation and the call). So where a profile of a uniformly pruned model is there too
    (``pruned``: the conv's MACs and ms in it), a conv's time is the line through its two profiled points,
    extrapolated below the pruned one (flat where the pruned profile was the slower) and never under the
    proportional time of the cheaper point per MAC.
    With one point, the time is proportional to the MACs kept.

    A conv the unpruned profiles miss at one precision takes its time at the other times the median
    int8/fp32 ratio of the convs profiled at both; one missing at both, the median ms per MAC."""

    ms_per_mac: dict[str, dict[str, float]]           # precision -> conv -> ms per MAC of the full layer
    profiled: dict[str, int]                          # precision -> convs found in its profile
    full_macs: dict[str, int] = field(default_factory=dict)
    pruned: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)  # precision -> conv -> (MACs, ms)

    @classmethod
    def from_profiles(cls, conv_ms: dict[str, dict[str, float]], full_macs: dict[str, int],
                      pruned: dict[str, tuple[dict[str, float], dict[str, int]]] | None = None) -> "LayerCosts":
        """``conv_ms``: precision -> conv -> ms in the unpruned model's profile; ``pruned``: precision ->
        (conv -> ms, conv -> MACs) of a pruned model's profile (convs it did not prune are left out)."""
        per = {p: {c: ms / full_macs[c] for c, ms in conv_ms.get(p, {}).items() if full_macs.get(c)}
               for p in PRECISION_TERMS}
        both = [c for c in per["fp32"] if c in per["int8"]]
        ratio = float(np.median([per["int8"][c] / per["fp32"][c] for c in both])) if both else 1.0
        table: dict[str, dict[str, float]] = {}
        for p, other, r in (("fp32", "int8", 1.0 / ratio), ("int8", "fp32", ratio)):
            fallback = float(np.median(list(per[p].values()) or list(per[other].values()) or [0.0]))
            table[p] = {c: per[p].get(c, per[other][c] * r if c in per[other] else fallback) for c in full_macs}
        points = {p: {c: (int(macs[c]), float(ms[c])) for c in ms
                      if c in per[p] and 0 < macs.get(c, 0) < full_macs[c] and ms[c] > 0}
                  for p, (ms, macs) in (pruned or {}).items() if p in PRECISION_TERMS}
        return cls(table, {p: len(per[p]) for p in PRECISION_TERMS}, dict(full_macs),
                   {p: pts for p, pts in points.items() if pts})

    def ms(self, precision: str, conv: str, macs: float) -> float:
        """The predicted kernel ms of ``conv`` at ``precision`` with ``macs`` MACs kept."""
        per_mac = self.ms_per_mac[precision].get(conv, 0.0)
        point = self.pruned.get(precision, {}).get(conv)
        if point is None:
            return per_mac * macs
        m2, t2 = point
        full = self.full_macs[conv]
        slope = (per_mac * full - t2) / (full - m2)
        if macs >= m2:                                  # between the two profiled points
            return t2 + slope * (macs - m2)
        return max(t2 - max(slope, 0.0) * (m2 - macs), min(per_mac, t2 / m2) * macs)

    def to_dict(self) -> dict[str, Any]:
        return {"ms_per_mac": self.ms_per_mac, "profiled": self.profiled, "full_macs": self.full_macs,
                "pruned": {p: {c: list(v) for c, v in pts.items()} for p, pts in self.pruned.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerCosts":
        return cls(d["ms_per_mac"], d["profiled"], d.get("full_macs", {}),
                   {p: {c: (int(v[0]), float(v[1])) for c, v in pts.items()} for p, pts in d.get("pruned", {}).items()})


def profiled_conv_ms(per_layer: dict[str, Any], conv_names: dict[str, Sequence[str]]) -> dict[str, float]:
    """The ms of each conv's kernel in a runtime's per-layer profile (a profile record's ``per_layer``),
    by the ONNX names of the conv and what fuses into it (``SearchSpace.conv_profile_names``): a runtime names
    the fused kernel after one of them or extends it (ONNX Runtime's ``.../Conv_token_29`` in int8 and
    ``.../act/LeakyRelu_output_0_nchwc`` for a Conv+LeakyRelu in fp32, OpenVINO's
    ``.../Conv/WithoutBiases``). Only conv kernels count (not the QuantizeLinear or reorder named after a
    conv), and a row goes to the conv with the longest matching name (``/a/Conv_1`` is not ``/a/Conv``'s)."""
    by_length = sorted(((name, conv) for conv, names in conv_names.items() for name in names),
                       key=lambda nc: -len(nc[0]))
    ms: dict[str, float] = {}
    for row in per_layer.get("layers") or []:
        name, op = str(row.get("name", "")), str(row.get("op_type", ""))
        if "Conv" not in op or "Transpose" in op or row.get("median_us") is None:
            continue
        conv = next((c for n, c in by_length if name == n or name.startswith((n + "/", n + "_"))), None)
        if conv is not None:
            ms[conv] = ms.get(conv, 0.0) + float(row["median_us"]) / 1000.0
    return ms


def feature_names(costs: LayerCosts | None = None) -> list[str]:
    names = ["fixed"]
    names += [f"profiled_ms[{p}]" for p in PRECISION_TERMS] if costs is not None else \
        [f"macs[{k},{p}]" for k in KINDS for p in PRECISION_TERMS]
    names += [f"out_elems[{p}]" for p in PRECISION_TERMS]
    return names + ["int8_in_elems", "quantize_boundary_elems", "dequantize_boundary_elems"]


def features(layers: Sequence[LayerRow], costs: LayerCosts | None = None) -> np.ndarray:
    """The feature row of one candidate: sums of per-layer terms (see the module docstring). With
    ``costs``, each conv adds its profiled time at the MACs it keeps (``LayerCosts.ms``; one term per
    precision) instead of its MACs summed per kind."""
    x = np.zeros(len(feature_names(costs)))
    x[0] = 1.0
    np_ = len(PRECISION_TERMS)
    n_mac = np_ if costs is not None else len(KINDS) * np_
    for row in layers:
        p = PRECISION_TERMS.index(row.precision)
        if costs is not None:
            x[1 + p] += costs.ms(row.precision, row.name, row.macs)
        else:
            x[1 + KINDS.index(row.kind) * np_ + p] += row.macs / MACS_SCALE
        x[1 + n_mac + p] += row.out_elems / ELEMS_SCALE
        if row.precision == "int8":
            x[-3] += row.in_elems / ELEMS_SCALE
        x[-2] += row.boundary_in_elems / ELEMS_SCALE
        x[-1] += row.boundary_out_elems / ELEMS_SCALE
    return x


def environment_key(env: dict[str, Any]) -> str:
    """A digest of what a latency measurement depends on besides the candidate."""
    return hashlib.sha256(json.dumps(env, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class LatencyModel:
    """Non-negative per-layer cost coefficients; ``predict`` in ms."""

    coef: np.ndarray
    environment: dict[str, Any]
    n_fit: int
    ridge: float = 1e-4
    costs: LayerCosts | None = None      # the rows were ``features(layers, costs)``
    _gram_inv: np.ndarray | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return environment_key(self.environment)

    def predict(self, x: np.ndarray) -> np.ndarray | float:
        return x @ self.coef

    def layer_costs(self, layers: Sequence[LayerRow]) -> dict[str, float]:
        """Predicted ms of each conv (the fixed cost is not in any layer)."""
        return {row.name: float(features([row], self.costs)[1:] @ self.coef[1:]) for row in layers}

    def leverage(self, x: np.ndarray) -> np.ndarray:
        """``r^T (R^T R)^-1 r`` with ``r = x / predicted`` (the relative-error design the model was fitted
        on): about 1 / (measurements like it); large where the model is unsure."""
        x = np.asarray(x, float)
        if self._gram_inv is None:
            return np.ones(len(x))
        r = x / np.maximum(np.asarray(self.predict(x)), 1e-9)[:, None]
        return np.einsum("ij,jk,ik->i", r, self._gram_inv, r)

    def to_dict(self) -> dict[str, Any]:
        return {"features": feature_names(self.costs), "coef": self.coef.tolist(), "environment": self.environment,
                "environment_key": self.key, "n_fit": self.n_fit,
                "form": ("fixed + sum over convs of a[prec]*profiled ms of the conv at its MACs"
                         if self.costs is not None else "fixed + sum over convs of a[kind,prec]*MACs")
                + " + b[prec]*out elems (+ q*in elems, int8) + qb*quantize-boundary elems + db*dequantize-boundary "
                  "elems", **({"layer_costs": self.costs.to_dict()} if self.costs is not None else {})}


def fit_latency(x: np.ndarray, y: np.ndarray, environment: dict[str, Any], ridge: float = 1e-4,
                costs: LayerCosts | None = None) -> LatencyModel:
    """NNLS on relative error: minimise ``sum ((x_i . w - y_i) / y_i)^2 + ridge |w|^2``, ``w >= 0``."""
    from scipy.optimize import nnls

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(y) < 3:
        raise ConfigError(f"the latency model needs at least 3 measured candidates, got {len(y)}")
    if (y <= 0).any():
        raise ConfigError("a measured latency is <= 0 ms: the profile store holds a broken record")
    xs = x / y[:, None]
    scale = np.maximum(np.abs(xs).max(0), 1e-12)
    a = np.vstack([xs / scale, np.sqrt(ridge) * np.eye(x.shape[1])])
    b = np.concatenate([np.ones(len(y)), np.zeros(x.shape[1])])
    w, _ = nnls(a, b, maxiter=50 * x.shape[1])
    coef = w / scale
    gram = xs.T @ xs + ridge * np.diag(scale ** 2)
    model = LatencyModel(coef, environment, len(y), ridge, costs)
    model._gram_inv = np.linalg.pinv(gram)
    return model


def relative_errors(model: LatencyModel, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(predicted - measured) / measured`` per row."""
    return (np.asarray(model.predict(np.asarray(x, float))) - y) / y


def holdout_report(x: np.ndarray, y: np.ndarray, heldout: np.ndarray, environment: dict[str, Any],
                   keys: Sequence[str] = (), costs: LayerCosts | None = None) -> dict[str, Any]:
    """Fit on ``~heldout``, report the error on ``heldout`` (the held-out candidates were never fitted)."""
    heldout = np.asarray(heldout, bool)
    train, test = ~heldout, heldout
    out: dict[str, Any] = {"n_fit": int(train.sum()), "n_heldout": int(test.sum()), "within_10pct": None,
                           "median_abs_rel_err": None, "p95_abs_rel_err": None, "heldout": []}
    if train.sum() < 3 or test.sum() == 0:
        out["note"] = "too few measurements to hold some out"
        return out
    model = fit_latency(x[train], y[train], environment, costs=costs)
    err = relative_errors(model, x[test], y[test])
    a = np.abs(err)
    keys = list(keys) or [str(i) for i in range(len(y))]
    out.update(within_10pct=float((a <= 0.10).mean()), median_abs_rel_err=float(np.median(a)),
               p95_abs_rel_err=float(np.percentile(a, 95)), max_abs_rel_err=float(a.max()),
               heldout=[{"key": k, "predicted_ms": float(p), "measured_ms": float(m)}
                        for k, p, m in zip(np.asarray(keys)[test], model.predict(x[test]), y[test])])
    return out


def measurement_repeatability(sessions: Sequence[Sequence[float]]) -> dict[str, Any]:
    """How far one session's p50 falls from the median of its candidate's sessions: the device's own
    noise, which no latency model can beat (a model within +-10% of measurements that themselves
    repeat within +-10% only so often is as good as the measurements allow)."""
    dev = [abs(v - float(np.median(s))) / float(np.median(s)) for s in sessions if len(s) > 1 for v in s]
    if not dev:
        return {"n_candidates": 0, "note": "no candidate measured in more than one session"}
    a = np.asarray(dev)
    return {"n_candidates": sum(1 for s in sessions if len(s) > 1), "n_sessions": len(a),
            "session_within_10pct_of_median": float((a <= 0.10).mean()),
            "session_median_abs_rel_dev": float(np.median(a)), "session_p95_abs_rel_dev": float(np.percentile(a, 95))}


def sampling_scores(model: LatencyModel, x_new: np.ndarray, x_seen: np.ndarray, y_seen: np.ndarray) -> np.ndarray:
    """Where to measure next: leverage x (1 + 10 * |relative error| of the nearest measured candidate)."""
    lev = model.leverage(x_new)
    err = np.abs(relative_errors(model, x_seen, y_seen))
    scale = np.maximum(np.abs(x_seen).max(0), 1e-12)
    d = (((x_new[:, None, :] - x_seen[None, :, :]) / scale) ** 2).sum(-1)
    return lev * (1.0 + 10.0 * err[np.argmin(d, axis=1)])
