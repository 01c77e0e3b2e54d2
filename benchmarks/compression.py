"""Compression benchmark: every method of the survey on two zoo families, fine-tuned and scored.

    python benchmarks/compression.py           # the zoo benchmark's trained 320 px models (trains missing ones)
    python benchmarks/compression.py --quick   # < 2 min: shipped 128 px models, tiny data; AP NOT meaningful

Each method is one recipe (edge_compress.compress.recipe) applied to a fresh copy
of the trained baseline, then fine-tuned for the same number of epochs with the
same schedule; ``distillation`` is the channel-pruning recipe with the same
fine-tune plus distillation from the uncompressed model, so the two rows side by
side show what distillation adds. Every row reports params (total and nonzero),
GFLOPs, AP and AP50 on the val split (pycocotools) and the weight storage by the
method's own accounting (fp32 dense, nonzeros + a 1-bit mask for unstructured
sparsity, 8/2/1/k bits per weight plus scales or codebooks for the quantizers),
with the change against the baseline.

The issue's goals: channel pruning to 50% of FLOPs + distillation within 1.5 AP
points; QAT int8 within 0.5; low-rank at 30% fewer FLOPs within 2; binary,
ternary and 4-bit k-means reported with their size reduction.

Ends with ``RESULT {json}``: ``families`` (family -> baseline row) and
``methods`` (method -> family -> ap, ap50, params_m, gflops, size_mb, delta_ap).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from backends import cpu_name, full_checkpoints, quick_checkpoints  # noqa: E402

# family -> methods run on it: yolo_tiny's CSP blocks have no identity path, so layer pruning is
# measured on picodet_s (ESNet units) and ssdlite_mbv3 (inverted residuals) instead.
ALL = ("channel_pruning", "distillation", "layer_pruning", "magnitude", "lamp", "nm_2_4", "qat_int8", "binary",
       "ternary", "kmeans", "lowrank")
FAMILIES = {"yolo_tiny": tuple(m for m in ALL if m != "layer_pruning"), "ssdlite": ALL,
            "picodet": ("layer_pruning",)}
GOALS = {"distillation": 1.5, "qat_int8": 0.5, "lowrank": 2.0}     # max AP drop in points
LOWRANK_FLOPS = 0.7          # low-rank target: 30% fewer FLOPs
KD = {"output_weight": 1.0, "box_weight": 1.0}      # temperature: DistillConfig's default (1)


def method_steps(lowrank_energy: float) -> dict[str, dict[str, Any]]:
    """method -> one recipe step (without its fine-tune); the benchmark's settings of each method."""
    return {
        "channel_pruning": {"method": "channel_pruning",
                            "config": {"criterion": "l1", "scope": "global", "target": "flops", "ratio": 0.5}},
        "distillation": {"method": "channel_pruning",
                         "config": {"criterion": "l1", "scope": "global", "target": "flops", "ratio": 0.5},
                         "distill": dict(KD)},
        "layer_pruning": {"method": "layer_pruning", "config": {"num_blocks": 2, "criterion": "l1"}},
        "magnitude": {"method": "magnitude", "config": {"sparsity": 0.5}},
        "lamp": {"method": "lamp", "config": {"sparsity": 0.7}},
        "nm_2_4": {"method": "nm_2_4", "config": {}},
        "qat_int8": {"method": "qat_int8", "config": {}},
        "binary": {"method": "binary", "config": {}},
        "ternary": {"method": "ternary", "config": {}},
        "kmeans": {"method": "kmeans", "config": {"bits": 4}},
        "lowrank": {"method": "lowrank", "config": {"energy": lowrank_energy}},
    }


def lowrank_energy_for(model, flops_fraction: float) -> float:
    """The largest SVD/Tucker energy threshold whose decomposition keeps at most ``flops_fraction`` of the
    baseline MACs (bisection on copies of the model; MACs fall as the threshold falls)."""
    from edge_compress.compress.lowrank import LowRankConfig, decompose
    from edge_compress.models.summary import summarize

    base = summarize(model).macs

    def fraction(energy: float) -> float:
        m = copy.deepcopy(model)
        decompose(m, LowRankConfig(energy=energy))
        return summarize(m).macs / base

    lo, hi = 0.05, 0.999
    if fraction(lo) > flops_fraction:
        return lo
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fraction(mid) <= flops_fraction else (lo, mid)
    return lo


