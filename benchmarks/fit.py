"""Fit benchmark: latency budgets met on this machine, mAP against a uniform baseline, latency-model error.

    python benchmarks/fit.py            # zoo 320 px models (runs/bench_zoo; trains missing ones), OpenVINO and
                                        # ONNX Runtime, 3 budgets between int8 and fp32 (+ 1 below both)
    python benchmarks/fit.py --quick    # shipped 128 px yolo_tiny, OpenVINO, one budget; AP NOT meaningful

For every family and backend, on the ``local`` device at ``--threads`` (default 1):

1. the fp32 and int8 (every conv) latencies of the unpruned model are measured;
   the budgets are ``int8 + f * (fp32 - int8)`` for f in ``--fractions`` (the
   issue's range) and ``g * min(int8, fp32)`` for g in ``--below`` (budgets that need
   pruning; raised to ``FLOOR_MARGIN`` x the most pruned int8 candidate's latency where
   under it). Where int8 everywhere runs slower than fp32 (ssdlite_mbv3 on ONNX Runtime
   here, 5.0 against 3.5 ms: each HardSwish runs in float between a DequantizeLinear and
   a QuantizeLinear, and the int8 stem conv on 3 channels takes 0.83 ms against 0.42 in
   fp32), the line says so: the budgets "between" them are then above fp32, and the
   uniform baseline must prune to reach them;
2. ``fit`` runs once per budget (the sensitivity of the family's first run, for
   every backend, and every measurement in the shared profile store are reused by
   the next ones); every latency, the baselines' too, is the median of 3
   sessions, each in a fresh process, interleaved across a batch;
3. the uniform baseline of each budget: one global pruning ratio (every knob,
   grid of ``UNIFORM_GRID``, quick: ``QUICK_GRID``) + int8 everywhere, the least pruned whose measured
   latency is at or below the fit result's measured latency; fine-tuned with
   distillation for the same epochs as the fit's result (none when it prunes
   nothing, as in ``fit``), exported, mAP through the runtime.

Prints one table per family/backend and ends with ``RESULT {json}``:
``violations`` (fit results whose measured latency exceeds their budget),
``predictor_within_10pct`` (held-out candidates of each family/backend's last fit,
which holds the earlier budgets' measurements too, pooled),
``measurement_session_within_10pct`` (single sessions within +-10% of their
candidate's median session: the machine's own repeatability, the ceiling of the
predictor's figure),
``ap_gain_vs_uniform`` (family -> "backend budget" -> AP points), and the rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from backends import cpu_name, full_checkpoints, quick_checkpoints  # noqa: E402

UNIFORM_GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
QUICK_GRID = (0.0, 0.25, 0.5, 0.75)
FLOOR_MARGIN = 1.1    # a "below" budget stays this far above the most pruned int8 candidate's latency
FULL = dict(sensitivity_images=64, initial_samples=8, max_measurements=20, search_rounds=3, batch=5,
            check_candidates=1, check_epochs=1, finetune_epochs=2, verify_rounds=3, profile_seconds=8.0,
            measure_sessions=3)
# --quick is a smoke run under 2 minutes: every conv int8 with only the pruning searched (as the demo's fit),
# two ratios, a handful of measurements of one short session each.
QUICK = dict(precision="int8", ratios=(0.0, 0.5), sensitivity_images=12, initial_samples=3, max_measurements=8,
             search_rounds=1, batch=3, check_candidates=0, check_epochs=0, finetune_epochs=1, calib_images=16,
             verify_rounds=3, profile_seconds=1.0, measure_sessions=1)
GOALS = {"violations": 0, "ap_gain_points": 2.0, "predictor_within_10pct": 0.95}


def devices_file(tmp: Path, threads: int) -> Path:
    p = tmp / "devices.yaml"
    p.write_text(f"devices:\n  local:\n    connection: local\n    backends: [openvino, onnxruntime]\n"
                 f"    threads: {threads}\n    energy_sensor: estimate\n")
    return p


def measure_uniforms(ckpt: Path, data: Path, space, backend: str, points: list[tuple[float, bool]], work: Path,
                     devices: Path, store: Path, threads: int, tags: list[dict[str, Any]],
                     settings: dict[str, Any], per_layer: bool = False) -> list[dict[str, Any]]:
    """Build and measure uniform candidates (every knob pruned by ``ratio``; int8 everywhere or fp32), one
    per ``(ratio, int8)`` of ``points``, as the fit measures: the median of ``measure_sessions`` sessions,
    each in a fresh process, the sessions interleaved across the points (with the runtime's per-layer
    profile if ``per_layer``: the fits reuse these as their baselines and take their layer costs from it)."""
    from edge_compress.fit.measure import BuildJob, MeasureJob, build_candidate, measure_fresh, measure_settings
    from edge_compress.profile.devices import get_device

    jobs, ratios_of = [], []
    for (ratio, int8), tag in zip(points, tags):
        ratios = {conv: ratio for k in space.knobs for conv in k.convs} if ratio > 0 else {}
        keep = () if int8 else space.precision_layers
        key = f"uniform{ratio:g}{'-int8' if int8 else '-fp32'}"
        b = build_candidate(BuildJob(str(ckpt), key, ratios, space.round_to, space.min_channels, tuple(keep), int8,
                                     backend, str(data), str(work / f"{key}-{time.time_ns()}"), threads, 8))
        if "error" in b:
            raise RuntimeError(f"{key}: {b['error']}")
        jobs.append(MeasureJob(key, b["artifact"], get_device("local", devices).to_dict(),
                               measure_settings(settings["profile_seconds"], threads, per_layer), str(store), False,
                               tag, settings["measure_sessions"]))
        ratios_of.append((ratio, ratios))
    out = []
    for job, m, (ratio, ratios) in zip(jobs, measure_fresh(jobs), ratios_of):
        if "error" in m:
            raise RuntimeError(f"{job.key}: {m['error']}")
        out.append({**m, "ratio": ratio, "ratios": ratios})
    return out


def uniform_result(ckpt: Path, data: Path, space, backend: str, row: dict[str, Any], epochs: int, work: Path,
                   devices: Path, store: Path, threads: int, sessions: int, seconds: float) -> dict[str, Any]:
    """Fine-tune (distilled) + export int8 + runtime mAP + latency of the chosen uniform candidate."""
    from edge_compress.export import export_model
    from edge_compress.fit.finetune import FinetuneJob, finetune_candidate
    from edge_compress.quant import QuantConfig
    from edge_compress.train import load_detector

    model_ckpt, ft_ap = ckpt, None
    if row["ratios"]:
        ft = finetune_candidate(FinetuneJob(str(ckpt), f"uniform{row['ratio']:g}", row["ratios"], space.round_to,
                                            space.min_channels, str(data), str(work / f"ft{row['ratio']:g}"),
                                            epochs))
        model_ckpt, ft_ap = Path(ft["checkpoint"]), ft["ap"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        art = export_model(load_detector(model_ckpt), backend, work / f"art{row['ratio']:g}-{time.time_ns()}",
                           quant=QuantConfig(), data=data, threads=threads, latency_check=False)
    final = measure_uniform_artifact(art.path, devices, store, threads, sessions, seconds)
    return {"ratio": row["ratio"], "candidate_ms": row["p50"], "measured_ms": final, "ap": art.manifest["metrics"]
            ["map"]["ap"], "finetuned_fp32_ap": ft_ap, "epochs": epochs if row["ratios"] else 0}


def measure_uniform_artifact(path: Path, devices: Path, store: Path, threads: int, sessions: int,
                             seconds: float) -> float:
    from edge_compress.fit.measure import MeasureJob, measure_fresh, measure_settings
    from edge_compress.profile.devices import get_device

    settings = measure_settings(seconds, threads)
    m = measure_fresh(MeasureJob("uniform-final", str(path), get_device("local", devices).to_dict(),
                                 settings, str(store), True, {"run": "bench-uniform"}, sessions))
    return m["p50"]


def run_pair(fam: str, ckpt: Path, data: Path, backend: str, args, settings: dict[str, Any], work: Path,
             devices: Path, store: Path, sensitivity: Path | None) -> dict[str, Any]:
    from edge_compress.fit import FitConfig, FitError, fit
    from edge_compress.fit.measure import CANDIDATE_BUILD
    from edge_compress.fit.space import SearchSpace
    from edge_compress.train import load_detector

    # the fit's own space (quick mode searches ratios (0, 0.5) with every conv int8), so its fingerprint matches
    cfg = FitConfig(budget_ms=1.0, **{k: settings[k] for k in ("ratios", "precision") if k in settings})
    space = SearchSpace.for_config(load_detector(ckpt), cfg, ("fp32", "int8"))
    # tagged as the fit's own measurements of these candidates (same space, same build): its baselines
    tag = {"run": "bench", "space": space.fingerprint(), "build": CANDIDATE_BUILD}

    def baseline_tag(int8: bool) -> dict[str, Any]:
        if space.int8_everywhere and not int8:    # fp32 is no candidate of this space (its key would be int8's)
            return {"run": "bench"}
        return {**tag, "candidate_dict": space.uniform(0.0, int8).to_dict()}

    sessions = settings["measure_sessions"]
    base = dict(zip((False, True), (m["p50"] for m in measure_uniforms(
        ckpt, data, space, backend, [(0.0, False), (0.0, True)], work, devices, store, args.threads,
        [baseline_tag(q) for q in (False, True)], settings, per_layer=True))))
    ratios = QUICK_GRID if args.quick else UNIFORM_GRID
    grid = measure_uniforms(ckpt, data, space, backend, [(r, True) for r in ratios], work, devices, store,
                            args.threads, [{"run": "bench-uniform"}] * len(ratios), settings)
    lo, hi = sorted((base[True], base[False]))
    # the search space's floor: every knob at its largest ratio, int8 (in the grid where the fit's ratios are)
    top = max(cfg.ratios)
    floor = next((g for g in grid if g["ratio"] == top), grid[-1])
    budgets = [("between", lo + f * (hi - lo)) for f in args.fractions] + below_budgets(
        lo, floor["p50"], args.below)
    print(f"\n{fam} / {backend}: fp32 {base[False]:.3f} ms, int8 {base[True]:.3f} ms"
          + (" (int8 everywhere is the SLOWER one here: the budgets between them are above fp32)"
             if base[True] > base[False] else "")
          + f", uniform {floor['ratio']:g} int8 {floor['p50']:.3f} ms"
          + (" (the search space's floor)" if floor["ratio"] == top else "") + "; budgets "
          + ", ".join(f"{b:.3f}" for _, b in budgets), flush=True)
    rows, sens = [], sensitivity
    uniforms: dict[float, dict[str, Any]] = {}   # ratio -> its result: two budgets may share a uniform baseline
    for i, (kind, budget) in enumerate(budgets):
        out = args.out / fam / backend / f"budget{i}-{budget:.3f}ms"
        t0 = time.perf_counter()
        try:
            res = fit(ckpt, data, FitConfig(budget_ms=round(budget, 4), threads=args.threads, **settings), out,
                      backend=backend, devices_path=devices, store=store, executor="process", sensitivity=sens,
                      log=lambda s: print(f"    {s}", flush=True))
        except FitError as e:     # no verified result: a violation, with the reason; the other budgets go on
            print(f"  budget {budget:.3f} ms: FitError: {e}", flush=True)
            rows.append({"family": fam, "backend": backend, "kind": kind, "budget_ms": budget, "violation": True,
                         "error": str(e), "heldout": [], "out": str(out)})
            sens = out / "sensitivity.json"
            continue
        sens = out / "sensitivity.json"
        r = res.result["result"]
        fit_s = time.perf_counter() - t0
        uni_row = next((g for g in grid if g["p50"] <= r["latency_ms"]), grid[-1])
        if uni_row["ratio"] not in uniforms:
            uniforms[uni_row["ratio"]] = uniform_result(ckpt, data, space, backend, uni_row,
                                                        settings["finetune_epochs"], work, devices, store,
                                                        args.threads, sessions, settings["profile_seconds"])
        uni = uniforms[uni_row["ratio"]]
        lm = res.result["latency_model"]
        rows.append({"family": fam, "backend": backend, "kind": kind, "budget_ms": budget, "fit_ms": r["latency_ms"],
                     "fit_ap": r["ap"], "violation": r["latency_ms"] > budget, "uniform": uni,
                     "gain_points": 100 * (r["ap"] - uni["ap"]), "fit_key": r["key"], "fit_s": fit_s,
                     "rounds": len(r["rounds"]), "heldout": lm.get("heldout", []),
                     # the uncompressed model at the result's verification against its median in the fit: >1 slow
                     "reference_drift": ((r["rounds"][-1].get("reference") or [{}])[-1]).get("drift"),
                     "within_10pct": lm.get("within_10pct"), "measurement": lm.get("measurement", {}),
                     "out": str(out)})
        print_row(rows[-1])
    return {"fp32_ms": base[False], "int8_ms": base[True], "rows": rows,
            "sensitivity": str(sens) if sens and Path(sens).is_file() else None}


def below_budgets(fastest_ms: float, floor_ms: float, factors: list[float]) -> list[tuple[str, float]]:
    """Budgets ``g * fastest_ms`` (the faster of the unpruned model in fp32 and in int8) that need pruning;
    one under ``FLOOR_MARGIN`` x the search space's floor (its most pruned int8 candidate, measured in the
    uniform grid) is raised to that, and dropped where that is not below ``fastest_ms``: ``fit`` refuses a
    budget under the floor (a clear error, not a fit to count)."""
    out = []
    for g in factors:
        b = g * fastest_ms
        if b < FLOOR_MARGIN * floor_ms:
            b = FLOOR_MARGIN * floor_ms
            print(f"  below budget {g:g} x {fastest_ms:.3f} ms = {g * fastest_ms:.3f} ms is under {FLOOR_MARGIN:g} "
                  f"x the floor {floor_ms:.3f} ms: {b:.3f} ms"
                  + ("" if b < fastest_ms else " is not below the unpruned model; dropped"), flush=True)
            if b >= fastest_ms:
                continue
        out.append(("below", b))
    return out


def print_row(r: dict[str, Any]) -> None:
    u = r["uniform"]
    print(f"  {r['kind']:<7} budget {r['budget_ms']:7.3f} ms | fit {r['fit_ms']:7.3f} ms AP {r['fit_ap']:.4f} "
          f"{'VIOLATION' if r['violation'] else 'ok':>9} | uniform r={u['ratio']:<5g} {u['measured_ms']:7.3f} ms "
          f"AP {u['ap']:.4f} | gain {r['gain_points']:+.2f} pts | held-out within 10% "
          f"{r['within_10pct'] if r['within_10pct'] is None else round(r['within_10pct'], 3)}"
          + ("" if r.get("reference_drift") is None else
             f" | device {r['reference_drift'] - 1:+.0%} vs its median in the fit"),
          flush=True)


def _pooled_repeatability(rows: list[dict[str, Any]]) -> float | None:
    """Of every single session in the rows' fits, the share within +-10% of its candidate's median session:
    the device's own repeatability, the ceiling of ``predictor_within_10pct``."""
    reps = [r.get("measurement") or {} for r in rows]
    n = sum(m.get("n_sessions", 0) for m in reps)
    return sum(m["session_within_10pct_of_median"] * m["n_sessions"] for m in reps if m.get("n_sessions")) / n \
        if n else None


