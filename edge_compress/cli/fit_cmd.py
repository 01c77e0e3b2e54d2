"""``edge-compress fit``: meet a latency / energy / size budget measured on the device.

Argument parsing and printing only: the work is ``edge_compress.fit.fit``.
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_parsers(verbs) -> None:
    from edge_compress.fit.config import PERCENTILES
    from edge_compress.fit.executor import EXECUTORS

    p = verbs.add_parser("fit", help="choose per-layer pruning ratios and precisions that meet a budget measured "
                                     "on the device, fine-tune with distillation, export and verify")
    p.add_argument("--model", required=True, type=Path, help="a checkpoint (.pt) of `edge-compress train`")
    p.add_argument("--data", required=True, type=Path, help="dataset directory: train split fine-tunes and "
                                                            "calibrates, val split scores")
    p.add_argument("--device", default="local", help="a device of --devices (default local: this machine)")
    p.add_argument("--devices", default="devices.yaml", help="the device registry (default ./devices.yaml)")
    p.add_argument("--backend", default="openvino", help="runtime on the device (default openvino)")
    p.add_argument("--budget-ms", dest="budget_ms", type=float, help="latency budget in ms at --percentile")
    p.add_argument("--percentile", default="p50", choices=PERCENTILES, help="latency percentile (default p50)")
    p.add_argument("--budget-mj", dest="budget_mj", type=float, help="energy per inference budget in mJ")
    p.add_argument("--budget-bytes", dest="budget_bytes", type=int, help="artifact size budget in bytes")
    p.add_argument("--out", required=True, type=Path, help="run folder: created, or resumed when it holds this "
                                                           "fit's state.json")
    p.add_argument("--store", type=Path, default=Path("profiles"), help="profile store (default ./profiles)")
    p.add_argument("--threads", type=int, help="runtime threads (default: the device's)")
    p.add_argument("--ratios", type=float, nargs="+", help="pruning ratios per knob (default 0 0.25 0.5 0.75)")
    p.add_argument("--max-measurements", dest="max_measurements", type=int, help="device measurements (default 48)")
    p.add_argument("--initial-samples", dest="initial_samples", type=int, help="before the first model (default 10)")
    p.add_argument("--sensitivity-images", dest="sensitivity_images", type=int, help="val images (default 100)")
    p.add_argument("--check-candidates", dest="check_candidates", type=int, help="short fine-tunes (default 2)")
    p.add_argument("--check-epochs", dest="check_epochs", type=int, help="epochs of each check (default 1)")
    p.add_argument("--finetune-epochs", dest="finetune_epochs", type=int, help="final fine-tune (default 4)")
    p.add_argument("--verify-rounds", dest="verify_rounds", type=int, help="tighten-and-repeat rounds (default 3)")
    p.add_argument("--profile-seconds", dest="profile_seconds", type=float, help="timing cap per candidate (10)")
    p.add_argument("--precision", choices=["per-layer", "int8", "fp32"],
                   help="per-layer: fp32 or int8 per conv (default); int8: every conv int8, search the pruning "
                        "only (fast below the int8 latency); fp32: no int8")
    p.add_argument("--measure-sessions", dest="measure_sessions", type=int,
                   help="sessions per measurement, each in a fresh process; their median counts (default 3)")
    p.add_argument("--sensitivity", type=Path, help="sensitivity.json of an earlier fit of this model (reused)")
    p.add_argument("--seed", type=int)
    p.add_argument("--executor", default="process", choices=EXECUTORS, help="where builds and fine-tunes run "
                                                                          "(default: a local process pool)")
    p.add_argument("--workers", type=int, help="process pool size / Ray CPUs (default 2)")
    p.add_argument("--ray-address", dest="ray_address", help="a Ray cluster (default: start one on this machine)")
    p.set_defaults(func=cmd_fit)


CONFIG_ARGS = ("budget_ms", "percentile", "budget_mj", "budget_bytes", "threads", "ratios", "max_measurements",
               "initial_samples", "sensitivity_images", "check_candidates", "check_epochs", "finetune_epochs",
               "verify_rounds", "profile_seconds", "measure_sessions", "precision", "seed")


def cmd_fit(args) -> int:
    from edge_compress.fit import FitConfig, fit

    config = FitConfig(**{k: getattr(args, k) for k in CONFIG_ARGS if getattr(args, k) is not None})
    res = fit(args.model, args.data, config, args.out, device=args.device, backend=args.backend,
              devices_path=args.devices, store=args.store, executor=args.executor, workers=args.workers,
              ray_address=args.ray_address, sensitivity=args.sensitivity, log=lambda s: print(s, flush=True))
    r = res.result["result"]
    print(f"\nartifact  {res.artifact}\nreport    {res.report}\n"
          f"latency   {r['latency_ms']:.3f} ms ({config.percentile}) on '{args.device}', budget "
          f"{config.budget_ms if config.budget_ms else '-'}\nmAP       {r['ap']:.4f} (AP50 {r['ap50']:.4f}) "
          "through the runtime", file=sys.stdout)
    return 0
