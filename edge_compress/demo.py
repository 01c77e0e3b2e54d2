"""The main job on the embedded default: generate demo data, train, evaluate, print a table.

Runs on the ``local`` device with the synthetic COCO-format set. Re-running it
reuses the generated data and writes each training run into a fresh directory
(earlier runs are never overwritten).
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_compress.errors import DataError


def _dataset(root: Path, n_train: int, n_val: int, size: int, seed: int) -> Path:
    from edge_compress.data.synth import generate_synthetic

    data = root / "data"
    params = {"num_train": n_train, "num_val": n_val, "image_size": size, "seed": seed}
    stamp = data / "synth_params.json"
    if data.exists():
        if stamp.is_file() and json.loads(stamp.read_text()) == params:
            print(f"reusing demo data in {data}")
            return data
        raise DataError(f"{data} exists but was not generated with {params}; remove it or pass another --out")
    generate_synthetic(data, num_train=n_train, num_val=n_val, image_size=size, seed=seed)
    stamp.write_text(json.dumps(params))
    print(f"generated {n_train} train + {n_val} val synthetic images in {data}")
    return data


def _fresh_dir(base: Path) -> Path:
    if not base.exists():
        return base
    i = 2
    while base.with_name(f"{base.name}-{i}").exists():
        i += 1
    return base.with_name(f"{base.name}-{i}")


def run_demo(out: Path, models: list[str], epochs: int, n_train: int, n_val: int, size: int = 320,
             progress: bool = True) -> int:
    from rich.console import Console
    from rich.table import Table

    from edge_compress.models import zoo_entry
    from edge_compress.pipeline import train_and_score
    from edge_compress.train import TrainConfig

    for m in models:
        zoo_entry(m)  # fail on a bad name before generating anything
    data = _dataset(Path(out), n_train, n_val, size, seed=0)
    cfg = TrainConfig(epochs=epochs, batch_size=16)
    rows = [train_and_score(m, data, cfg, _fresh_dir(Path(out) / "runs" / m), size, progress) for m in models]
    t = Table("model", "family", "params (M)", "GFLOPs", "AP", "AP50", "AP75", "APs", "APm", "APl", "train (s)",
              title=f"edge_compress demo: {n_train} train / {n_val} val synthetic images at {size} px, "
                    f"{epochs} epochs, local CPU")
    for r in rows:
        m = r.metrics
        t.add_row(r.model, r.family, f"{r.params_m:.2f}", f"{r.gflops:.2f}",
                  *(f"{m.get(k, 0.0):.3f}" for k in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")),
                  f"{r.train_s:.0f}")
    Console().print(t)
    return 0
