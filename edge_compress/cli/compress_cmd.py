"""``edge-compress compress`` (apply a recipe) and ``edge-compress sensitivity`` (per-layer mAP drops).

Argument parsing and printing only: the work is ``edge_compress.compress.recipe.compress``
and ``edge_compress.compress.sensitivity.sensitivity``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from edge_compress.errors import ArtifactError, ConfigError


def add_parsers(verbs) -> None:
    """Add ``compress`` and ``sensitivity`` to the CLI's sub-command set ``verbs``."""
    p = verbs.add_parser("compress", help="apply a compression recipe (prune, decompose, quantize, fine-tune with "
                                          "distillation) to a trained checkpoint; measures every step")
    p.add_argument("--model", required=True, help="a checkpoint (.pt) written by `edge-compress train` "
                                                  "(or by an earlier `compress`)")
    p.add_argument("--data", required=True, help="dataset directory: train split fine-tunes, val split scores")
    p.add_argument("--recipe", required=True, type=Path, help="recipe YAML (see recipes/)")
    p.add_argument("--out", required=True, type=Path, help="output directory to create (must not exist): "
                                                           "model.pt (compressed checkpoint) and report.json")
    p.add_argument("--device", default="cpu", help="torch device for fine-tuning (default cpu)")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", dest="no_progress", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = verbs.add_parser("sensitivity", help="per-layer mAP drop for each prune ratio and weight bit-width "
                                             "(no fine-tune), saved as JSON for the search")
    p.add_argument("--model", required=True, help="a checkpoint (.pt), plain or compressed")
    p.add_argument("--data", required=True, help="dataset directory (its val split is scored)")
    p.add_argument("--out", required=True, type=Path, help="JSON file to write (must not exist)")
    p.add_argument("--prune-ratios", dest="prune_ratios", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                   help="fractions of a layer's filters removed (default 0.25 0.5 0.75; none: skip pruning)")
    p.add_argument("--bits", type=int, nargs="*", default=[8, 4], help="weight bit-widths (default 8 4)")
    p.add_argument("--layers", nargs="+", default=[], help="layer names (default: every conv/linear but the "
                                                           "head outputs)")
    p.add_argument("--criterion", default="l1", help="channel ranking: l1, bn_scale, taylor, fpgm (default l1)")
    p.add_argument("--max-images", dest="max_images", type=int, help="score on the first N val images only")
    p.add_argument("--top", type=int, default=15, help="most sensitive layers to print (default 15)")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_sensitivity)


def _console():
    """A rich console; 120 columns when not on a terminal (logs, pipes) so table rows stay on one line."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def _threads(a) -> None:
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)


def cmd_compress(a) -> int:
    from edge_compress.compress.recipe import compress, load_recipe
    from edge_compress.train import load_detector

    _threads(a)
    if a.out.exists():
        raise ArtifactError(f"--out {a.out} already exists; choose a new directory (results are never overwritten)")
    recipe = load_recipe(a.recipe)          # every recipe error before the model is even loaded
    model = load_detector(a.model)
    console = _console()
    console.print(f"compressing {a.model} ({model.name}) with {a.recipe}: "
                  + " -> ".join(s.method + (" +ft" if s.finetune else "") + (" +kd" if s.distill else "")
                                for s in recipe.steps))
    result = compress(model, recipe, a.data, a.out, progress=not a.no_progress, device=a.device,
                      log=lambda msg: console.print(msg, highlight=False, soft_wrap=True))
    console.print(_table(result.rows))
    console.print(f"wrote {a.out / 'model.pt'} (load, eval or export it like any checkpoint) and "
                  f"{a.out / 'report.json'}")
    return 0


def _table(rows):
    from rich.table import Column, Table

    base = rows[0]
    t = Table(Column("step", no_wrap=True), "params (M)", "nonzero (M)", "GFLOPs", "AP", "AP50", "dAP", "dGFLOPs")
    for r in rows:
        t.add_row(r.stage, f"{r.params / 1e6:.4f}", f"{r.params_nonzero / 1e6:.4f}", f"{r.gflops:.4f}",
                  f"{r.ap:.4f}", f"{r.ap50:.4f}", f"{r.ap - base.ap:+.4f}",
                  f"{(r.gflops / base.gflops - 1) * 100:+.1f}%" if base.gflops else "n/a")
    return t


def cmd_sensitivity(a) -> int:
    from rich.table import Column, Table

    from edge_compress.compress.sensitivity import SensitivityConfig, sensitivity
    from edge_compress.train import load_detector

    _threads(a)
    if a.out.exists():
        raise ArtifactError(f"--out {a.out} already exists; choose another file (results are never overwritten)")
    if a.top < 0:
        raise ConfigError(f"--top {a.top}: give a number of layers >= 0")
    cfg = SensitivityConfig(prune_ratios=tuple(a.prune_ratios), bits=tuple(a.bits), layers=tuple(a.layers),
                            criterion=a.criterion, max_images=a.max_images)
    model = load_detector(a.model)
    console = _console()
    result = sensitivity(model, a.data, cfg, log=lambda msg: console.print(msg, highlight=False, soft_wrap=True))
    result.save(a.out)
    d = result.to_dict()
    settings = [f"prune:{r:g}" for r in cfg.prune_ratios] + [f"bits:{b}" for b in cfg.bits]
    t = Table(Column("layer", no_wrap=True), *[f"dAP {s}" for s in settings])
    worst = sorted(d["layers"].items(), key=lambda kv: -max((v.get("ap_drop", 0.0) for v in kv[1].values()),
                                                            default=0.0))
    for name, row in worst[:a.top]:
        t.add_row(name, *[f"{row[s]['ap_drop']:+.4f}" if "ap_drop" in row[s] else "n/a" for s in settings])
    console.print(t)
    console.print(f"baseline AP {d['baseline']['ap']:.4f} AP50 {d['baseline']['ap50']:.4f} on {d['num_images']} "
                  f"images; {len(d['layers'])} layers x {len(settings)} settings written to {a.out}")
    return 0
