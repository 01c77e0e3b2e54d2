"""Library verbs that tie models, data, training and evaluation together.

The CLI only parses arguments and calls these.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edge_compress.data.layout import resolve_split
from edge_compress.errors import DataError
from edge_compress.eval.coco_eval import EvalResult
from edge_compress.io import write_json_atomic
from edge_compress.models import create_detector, summarize
from edge_compress.train import TrainConfig, TrainResult, load_detector, train


def open_split(data: str | Path, split: str, input_size: tuple[int, int], augment: bool = False,
               seed: int = 0):
    """A ``CocoDataset`` for one split of ``data`` (see :mod:`edge_compress.data.layout`)."""
    from edge_compress.data.coco import CocoDataset
    from edge_compress.data.transforms import AugmentConfig

    paths = resolve_split(data, split)
    return CocoDataset(paths.annotations, paths.images, input_size=input_size,
                       augment=AugmentConfig() if augment else None, seed=seed, cache_images=True)


def ensure_synthetic(data: Path, n_train: int, n_val: int, size: int = 320, seed: int = 0) -> Path:
    """The synthetic set at ``data``: generated once, then reused when its parameters match.

    A directory holding something else is never overwritten."""
    from edge_compress.data.synth import generate_synthetic

    params = {"num_train": n_train, "num_val": n_val, "image_size": size, "seed": seed}
    stamp = data / "synth_params.json"
    if data.exists():
        if stamp.is_file() and json.loads(stamp.read_text()) == params:
            print(f"reusing synthetic data in {data}")
            return data
        raise DataError(f"{data} exists but was not generated with {params}; remove it or choose another path")
    generate_synthetic(data, num_train=n_train, num_val=n_val, image_size=size, seed=seed)
    write_json_atomic(stamp, params)
    print(f"generated {n_train} train + {n_val} val synthetic images in {data}")
    return data


def fresh_dir(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, ... whichever does not exist yet (runs are never overwritten)."""
    if not base.exists():
        return base
    i = 2
    while base.with_name(f"{base.name}-{i}").exists():
        i += 1
    return base.with_name(f"{base.name}-{i}")


def train_detector(model_name: str, data: str | Path, cfg: TrainConfig, out_dir: str | Path,
                   input_size: int = 320, model_options: dict[str, Any] | None = None,
                   resume: bool = False, progress: bool = True, device: str = "cpu") -> tuple[Any, TrainResult]:
    """Build ``model_name`` for the classes of ``data`` and train it; returns (model, result)."""
    size = (input_size, input_size)
    train_ds = open_split(data, "train", size, augment=True, seed=cfg.seed)
    val_ds = open_split(data, "val", size)
    torch.manual_seed(cfg.seed)  # model initialisation
    model = create_detector(model_name, class_names=train_ds.class_names, input_size=input_size,
                            **(model_options or {}))
    result = train(model, train_ds, cfg, out_dir, val_data=val_ds, resume=resume, progress=progress, device=device)
    return model, result


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, split: str = "val") -> EvalResult:
    """COCO mAP of a trained checkpoint (EMA weights) on one split of ``data``."""
    from edge_compress.eval.runner import evaluate_model

    model = load_detector(checkpoint)
    spec = model.input_spec
    ds = open_split(data, split, (spec.height, spec.width))
    if tuple(ds.class_names) != tuple(model.class_names):
        raise DataError(f"{checkpoint} was trained on classes {list(model.class_names)} but "
                        f"the '{split}' split of {data} has {list(ds.class_names)}; evaluate on the matching dataset")
    return evaluate_model(model, ds)


@dataclass(frozen=True)
class ZooRow:
    model: str
    family: str
    params_m: float
    gflops: float
    train_s: float
    metrics: dict[str, float]


def train_and_score(model_name: str, data: str | Path, cfg: TrainConfig, out_dir: str | Path,
                    input_size: int = 320, progress: bool = True, device: str = "cpu") -> ZooRow:
    """Train one zoo model, evaluate it, and return a table row (params, GFLOPs, AP,
    training wall time without evaluation)."""
    model, result = train_detector(model_name, data, cfg, out_dir, input_size=input_size, progress=progress,
                                   device=device)
    s = summarize(model.cpu())
    return ZooRow(model_name, model.family, round(s.params_m, 3), round(s.gflops, 3),
                  round(result.train_s, 1), result.metrics or {})