def summary(results: dict[str, Any], quick: bool, threads: int, settings: dict[str, Any]) -> dict[str, Any]:
    rows = [r for fam in results.values() for pair in fam.values() for r in pair["rows"]]
    # per family/backend, the last fit's report: it holds every measurement of the earlier budgets too (the
    # shared store), so each held-out candidate counts once
    held = [h for fam in results.values() for pair in fam.values()
            for h in ([r["heldout"] for r in pair["rows"] if r["heldout"]] or [[]])[-1]]
    within = [abs(h["predicted_ms"] - h["measured_ms"]) / h["measured_ms"] <= 0.10 for h in held]
    # against the latency as measured, before the division by its batch's reference drift (fit.run._speed)
    raw = [abs(h["predicted_ms"] - h.get("raw_ms", h["measured_ms"])) <= 0.10 * h.get("raw_ms", h["measured_ms"])
           for h in held]
    gains: dict[str, dict[str, float | None]] = {}
    for r in rows:
        if "error" in r:
            gains.setdefault(r["family"], {})[f"{r['backend']} {r['budget_ms']:.3f} ms ({r['kind']})"] = None
            continue
        gains.setdefault(r["family"], {})[f"{r['backend']} {r['budget_ms']:.3f} ms ({r['kind']})"] = \
            round(r["gain_points"], 3)
    between = [r.get("gain_points", float("-inf")) for r in rows if r["kind"] == "between"]
    # per family/backend, its last fit with measurements (a refused budget has none)
    last_measured = [next((r for r in reversed(pair["rows"]) if r.get("measurement")), None)
                     for fam in results.values() for pair in fam.values()]
    return {"quick": quick, "cpu": cpu_name(), "threads": threads, "settings": settings,
            "violations": sum(r["violation"] for r in rows), "budgets": len(rows),
            "predictor_within_10pct": sum(within) / len(within) if within else None, "predictor_heldout_n": len(held),
            "predictor_within_10pct_raw": sum(raw) / len(raw) if raw else None,
            "measurement_session_within_10pct": _pooled_repeatability(
                [r for r in last_measured if r is not None]),
            "ap_gain_vs_uniform": gains,
            "min_gain_between_points": min(between) if between else None,
            "goals": GOALS,
            "goals_met": {"violations": sum(r["violation"] for r in rows) == 0,
                          "ap_gain": bool(between) and min(between) >= GOALS["ap_gain_points"],
                          "predictor": bool(within) and sum(within) / len(within) >= GOALS["predictor_within_10pct"]},
            "pairs": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shipped 128 px yolo_tiny, OpenVINO, one budget")
    ap.add_argument("--families", nargs="+", choices=["yolo_tiny", "ssdlite", "picodet"])
    ap.add_argument("--backends", nargs="+", choices=["openvino", "onnxruntime"])
    ap.add_argument("--fractions", type=float, nargs="*", help="budgets int8 + f (fp32 - int8) (0.25 0.5 0.75)")
    ap.add_argument("--sensitivity", type=Path, help="a sensitivity.json of an earlier run of this family (reused)")
    ap.add_argument("--below", type=float, nargs="*",
                    help="budgets g * the faster of int8 and fp32 (default 0.7; quick: none)")
    ap.add_argument("--max-measurements", dest="max_measurements", type=int,
                    help="device measurements per fit (default 20; quick: 8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--zoo", type=Path, default=ROOT / "runs" / "bench_zoo")
    ap.add_argument("--out", type=Path, help="default runs/bench_fit/<UTC time>")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="bench_fit_"))
    args.out = args.out or ROOT / "runs" / "bench_fit" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if args.fractions is None:
        args.fractions = [0.75] if args.quick else [0.25, 0.5, 0.75]
    args.below = args.below if args.below is not None else ([] if args.quick else [0.7])
    families = args.families or (["yolo_tiny"] if args.quick else ["yolo_tiny", "ssdlite"])
    backends = args.backends or (["openvino"] if args.quick else ["openvino", "onnxruntime"])
    settings = dict(QUICK if args.quick else FULL)
    if args.max_measurements:
        settings.update(max_measurements=args.max_measurements,
                        initial_samples=min(settings["initial_samples"], args.max_measurements - 3))
    try:
        ckpts, data = quick_checkpoints(tmp) if args.quick else full_checkpoints(args.zoo, families)
        devices, store = devices_file(tmp, args.threads), args.out / "profiles"
        results: dict[str, Any] = {}
        for fam in families:
            sens = args.sensitivity     # the sensitivity is the model's, not the backend's: one per family
            for be in backends:
                work = tmp / fam / be
                work.mkdir(parents=True)
                pair = run_pair(fam, Path(ckpts[fam]), data, be, args, settings, work, devices, store, sens)
                results.setdefault(fam, {})[be] = pair
                sens = Path(pair["sensitivity"]) if pair["sensitivity"] else sens
                shutil.rmtree(work, ignore_errors=True)
        res = summary(results, args.quick, args.threads, settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    label = " (QUICK: accuracy figures not meaningful)" if args.quick else ""
    print(f"\nviolations {res['violations']} of {res['budgets']} budgets; latency model within +-10% on "
          f"{res['predictor_within_10pct']} of {res['predictor_heldout_n']} held-out candidates "
          f"({res['predictor_within_10pct_raw']} against the latencies before the division by their batch's "
          "reference drift); "
          f"AP gain vs uniform (points): {json.dumps(res['ap_gain_vs_uniform'])}{label}")
    print("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
