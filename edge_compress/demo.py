"""The main job on the embedded default: generate demo data, train, evaluate, export, fit, print tables.

Runs on the ``local`` device with the synthetic COCO-format set. Each trained
model is exported for ONNX Runtime and OpenVINO at fp32 and int8 (one shared
calibration); each artifact validates itself, and its mAP through the runtime
and the int8/fp32 latency on this machine are printed. Then a short ``fit``
brings the first model under a latency budget below its int8 latency on this
machine (OpenVINO) and writes its HTML report. Re-running it reuses the
generated data and writes each run and artifact into a fresh directory (earlier
ones are never overwritten).
"""

from __future__ import annotations

from pathlib import Path


def run_demo(out: Path, models: list[str], epochs: int, n_train: int, n_val: int, size: int = 320,
             progress: bool = True, backends: list[str] | None = None, fit_backend: str | None = "openvino") -> int:
    from rich.console import Console
    from rich.table import Table

    from edge_compress.models import zoo_entry
    from edge_compress.pipeline import ensure_synthetic, fresh_dir, train_and_score
    from edge_compress.train import TrainConfig

    for m in models:
        zoo_entry(m)  # fail on a bad name before generating anything
    data = ensure_synthetic(Path(out) / "data", n_train, n_val, size, seed=0)
    cfg = TrainConfig(epochs=epochs, batch_size=16)
    run_dirs = {m: fresh_dir(Path(out) / "runs" / m) for m in models}
    rows = [train_and_score(m, data, cfg, run_dirs[m], size, progress) for m in models]
    t = Table("model", "family", "params (M)", "GFLOPs", "AP", "AP50", "AP75", "train (s)",
              title=f"demo: {n_train} train / {n_val} val synthetic images, {size} px, {epochs} epochs, local CPU")
    for r in rows:
        m = r.metrics
        t.add_row(r.model, r.family, f"{r.params_m:.2f}", f"{r.gflops:.2f}",
                  *(f"{m.get(k, 0.0):.3f}" for k in ("ap", "ap50", "ap75")), f"{r.train_s:.0f}")
    Console().print(t)
    if backends:
        table, int8_artifacts = _export_table(out, data, run_dirs, backends)
        Console().print(table)
        print("int8 x: fp32 p50 / int8 p50 of the same backend; '!' marks an int8 slower than fp32 here (recorded "
              "in the artifact's manifest)")
        if fit_backend in backends:
            _short_fit(out, data, models[0], run_dirs[models[0]], fit_backend,
                       int8_artifacts[(models[0], fit_backend)])
    return 0


# The demo's fit: small on purpose (a few minutes); `edge-compress fit` defaults search far more.
# Below the int8 latency an fp32 layer only costs time: every conv int8, the search prunes.
DEMO_FIT = dict(precision="int8", ratios=(0.0, 0.5), sensitivity_images=12, initial_samples=4, max_measurements=12,
                search_rounds=2, batch=4, check_candidates=0, check_epochs=0, finetune_epochs=1, calib_images=32,
                verify_rounds=3, profile_seconds=2.0, measure_sessions=2, threads=1)
DEMO_BUDGET = 0.9    # of the int8 p50: the fit must prune (the floor, every knob at 0.5, measured 0.78)


