"""The main job on the embedded default: generate demo data, train, evaluate, print a table.

Runs on the ``local`` device with the synthetic COCO-format set. Re-running it
reuses the generated data and writes each training run into a fresh directory
(earlier runs are never overwritten).
"""

from __future__ import annotations

from pathlib import Path


def run_demo(out: Path, models: list[str], epochs: int, n_train: int, n_val: int, size: int = 320,
             progress: bool = True) -> int:
    from rich.console import Console
    from rich.table import Table

    from edge_compress.models import zoo_entry
    from edge_compress.pipeline import ensure_synthetic, fresh_dir, train_and_score
    from edge_compress.train import TrainConfig

    for m in models:
        zoo_entry(m)  # fail on a bad name before generating anything
    data = ensure_synthetic(Path(out) / "data", n_train, n_val, size, seed=0)
    cfg = TrainConfig(epochs=epochs, batch_size=16)
    rows = [train_and_score(m, data, cfg, fresh_dir(Path(out) / "runs" / m), size, progress) for m in models]
    t = Table("model", "family", "params (M)", "GFLOPs", "AP", "AP50", "AP75", "train (s)",
              title=f"demo: {n_train} train / {n_val} val synthetic images, {size} px, {epochs} epochs, local CPU")
    for r in rows:
        m = r.metrics
        t.add_row(r.model, r.family, f"{r.params_m:.2f}", f"{r.gflops:.2f}",
                  *(f"{m.get(k, 0.0):.3f}" for k in ("ap", "ap50", "ap75")), f"{r.train_s:.0f}")
    Console().print(t)
    return 0
