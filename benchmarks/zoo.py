"""Zoo benchmark: one demo configuration of each family trained on the generated set.

    python benchmarks/zoo.py            # full: 2000 train / 300 val at 320 px (~1 h on 2 cores)
    python benchmarks/zoo.py --quick    # < 2 min; accuracy figures NOT meaningful

Prints params, GFLOPs, AP, AP50, AP75 and training wall time (evaluation not
included) per family, then one line ``RESULT {json}``. The issue's goal: each
family reaches AP50 >= 0.5 within 20 minutes of training on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
import sys
from pathlib import Path

import torch

from edge_compress.pipeline import ensure_synthetic, fresh_dir, train_and_score
from edge_compress.train import TrainConfig

# One demo configuration per family, sized to train in well under the 20-minute
# CPU budget (2 threads; measured steps of batch 16: yolo_tiny ~0.46 s,
# picodet_s ~0.8 s, ssdlite_mbv3 ~0.54 s).
FULL = {
    "yolo_tiny": ("yolo_tiny", TrainConfig(epochs=10, batch_size=16, lr=4e-3)),
    "picodet": ("picodet_s", TrainConfig(epochs=6, batch_size=16, lr=4e-3)),
    "ssdlite": ("ssdlite_mbv3", TrainConfig(epochs=10, batch_size=16, lr=4e-3)),
}
BUDGET_S = 20 * 60
GOAL_AP50 = 0.5


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny data and 1 epoch: a smoke run, AP not meaningful")
    ap.add_argument("--families", nargs="+", default=list(FULL), choices=list(FULL))
    ap.add_argument("--out", type=Path, default=Path("runs/bench_zoo"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, help="override every family's epoch count")
    ap.add_argument("--device", default="cpu", help="torch device for training (the goal is stated for cpu)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_train, n_val, size = (96, 32, 320) if args.quick else (2000, 300, 320)
    data = ensure_synthetic(args.out / f"data-{n_train}-{n_val}-{size}", n_train, n_val, size)
    rows = {}
    for fam in args.families:
        model, cfg = FULL[fam]
        epochs = args.epochs or (1 if args.quick else cfg.epochs)
        cfg = replace(cfg, epochs=epochs, warmup_iters=2 if args.quick else cfg.warmup_iters)
        print(f"== {fam}: {model}, {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}", flush=True)
        r = train_and_score(model, data, cfg, fresh_dir(args.out / "runs" / model), size, progress=sys.stdout.isatty(),
                            device=args.device)
        rows[fam] = {"model": model, "params_m": r.params_m, "gflops": r.gflops, "train_s": r.train_s,
                     "epochs": cfg.epochs, **{k: round(r.metrics.get(k, 0.0), 4)
                                             for k in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")}}
    label = " (QUICK: accuracy not meaningful)" if args.quick else ""
    print(f"\nzoo benchmark{label}: {n_train} train / {n_val} val synthetic images at {size} px, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}")
    hdr = (f"{'family':<10} {'model':<14} {'params(M)':>9} {'GFLOPs':>7} {'AP':>6} {'AP50':>6} {'AP75':>6} "
           f"{'train(s)':>8}  goal (AP50>={GOAL_AP50} in {BUDGET_S // 60} min)")
    print(hdr)
    print("-" * len(hdr))
    for fam, r in rows.items():
        ok = r["ap50"] >= GOAL_AP50 and r["train_s"] <= BUDGET_S
        goal = "n/a (quick)" if args.quick else ("met" if ok else "MISSED")
        print(f"{fam:<10} {r['model']:<14} {r['params_m']:>9.3f} {r['gflops']:>7.3f} {r['ap']:>6.3f} "
              f"{r['ap50']:>6.3f} {r['ap75']:>6.3f} {r['train_s']:>8.0f}  {goal}")
    result = {"families": list(rows), "quick": args.quick, "threads": args.threads,
              "images": {"train": n_train, "val": n_val, "size": size}, **rows}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
