"""Calibration, computed once on the fp32 ONNX graph and shared by every backend.

Every float activation of the graph (the input and each node's outputs) is
exposed as an extra output of an ONNX Runtime session; the calibration images
run twice (pass 1: min/max, pass 2: a histogram on that fixed range), so memory
stays flat however many images are used. The result is a ``CalibrationTable``:
tensor name -> ``(lo, hi)``, stored in each int8 artifact, from which every
backend's quantization parameters are derived.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from edge_compress.errors import DataError
from edge_compress.quant.calibrators import TensorStats, compute_range
from edge_compress.quant.config import QuantConfig


@dataclass(frozen=True)
class CalibrationTable:
    """Per-tensor activation ranges. ``observed`` keeps the raw min/max next to the
    calibrator's (possibly clipped) ``ranges``; ``notes`` (JSON-able) says where ranges came
    from when not from ``calibrate`` alone (QAT: ``edge_compress.compress.qat.qat_calibration``)."""

    calibrator: str
    num_images: int
    ranges: dict[str, tuple[float, float]]
    observed: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {"calibrator": self.calibrator, "num_images": self.num_images,
             "ranges": {k: [float(a), float(b)] for k, (a, b) in self.ranges.items()},
             "observed": {k: [float(a), float(b)] for k, (a, b) in self.observed.items()}}
        return {**d, "notes": self.notes} if self.notes else d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CalibrationTable":
        return cls(d["calibrator"], int(d["num_images"]), {k: (float(a), float(b)) for k, (a, b) in d["ranges"].items()},
                   {k: (float(a), float(b)) for k, (a, b) in d.get("observed", {}).items()}, dict(d.get("notes", {})))


def calibration_images(dataset, num_images: int, seed: int = 0) -> list[np.ndarray]:
    """``num_images`` letterboxed uint8 ``(3, H, W)`` images drawn without replacement (seeded)."""
    n = len(dataset)
    if n == 0:
        raise DataError(f"the calibration set {getattr(dataset, 'root', '')} has no images; int8 calibration "
                        "needs at least one image of the data the model will see (pass --data)")
    order = np.random.default_rng(seed).permutation(n)[: min(num_images, n)]
    return [np.asarray(dataset[int(i)][0]) for i in order]


def float_tensors(model) -> list[str]:
    """Names of the graph input and every float node output, in graph order."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    names = [i.name for i in model.graph.input]
    for node in model.graph.node:
        names += [o for o in node.output if o and types.get(o) == onnx.TensorProto.FLOAT]
    return list(dict.fromkeys(names))


def tensor_runner(onnx_path: Path) -> tuple[list[str], Callable[[np.ndarray], Iterable[tuple[str, np.ndarray]]]]:
    """(names of every float tensor, ``x -> (name, value)`` for each of them) through ORT, with
    graph optimizations off so that every tensor of the graph is kept."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    names = float_tensors(model)
    graph_outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in graph_outputs and name != model.graph.input[0].name:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]

    def run(x: np.ndarray) -> Iterable[tuple[str, np.ndarray]]:
        yield in_name, x
        yield from zip(out_names, sess.run(out_names, {in_name: x}))

    return names, run


def collect_stats(onnx_path: Path, inputs: Sequence[np.ndarray], bins: int) -> dict[str, TensorStats]:
    """Two passes over ``inputs`` (float32 ``(1, C, H, W)`` each) through ORT."""
    names, run = tensor_runner(onnx_path)
    stats = {n: TensorStats() for n in names}
    for x in inputs:
        for name, v in run(x):
            stats[name].observe_range(v)
    for x in inputs:
        for name, v in run(x):
            stats[name].observe_hist(v, bins)
    return stats


def calibrate(onnx_path: Path, inputs: Sequence[np.ndarray], config: QuantConfig) -> CalibrationTable:
    """The calibration table of the fp32 ONNX model at ``onnx_path`` over ``inputs``."""
    if len(inputs) == 0:
        raise DataError("int8 calibration got no images; pass a dataset with at least one image")
    stats = collect_stats(Path(onnx_path), inputs, config.bins)
    ranges = {n: compute_range(s, config.calibrator, config.bins, config.percentile) for n, s in stats.items()}
    observed = {n: (s.lo, s.hi) for n, s in stats.items()}
    return CalibrationTable(config.calibrator, len(inputs), ranges, observed)