def size_bytes(report: dict[str, Any], row: dict[str, Any]) -> int:
    """Weight storage by the method's accounting: quantizers report their own; unstructured sparsity
    stores the nonzeros in fp32 plus a 1-bit mask; everything else is dense fp32."""
    if "bytes_compressed" in report:
        return int(report["bytes_compressed"])
    if row["params_nonzero"] >= 0 and row["params_nonzero"] < row["params"]:
        return int(4 * row["params_nonzero"] + row["params"] / 8)
    return int(4 * row["params"])


def row_from_report(report: dict[str, Any], wall_s: float | None = None) -> dict[str, Any]:
    """A table row from a ``compress`` report (``report.json``): the last stage, the stage before its
    fine-tune, and the method's size accounting."""
    final, before = report["rows"][-1], report["rows"][-2]
    finetune = (report.get("recipe", {}).get("steps") or [{}])[-1].get("finetune") or {}
    return {"ap": round(final["ap"], 4), "ap50": round(final["ap50"], 4), "epochs": finetune.get("epochs", 0),
            "params_m": round(final["params"] / 1e6, 4), "params_nonzero_m": round(final["params_nonzero"] / 1e6, 4),
            "gflops": round(final["gflops"], 4), "size_mb": round(size_bytes(report["reports"][-1], final) / 1e6, 4),
            "ap_before_finetune": round(before["ap"], 4), "wall_s": wall_s}


def run_method(name: str, step: dict[str, Any], baseline, data: Path, out: Path, finetune: dict[str, Any],
               progress: bool) -> dict[str, Any]:
    from edge_compress.compress.recipe import Recipe, compress

    recipe = Recipe.from_dict({"name": name, "steps": [{**step, "finetune": dict(finetune)}]},
                              source=f"benchmark method '{name}'")
    t0 = time.perf_counter()
    compress(copy.deepcopy(baseline), recipe, data, out / name, progress=progress,
             log=lambda msg: print(f"    {msg}", flush=True))
    report = json.loads((out / name / "report.json").read_text())
    return row_from_report(report, round(time.perf_counter() - t0, 1))


def recount(ckpt: Path) -> tuple[float, float]:
    """(params, nonzero params) in millions of a compressed checkpoint, by ``effective_param_counts``."""
    from edge_compress.compress.sparsity import effective_param_counts
    from edge_compress.train.checkpoint import load_detector

    total, nonzero = effective_param_counts(load_detector(ckpt))
    return round(total / 1e6, 4), round(nonzero / 1e6, 4)


def collect(run_dirs: list[Path]) -> tuple[dict, dict]:
    """Rows of earlier runs (``RUN/FAMILY/METHOD/report.json``), e.g. families run in separate processes;
    the baseline of a family is the first stage of its reports; params are recounted from each
    ``model.pt`` so runs measured under an older accounting agree with today's."""
    families: dict[str, dict] = {}
    methods: dict[str, dict] = {}
    for run in run_dirs:
        for path in sorted(run.glob("*/*/report.json")):
            fam, name = path.parent.parent.name, path.parent.name
            report = json.loads(path.read_text())
            b = report["rows"][0]
            families.setdefault(fam, {"model": report["model"]["name"], "ap": round(b["ap"], 4),
                                      "ap50": round(b["ap50"], 4), "params_m": round(b["params"] / 1e6, 4),
                                      "params_nonzero_m": round(b["params_nonzero"] / 1e6, 4),
                                      "gflops": round(b["gflops"], 4), "size_mb": round(4 * b["params"] / 1e6, 4)})
            row = row_from_report(report)
            row["delta_ap"] = round(100 * (row["ap"] - families[fam]["ap"]), 2)
            if (path.parent / "model.pt").is_file():   # params as the current accounting counts them
                row["params_m"], row["params_nonzero_m"] = recount(path.parent / "model.pt")
            methods.setdefault(name, {})[fam] = row
    return families, methods


def baseline_row(model, data: Path) -> dict[str, Any]:
    from edge_compress.compress.recipe import measure, open_data

    _, val = open_data(model, data)
    r = measure(model, val, "baseline").to_dict()
    return {"model": model.name, "ap": round(r["ap"], 4), "ap50": round(r["ap50"], 4),
            "params_m": round(r["params"] / 1e6, 4), "params_nonzero_m": round(r["params_nonzero"] / 1e6, 4),
            "gflops": round(r["gflops"], 4), "size_mb": round(4 * r["params"] / 1e6, 4)}


