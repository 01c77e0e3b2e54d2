"""``export``: a detector -> a validated artifact for one backend, at fp32 or int8 (host side).

The flow is the same for every backend: write the fp32 ONNX graph; for int8,
calibrate it once on images of the dataset and materialise the QDQ graph in the
format the backend takes; hand that to the backend; load what it wrote with its
own runtime and check it before the artifact is finalised:

- fp32: the relative error of the raw head outputs ``max|a - b| / max|a|``
  against the reference must stay within ``FP32_REL_TOL``, else nothing is written;
- int8: the SQNR (dB) of the raw head outputs against the fp32 reference on
  validation images must reach ``min_sqnr_db`` (else nothing is written, and
  the error says what to try); the int8/fp32 latency ratio of the backend is
  measured on this machine and a slower int8 is reported loudly and recorded.

The reference is torch for zoo detectors and ONNX Runtime on the user's file for
external ONNX detectors (``edge_compress.external``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_compress.artifact import SCHEMA_VERSION, Artifact, load_artifact, sha256_file, write_artifact
from edge_compress.backends import Backend, ExportSource, Runner, get_backend
from edge_compress.errors import BackendUnavailableError, ConfigError, DataError, ExportValidationError
from edge_compress.eval.coco_eval import EvalResult

FP32_REL_TOL = 1e-3
INT8_MIN_SQNR_DB = 20.0
VALIDATION_SEED = 0
VALIDATION_IMAGES = 8
CALIBRATION_FILE = "calibration.json"


class Int8SlowerWarning(UserWarning):
    """An int8 artifact ran slower than the same backend's fp32 model on this machine."""


def model_sha256(model) -> str:
    """sha256 over the state_dict: each entry's name, dtype, shape and raw bytes, in key order."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def validation_input(model) -> np.ndarray:
    """The fixed seeded input of every fp32 export check: uniform [0, 1) float32 ``(1, 3, H, W)``."""
    s = model.input_spec
    return np.random.default_rng(VALIDATION_SEED).random((1, s.channels, s.height, s.width), dtype=np.float32)


def relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    if reference.shape != other.shape:
        raise ExportValidationError(f"exported model outputs shape {other.shape}; the reference gives {reference.shape}")
    return float(np.max(np.abs(reference - other)) / max(float(np.max(np.abs(reference))), 1e-12))


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - other)^2)`` in dB."""
    if reference.shape != other.shape:
        raise ExportValidationError(f"exported model outputs shape {other.shape}; the reference gives {reference.shape}")
    ref, noise = np.asarray(reference, np.float64), np.asarray(reference, np.float64) - other
    n = float(np.sum(noise ** 2))
    return float("inf") if n == 0 else float(10 * np.log10(float(np.sum(ref ** 2)) / n))


def torch_reference(model):
    """``x -> raw fp32 head outputs`` of a torch detector (eval mode, no grad)."""
    import torch

    def ref(x: np.ndarray) -> np.ndarray:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).float().numpy()
        finally:
            model.train(was_training)

    return ref


def validate(model, runner: Runner, tol: float = FP32_REL_TOL, reference=None) -> dict[str, Any]:
    """fp32 check: the reference and the runtime on the fixed input; raises above ``tol``."""
    x = validation_input(model)
    ref = (reference or torch_reference(model))(x)
    err = relative_error(ref, runner(x))
    if not np.isfinite(err) or err > tol:
        raise ExportValidationError(f"exported model disagrees with its reference: relative error {err:.3g} on "
                                    f"the raw head outputs exceeds {tol:g}; nothing was written")
    return {"input": f"uniform[0,1) seed={VALIDATION_SEED}", "metric": "max|reference-runtime|/max|reference|",
            "rel_error": err, "tolerance": tol, "passed": True}


def validate_int8(reference, runner: Runner, images: Sequence[np.ndarray], min_sqnr_db: float,
                  what: str) -> dict[str, Any]:
    """int8 check: SQNR of the raw head outputs over ``images`` (float32 ``(1, C, H, W)``)."""
    x = np.concatenate(list(images))
    ref, out = reference(x), runner(x)
    sq = sqnr_db(ref, out)
    if not np.isfinite(out).all() or sq < min_sqnr_db:
        raise ExportValidationError(
            f"the int8 model's head outputs reach only {sq:.1f} dB SQNR against fp32 on {len(images)} {what} "
            f"(minimum {min_sqnr_db:g} dB); nothing was written. Try another calibrator (--calibrator "
            "percentile|entropy|mse), more calibration images (--calib-images), keep sensitive layers in fp32 "
            "(--keep-fp32 LAYER; names from `edge-compress zoo summary NAME --layers`), or lower --min-sqnr if "
            "this is acceptable")
    return {"input": f"{len(images)} {what}", "metric": "SQNR dB of raw head outputs, int8 runtime vs fp32 reference",
            "sqnr_db": sq, "min_sqnr_db": min_sqnr_db, "passed": True}


