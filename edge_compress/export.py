"""``export``: a torch detector -> a validated artifact for one backend (host side).

Every export validates itself before the artifact is finalised: torch and the
backend run the same seeded input, and the relative error of the raw head
outputs ``max|a - b| / max|a|`` must stay within ``FP32_REL_TOL``; otherwise
nothing is written.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_compress.artifact import SCHEMA_VERSION, Artifact, load_artifact, sha256_file, write_artifact
from edge_compress.backends import Backend, Runner, get_backend
from edge_compress.errors import ConfigError, DataError, ExportValidationError
from edge_compress.eval.coco_eval import EvalResult

FP32_REL_TOL = 1e-3
VALIDATION_SEED = 0


def model_sha256(model: torch.nn.Module) -> str:
    """sha256 over the state_dict: each entry's name, dtype, shape and raw bytes, in key order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def validation_input(model) -> np.ndarray:
    """The fixed seeded input of every export check: uniform [0, 1) float32 ``(1, 3, H, W)``."""
    s = model.input_spec
    return np.random.default_rng(VALIDATION_SEED).random((1, s.channels, s.height, s.width), dtype=np.float32)


def relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    if reference.shape != other.shape:
        raise ExportValidationError(f"exported model outputs shape {other.shape}; torch gives {reference.shape}")
    return float(np.max(np.abs(reference - other)) / max(float(np.max(np.abs(reference))), 1e-12))


def validate(model, runner: Runner, tol: float = FP32_REL_TOL) -> dict[str, Any]:
    """Compare torch and the runtime on the fixed input; raises when the error exceeds ``tol``."""
    x = validation_input(model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).float().numpy()
    model.train(was_training)
    err = relative_error(ref, runner(x))
    if not np.isfinite(err) or err > tol:
        raise ExportValidationError(f"exported model disagrees with torch: relative error {err:.3g} on the raw "
                                    f"head outputs exceeds {tol:g}; nothing was written")
    return {"input": f"uniform[0,1) seed={VALIDATION_SEED}", "metric": "max|torch-runtime|/max|torch|",
            "rel_error": err, "tolerance": tol, "passed": True}


def _metrics(model, model_dir: Path) -> dict[str, Any]:
    """``model_bytes`` counts every file the backend wrote (OpenVINO: model.xml + model.bin)."""
    from edge_compress.models import summarize

    s = summarize(model)
    return {"params": int(s.params), "macs": int(s.macs), "flops": int(s.flops),
            "model_bytes": sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())}


def _manifest(model, backend: Backend, model_path: Path, source_sha256: str, recipe: dict[str, Any],
              validation: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    spec = model.input_spec
    return {
        "schema_version": SCHEMA_VERSION,
        "backend": {"name": backend.name, "runtime_version": backend.runtime_version()},
        "model_file": model_path.name,
        "model": {"name": model.name, "family": model.family, "config": model.config()},
        "precision": backend.layer_precision(model_path),
        "input_spec": spec.to_dict(),
        "preprocessing": {"resize": "letterbox", "interpolation": "bilinear", "pad_value": spec.pad_value,
                          "color": spec.color, "layout": spec.layout,
                          "normalize": "(x * scale - mean) / std per channel"},
        "class_names": list(model.class_names),
        "postprocess": model.post.to_dict(),
        "source_model_sha256": source_sha256,
        "recipe": recipe,
        "validation": validation,
        "metrics": metrics,
    }


def export_model(model, backend: str, out: str | os.PathLike, *, source_sha256: str | None = None,
                 recipe: dict[str, Any] | None = None, data: str | os.PathLike | None = None,
                 split: str = "val", threads: int = 1) -> Artifact:
    """Export ``model`` for ``backend`` into the new folder ``out``, validated; optionally
    record mAP on ``data`` measured through the runtime."""
    be = get_backend(backend)
    recipe = {"steps": []} if recipe is None else recipe
    source = source_sha256 or model_sha256(model)
    dataset = _open_matching(model, data, split) if data is not None else None

    def build(tmp: Path) -> dict[str, Any]:
        model_path = be.export(model, tmp)
        runner = be.load(tmp, threads)
        validation = validate(model, runner)
        metrics = _metrics(model, tmp)
        if dataset is not None:
            metrics["map"] = _runtime_map(model, be, runner, dataset, tmp, recipe, source, validation)
        return _manifest(model, be, model_path, source, recipe, validation, metrics)

    return load_artifact(write_artifact(out, build))


def _runtime_map(model, be, runner, dataset, tmp, recipe, source, validation) -> dict[str, Any]:
    from edge_compress.eval.runner import EVAL_SCORE_THRESH, evaluate_predictor
    from edge_compress.runtime import artifact_predictor

    draft = Artifact(tmp, _manifest(model, be, tmp / be.model_file, source, recipe, validation, {}))
    r = evaluate_predictor(artifact_predictor(draft, runner, EVAL_SCORE_THRESH), dataset)
    return {"split": dataset.coco_gt_path.name, **r.to_dict()}


def _open_matching(model, data, split: str):
    from edge_compress.pipeline import open_split

    spec = model.input_spec
    ds = open_split(data, split, (spec.height, spec.width))
    if tuple(ds.class_names) != tuple(model.class_names):
        raise DataError(f"the model's classes {list(model.class_names)} differ from the '{split}' split of "
                        f"{data} ({list(ds.class_names)}); measure mAP on the dataset it was trained on")
    return ds


def export_checkpoint(checkpoint: str | os.PathLike, backend: str, out: str | os.PathLike,
                      data: str | os.PathLike | None = None, split: str = "val", threads: int = 1) -> Artifact:
    """Export a checkpoint written by ``edge-compress train`` (its EMA weights)."""
    from edge_compress.train import load_detector

    get_backend(backend)  # unknown or missing backend: fail before loading anything
    model = load_detector(checkpoint)
    return export_model(model, backend, out, source_sha256=sha256_file(Path(checkpoint)), data=data,
                        split=split, threads=threads)


def evaluate_artifact(path: str | os.PathLike, data: str | os.PathLike, split: str = "val",
                      threads: int = 1) -> EvalResult:
    """COCO mAP of an artifact through its own runtime (the predictor runs no torch)."""
    from edge_compress.eval.runner import EVAL_SCORE_THRESH, evaluate_predictor
    from edge_compress.pipeline import open_split
    from edge_compress.runtime import artifact_predictor, open_runner

    if threads < 1:
        raise ConfigError(f"threads={threads} must be >= 1")
    art = load_artifact(path)
    spec = art.input_spec
    ds = open_split(data, split, (spec["height"], spec["width"]))
    if tuple(ds.class_names) != art.class_names:
        raise DataError(f"artifact '{path}' has classes {list(art.class_names)} but the '{split}' split of "
                        f"{data} has {list(ds.class_names)}; evaluate on the matching dataset")
    return evaluate_predictor(artifact_predictor(art, open_runner(art, threads), EVAL_SCORE_THRESH), ds)