def print_table(fam: str, base: dict[str, Any], rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n{fam} ({base['model']})")
    head = (f"{'method':<16}{'params M':>9}{'nz M':>8}{'GFLOPs':>8}{'size MB':>9}{'AP':>7}{'AP50':>7}"
            f"{'dAP':>7}{'dGFLOPs':>9}{'size x':>8}{'ep':>4}")
    print(head)
    print("-" * len(head))
    print(f"{'baseline':<16}{base['params_m']:>9.3f}{base['params_nonzero_m']:>8.3f}{base['gflops']:>8.3f}"
          f"{base['size_mb']:>9.3f}{base['ap']:>7.3f}{base['ap50']:>7.3f}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<16} FAILED: {r['error']}")
            continue
        print(f"{name:<16}{r['params_m']:>9.3f}{r['params_nonzero_m']:>8.3f}{r['gflops']:>8.3f}{r['size_mb']:>9.3f}"
              f"{r['ap']:>7.3f}{r['ap50']:>7.3f}{r['delta_ap']:>+7.2f}"
              f"{100 * (r['gflops'] / base['gflops'] - 1):>+8.0f}%{base['size_mb'] / r['size_mb']:>7.1f}x"
              f"{r.get('epochs', 0):>4}")


def report_result(quick: bool, threads: int, finetune: dict, families: dict, methods: dict) -> None:
    label = " (QUICK: accuracy figures not meaningful)" if quick else ""
    goals = {m: {fam: methods[m][fam]["delta_ap"] >= -limit for fam in methods[m]}
             for m, limit in GOALS.items() if m in methods}
    print(f"\ngoals met{label}: {goals}")
    print("RESULT " + json.dumps({"quick": quick, "cpu": cpu_name(), "threads": threads, "finetune": finetune,
                                  "families": families, "methods": methods, "goals_met": goals}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shipped 128 px models, tiny data, 1 short fine-tune")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_compression")
    ap.add_argument("--zoo", type=Path, default=ROOT / "runs" / "bench_zoo",
                    help="the zoo benchmark's folder (data + trained checkpoints; missing ones are trained)")
    ap.add_argument("--families", nargs="+", choices=list(FAMILIES),
                    help="default: all three, each with its methods (quick: yolo_tiny only, under 2 minutes)")
    ap.add_argument("--methods", nargs="+", help="default: all")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tune epochs of every method (full mode)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--collect", type=Path, nargs="+", metavar="RUN_DIR",
                    help="print the table and RESULT of earlier runs' folders instead of running anything")
    args = ap.parse_args(argv)
    if args.collect:
        families, methods = collect(args.collect)
        for fam in families:
            print_table(fam, families[fam], {m: r[fam] for m, r in methods.items() if fam in r})
        report_result(False, args.threads, {"collected": [str(p) for p in args.collect]}, families, methods)
        return 0
    torch.set_num_threads(args.threads)

    from edge_compress.train.checkpoint import load_detector

    tmp = Path(tempfile.mkdtemp(prefix="bench_compression_"))
    try:
        if args.quick:
            ckpts, data = quick_checkpoints(tmp)
            finetune = {"epochs": 1, "batch_size": 16, "lr": 5e-4, "warmup_iters": 2, "ema": False}
            out = tmp / "runs"
        else:
            ckpts, data = full_checkpoints(args.zoo, args.families or list(FAMILIES))
            finetune = {"epochs": args.epochs, "batch_size": 16, "lr": 1e-3, "warmup_iters": 50}
            out = args.out / time.strftime("%Y%m%d-%H%M%S")
        families, methods = {}, {}
        for fam in args.families or (["yolo_tiny"] if args.quick else list(FAMILIES)):
            baseline = load_detector(ckpts[fam]).eval()
            families[fam] = baseline_row(baseline, data)
            chosen = [m for m in (args.methods or FAMILIES[fam]) if m in FAMILIES[fam]]
            energy = lowrank_energy_for(baseline, LOWRANK_FLOPS) if "lowrank" in chosen else 0.9
            steps = method_steps(energy)
            rows = {}
            for name in chosen:
                print(f"== {fam}: {name}", flush=True)
                try:
                    r = run_method(name, steps[name], baseline, data, out / fam, finetune, sys.stdout.isatty())
                except Exception as e:           # a failed method is a row with its reason, not a crash
                    rows[name] = {"error": f"{type(e).__name__}: {e}"}
                    continue
                r["delta_ap"] = round(100 * (r["ap"] - families[fam]["ap"]), 2)
                rows[name] = r
                methods.setdefault(name, {})[fam] = r
            print_table(fam, families[fam], rows)
        report_result(args.quick, args.threads, finetune, families, methods)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