def timed_pair(fp32: Runner, int8: Runner, x: np.ndarray, warmup: int, blocks: int,
               per_block: int) -> tuple[list[float], list[float]]:
    """Per-run times (ms) of two runners after a warm-up, in alternating blocks so machine drift
    hits both alike."""
    for _ in range(warmup):
        fp32(x), int8(x)
    a: list[float] = []
    b: list[float] = []
    for _ in range(blocks):
        for runner, out in ((fp32, a), (int8, b)):
            for _ in range(per_block):
                t = time.perf_counter()
                runner(x)
                out.append((time.perf_counter() - t) * 1e3)
    return a, b


def compare_latency(fp32: Runner, int8: Runner, x: np.ndarray, threads: int, warmup: int = 3,
                    repeats: int = 15) -> dict[str, Any]:
    """int8 vs fp32 of one backend on this machine: p50 of each over 3 alternating blocks."""
    a, b = timed_pair(fp32, int8, x, warmup, 3, repeats // 3 or 1)
    f, i = statistics.median(a), statistics.median(b)
    return {"device": "local", "threads": threads, "warmup": warmup, "repeats": len(a), "fp32_p50_ms": f,
            "int8_p50_ms": i, "int8_speedup": f / i if i > 0 else float("inf")}


def _masks_baked(model):
    """A copy with pruning masks (``torch.nn.utils.parametrize``) baked into plain weights, so the pruned
    zeros reach the exported graph as initializer values (what sparse kernels pack); else the model."""
    from torch.nn.utils import parametrize

    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        return model
    from edge_compress.compress.sparsity import baked_copy

    return baked_copy(model)


class _Subject:
    """What the export flow needs from a detector, zoo (torch) or external (ONNX file)."""

    def __init__(self, model):
        self.is_torch = hasattr(model, "state_dict")
        self.model = _masks_baked(model) if self.is_torch else model
        self.reference = torch_reference(model) if self.is_torch else model.reference

    def write_fp32_onnx(self, path: Path) -> Path:
        if self.is_torch:
            from edge_compress.backends.onnx_export import export_onnx

            return export_onnx(self.model, path)
        return self.model.write_onnx(path)

    def module_map(self, onnx_path: Path) -> dict[str, str]:
        if not self.is_torch:
            return {}
        import onnx

        from edge_compress.quant.qdq import conv_module_map

        return conv_module_map(self.model, onnx.load(str(onnx_path)))

    def summary(self, onnx_path: Path) -> dict[str, int]:
        if self.is_torch:
            from edge_compress.models import summarize

            s = summarize(self.model)
        else:
            from edge_compress.models.onnx_summary import summarize_onnx

            s = summarize_onnx(onnx_path)
        return {"params": int(s.params), "macs": int(s.macs), "flops": int(s.flops)}


def _manifest(model, backend: Backend, model_path: Path, source_sha256: str, recipe: dict[str, Any],
              validation: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = model.input_spec
    m = {
        "schema_version": SCHEMA_VERSION,
        "backend": {"name": backend.name, "runtime_version": _runtime_version(backend)},
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
    m.update(extra or {})
    return m


def _runtime_version(backend: Backend) -> str:
    ok, _ = backend.available()
    return backend.runtime_version() if ok else "not installed on the exporting machine"


def export_model(model, backend: str, out: str | os.PathLike, *, quant=None, source_sha256: str | None = None,
                 recipe: dict[str, Any] | None = None, data: str | os.PathLike | None = None,
                 split: str = "val", calib_split: str = "train", threads: int = 1,
                 min_sqnr_db: float = INT8_MIN_SQNR_DB, lowering: dict[str, Any] | None = None,
                 calibration=None, evaluate: bool = True, latency_check: bool = True) -> Artifact:
    """Export ``model`` (a zoo detector or an ``ExternalDetector``) for ``backend`` into the new
    folder ``out``, validated. ``quant`` (a ``QuantConfig``) makes it int8, calibrated on the
    ``calib_split`` of ``data``; with ``data`` the mAP through the runtime is recorded.
    ``lowering`` (a ``LoweringConfig`` dict, kernels backend only) picks each conv's kernel;
    int8 layers in it need ``quant`` for the calibration. ``calibration`` (a ``CalibrationTable``
    computed on this model's fp32 ONNX graph, e.g. by QAT's ``qat_calibration``) replaces our
    calibrator: its ranges quantize the graph as they are. ``evaluate=False`` skips the mAP through
    the runtime and ``latency_check=False`` the int8-vs-fp32 timing (``fit`` builds many candidates
    only to time them on the device; the chosen one is exported with both)."""
    be = get_backend(backend, require_available=False)
    runnable, why = be.available()
    if not runnable and not getattr(be, "exports_without_runtime", False):
        raise BackendUnavailableError(f"backend '{backend}' is not available here: {why}")
    if quant is not None and "int8" not in be.precisions:
        raise ConfigError(f"backend '{backend}' exports {', '.join(be.precisions)}, not int8")
    if lowering is not None and be.name != "kernels":
        raise ConfigError(f"lowering= picks kernels per layer for the 'kernels' backend, not '{backend}'")
    if calibration is not None and quant is None:
        raise ConfigError("calibration= gives the activation ranges of an int8 export: pass quant=QuantConfig(...) "
                          "too (per-channel weights, kept layers)")
    if calibration is not None and not hasattr(calibration, "ranges"):
        raise ConfigError(f"calibration= must be a CalibrationTable, not {type(calibration).__name__}")
    if quant is not None and data is None:
        raise ConfigError("an int8 export needs a dataset to calibrate on: pass --data (the calibration images "
                          f"come from its '{calib_split}' split)")
    subject = _Subject(model)
    recipe = {"steps": []} if recipe is None else recipe
    source = source_sha256 or (model_sha256(model) if subject.is_torch else model.sha256)
    dataset = _open_matching(model, data, split) if data is not None and evaluate else None
    calib_set = _open_matching(model, data, calib_split) if quant is not None else None

    def build(tmp: Path) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="export_") as work:
            return _build(Path(work), tmp)

    def _build(work: Path, tmp: Path) -> dict[str, Any]:
        fp32_onnx = subject.write_fp32_onnx(work / "fp32.onnx")
        extra: dict[str, Any] = {}
        if quant is None:
            src = ExportSource(onnx=fp32_onnx, fp32_onnx=fp32_onnx, model=subject.model if subject.is_torch else None)
        else:
            src, extra = _int8_source(subject, be, quant, fp32_onnx, calib_set, work, tmp, calibration)
        if lowering is not None:
            choice = lowering.to_dict() if hasattr(lowering, "to_dict") else dict(lowering)
            src = dataclasses.replace(src, lowering=choice)
        model_path = be.export(src, tmp)
        if hasattr(be, "manifest_extra"):
            extra.update(be.manifest_extra(src, tmp))
        if not runnable:
            return _unrunnable_manifest(model, be, model_path, src, source, recipe, extra, subject, why, dataset)
        runner = be.load(tmp, threads)
        metrics = {**subject.summary(fp32_onnx), "model_bytes": _bytes(tmp)}
        if quant is None:
            validation = validate(model, runner, reference=subject.reference)
        else:
            val_images = _validation_images(model, dataset or calib_set)
            validation = validate_int8(subject.reference, runner, val_images, min_sqnr_db,
                                       f"'{(dataset or calib_set).coco_gt_path.name}' images")
            if latency_check or dataset is not None:
                fp32_runner = _fp32_runner(be, ExportSource(onnx=fp32_onnx, fp32_onnx=fp32_onnx,
                                                            model=src.model), work, threads)
            if latency_check:
                metrics["latency_check"] = compare_latency(fp32_runner, runner, val_images[0], threads)
                extra["warnings"] = _slower_warning(be.name, metrics["latency_check"])
            if dataset is not None:
                metrics["map_fp32"] = _runtime_map(model, be, fp32_runner, dataset, tmp, recipe, source, validation)
        if dataset is not None:
            metrics["map"] = _runtime_map(model, be, runner, dataset, tmp, recipe, source, validation)
            if "map_fp32" in metrics:
                metrics["map_delta_points"] = 100 * (metrics["map_fp32"]["ap"] - metrics["map"]["ap"])
        return _manifest(model, be, model_path, source, recipe, validation, metrics, extra)

    return load_artifact(write_artifact(out, build))


def _int8_source(subject, be, quant, fp32_onnx: Path, calib_set, work: Path, tmp: Path, given=None):
    from edge_compress.backends.onnx_export import conv_node_names
    from edge_compress.data.transforms import normalize
    from edge_compress.quant import calibrate, calibration_images
    from edge_compress.quant.qdq import quantize_onnx, resolve_layers

    spec = subject.model.input_spec
    inputs = tuple(normalize(img[None], spec) for img in calibration_images(calib_set, quant.num_images, quant.seed))
    table = calibrate(fp32_onnx, inputs, quant) if given is None else given
    keep = resolve_layers(quant.keep_fp32, conv_node_names(fp32_onnx), subject.module_map(fp32_onnx))
    symmetric = be.qdq_activations == "symmetric"
    qdq = quantize_onnx(fp32_onnx, table, work / "int8.onnx", keep_fp32=keep, per_channel=quant.per_channel,
                        symmetric_activations=symmetric, quantize_outputs=quant.quantize_outputs)
    (tmp / CALIBRATION_FILE).write_text(json.dumps(table.to_dict(), indent=1) + "\n")
    src = ExportSource(onnx=qdq.path, fp32_onnx=fp32_onnx, precision="int8",
                       model=subject.model if subject.is_torch else None, calibration=dict(table.ranges),
                       calibration_inputs=inputs, keep_fp32=tuple(keep))
    extra = {"quantization": {
        "config": quant.to_dict(), "calibration_file": CALIBRATION_FILE,
        "calibration_split": calib_set.coco_gt_path.name, "calibration_images": len(inputs),
        "calibration_source": "ptq" if given is None else given.notes.get("source", "given"),
        "weights": "int8 symmetric " + ("per output channel" if quant.per_channel else "per tensor"),
        "activations": "int8 symmetric per tensor (zero point 0)" if symmetric else "uint8 asymmetric per tensor",
        "kept_fp32": list(qdq.kept_fp32), "quantized_layers": len(qdq.quantized)}}
    return src, extra


def _fp32_runner(be, src: ExportSource, work: Path, threads: int) -> Runner:
    d = work / "fp32_artifact"
    d.mkdir()
    be.export(src, d)
    return be.load(d, threads)


def _slower_warning(backend: str, lat: dict[str, Any]) -> list[str]:
    if lat["int8_speedup"] >= 1.0:
        return []
    msg = (f"int8 is SLOWER than fp32 on {backend} on this machine: {lat['int8_p50_ms']:.2f} ms vs "
           f"{lat['fp32_p50_ms']:.2f} ms p50 at {lat['threads']} thread(s) (x{lat['int8_speedup']:.2f}); "
           "profile on the target device before shipping it")
    warnings.warn(msg, Int8SlowerWarning, stacklevel=3)
    return [msg]


def _unrunnable_manifest(model, be, model_path, src, source, recipe, extra, subject, why, dataset) -> dict[str, Any]:
    """A backend that exports here but cannot run here (TensorRT without a GPU): the deployed ONNX
    graph is checked, and with a dataset scored, with ONNX Runtime instead, and the manifest says so."""
    from edge_compress.backends.ort import OrtRunner

    runner = OrtRunner(src.onnx)
    if src.precision == "fp32":
        validation = validate(model, runner, reference=subject.reference)
    else:
        validation = validate_int8(subject.reference, runner, list(src.calibration_inputs[:VALIDATION_IMAGES]),
                                   INT8_MIN_SQNR_DB, "calibration images")
    validation["runtime"] = f"onnxruntime on the deployed ONNX graph ({be.name} cannot run here: {why})"
    metrics = {**subject.summary(src.fp32_onnx), "model_bytes": _bytes(model_path.parent)}
    if dataset is not None:
        metrics["map"] = {**_runtime_map(model, be, runner, dataset, model_path.parent, recipe, source, validation),
                          "runtime": "onnxruntime on the deployed ONNX graph"}
    return _manifest(model, be, model_path, source, recipe, validation, metrics, extra)


def _bytes(d: Path) -> int:
    """Every file the backend wrote (OpenVINO: model.xml + model.bin); the calibration table is not a model file."""
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and p.name != CALIBRATION_FILE)


def _validation_images(model, dataset) -> list[np.ndarray]:
    from edge_compress.data.transforms import normalize

    n = min(VALIDATION_IMAGES, len(dataset))
    return [normalize(np.asarray(dataset[i][0])[None], model.input_spec) for i in range(n)]


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
                        f"{data} ({list(ds.class_names)}); use the dataset it was trained on")
    return ds


def export_checkpoint(checkpoint: str | os.PathLike, backend: str, out: str | os.PathLike,
                      data: str | os.PathLike | None = None, split: str = "val", threads: int = 1,
                      quant=None, min_sqnr_db: float = INT8_MIN_SQNR_DB, lowering=None) -> Artifact:
    """Export a checkpoint written by ``edge-compress train`` (its EMA weights) or ``edge-compress compress``."""
    from edge_compress.train import load_detector

    get_backend(backend, require_available=False)  # unknown backend: fail before loading anything
    model = load_detector(checkpoint)
    return export_model(model, backend, out, source_sha256=sha256_file(Path(checkpoint)), data=data,
                        split=split, threads=threads, quant=quant, min_sqnr_db=min_sqnr_db, lowering=lowering)


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