def _short_fit(out: Path, data: Path, model: str, run: Path, backend: str, int8_artifact: Path) -> None:
    """A short ``fit`` of the first model to DEMO_BUDGET x its int8 latency here; prints where its report is."""
    from rich.console import Console
    from rich.table import Table

    from edge_compress.fit import FitConfig, FitError, fit
    from edge_compress.pipeline import fresh_dir

    int8_ms = _clean_p50(int8_artifact, Path(out) / "profiles")
    budget = round(DEMO_BUDGET * int8_ms, 3)
    print(f"\nfit: {model} to {budget} ms p50 with {backend} on this machine (1 thread): {DEMO_BUDGET} x its int8 "
          f"latency ({int8_ms:.2f} ms, the median of 3 fresh-process sessions), so the search must prune as well "
          "as quantize")
    folder = fresh_dir(Path(out) / "fit" / model)
    try:
        res = fit(run / "best.pt", data, FitConfig(budget_ms=budget, **DEMO_FIT), folder, backend=backend,
                  store=Path(out) / "profiles", executor="inline", log=lambda s: print(f"  {s}"))
    except FitError as e:   # the demo's other results stand; say plainly that this budget was not met
        print(f"fit: no verified result: {e}\n(its measurements and state are in {folder}; try "
              f"`edge-compress fit --model {run / 'best.pt'} --data {data} --out NEW_DIR` with a looser --budget-ms "
              "or more --verify-rounds)")
        return
    r, lm = res.result["result"], res.result["latency_model"]
    t = Table("budget", "measured p50", "AP (runtime)", "int8 everywhere", "held-out within 10%", "report",
              title=f"demo: fit of {model} ({backend}, local, 1 thread)")
    within = lm.get("within_10pct")
    t.add_row(f"{budget:.2f} ms", f"{r['latency_ms']:.2f} ms", f"{r['ap']:.3f}", f"{int8_ms:.2f} ms",
              "-" if within is None else f"{within:.0%} of {lm['n_heldout']}", str(res.report))
    Console().print(t)


def _clean_p50(artifact: Path, store: Path) -> float:
    """The artifact's p50 as ``fit`` measures it (the median of 3 sessions, each in a fresh process): the
    export's own latency check runs in this process, which trained and exported first and times int8
    picodet_s 15-20% slow, so a budget set from it would not be the one the fit sees."""
    from edge_compress.fit.measure import MeasureJob, measure_fresh, measure_settings
    from edge_compress.profile.devices import get_device

    m = measure_fresh(MeasureJob("demo-int8", str(artifact), get_device("local").to_dict(), measure_settings(3.0, 1),
                                 str(store), keep_model=True, extra={"run": "demo"}, sessions=3))
    if "error" in m:
        raise RuntimeError(f"demo: the int8 artifact {artifact} could not be timed: {m['error']}")
    return float(m["p50"])


def _export_table(out: Path, data: Path, run_dirs: dict[str, Path], backends: list[str]):
    """Export every trained model for each backend at fp32 and int8; a table of what each artifact measured."""
    import warnings

    from rich.table import Table

    from edge_compress.export import Int8SlowerWarning, export_checkpoint
    from edge_compress.pipeline import fresh_dir
    from edge_compress.quant import QuantConfig

    t = Table("model", "backend", "prec", "KB", "p50 ms", "int8 x", "AP", "AP50", "check",
              title="demo: artifacts (validated at export; p50 at 1 thread on this machine; mAP through each runtime)")
    int8_artifacts = {}
    for m, run in run_dirs.items():
        for be in backends:
            arts = {}
            for prec, quant in (("fp32", None), ("int8", QuantConfig())):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Int8SlowerWarning)   # shown in the table instead
                    arts[prec] = export_checkpoint(run / "best.pt", be, fresh_dir(Path(out) / "artifacts" /
                                                                                  f"{m}-{be}-{prec}"), data=data,
                                                   quant=quant)
            lat = arts["int8"].manifest["metrics"]["latency_check"]
            int8_artifacts[(m, be)] = arts["int8"].path
            for prec, art in arts.items():
                met, val = art.manifest["metrics"], art.manifest["validation"]
                speed = "" if prec == "fp32" else \
                    f"{lat['int8_speedup']:.2f}" + ("!" if lat["int8_speedup"] < 1 else "")
                check = f"err {val['rel_error']:.0e}" if "rel_error" in val else f"{val['sqnr_db']:.0f} dB"
                t.add_row(m, be, prec, f"{met['model_bytes'] / 1024:.0f}", f"{lat[prec + '_p50_ms']:.2f}", speed,
                          f"{met['map']['ap']:.3f}", f"{met['map']['ap50']:.3f}", check)
    return t, int8_artifacts
