"""ONNX Runtime backend on the CPU execution provider: fp32, and int8 from a QDQ graph.

The artifact's model.onnx is the graph as given: ORT itself fuses each
DequantizeLinear -> op -> QuantizeLinear group of a QDQ graph into its integer
kernels (QLinearConv and friends) when the session is created.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_compress.backends.base import ExportSource, LayerTiming
from edge_compress.errors import ArtifactError, BackendUnavailableError, ConfigError


class OnnxRuntimeBackend:
    name = "onnxruntime"
    model_file = "model.onnx"
    install_hint = "pip install 'edge-compress[onnx]' (onnx, onnxruntime, onnxscript)"
    precisions = ("fp32", "int8")
    qdq_activations = "asymmetric"

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            return False, f"onnxruntime cannot be imported ({e}); install it with: {self.install_hint}"
        return True, ""

    def runtime_version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def export(self, source: ExportSource, out_dir: Path) -> Path:
        from edge_compress.backends.onnx_export import check_onnx

        target = Path(out_dir) / self.model_file
        shutil.copyfile(source.onnx, target)
        check_onnx(target)
        return target

    def layer_precision(self, model_path: Path) -> dict[str, str]:
        from edge_compress.backends.onnx_export import compute_node_precision

        return compute_node_precision(model_path)

    def load(self, artifact_dir: Path, threads: int = 1) -> "OrtRunner":
        return OrtRunner(Path(artifact_dir) / self.model_file, threads)

    def profile_layers(self, artifact_dir: Path, x: np.ndarray, repeats: int = 20, warmup: int = 3,
                       threads: int = 1) -> list[LayerTiming]:
        if repeats < 1 or warmup < 0:
            raise ConfigError(f"profile: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
        with tempfile.TemporaryDirectory(prefix="ort_profile_") as tmp:
            runner = OrtRunner(Path(artifact_dir) / self.model_file, threads,
                               profile_prefix=str(Path(tmp) / "trace"))
            for _ in range(warmup + repeats):
                runner(x[:1])
            trace = Path(runner.session.end_profiling())
            events = json.loads(trace.read_text())
        return parse_ort_profile(events, warmup)


# Graph optimizers that would run a QDQ graph otherwise than exported (an older runtime ignores the names):
# - WeightBiasQuantization (ONNX Runtime >= 1.20) quantizes, per tensor, the float weights of a conv that sits
#   between a DequantizeLinear and a QuantizeLinear, so a layer the export kept in fp32 (keep_fp32) inside an
#   int8 graph ran as an int8 QLinearConv;
# - QDQPropagationTransformer moves a QuantizeLinear up across a MaxPool (or Reshape, Transpose) the export
#   left float, beside a float conv: the pool then runs on uint8 in NCHW, whose kernel is slow (yolo_tiny's
#   1x64x80x80 MaxPool 1.5 ms, against 0.06 ms in fp32; candidates with 2-5 fp32 convs of 19 ran 0.4-3.0 ms
#   slower, some slower than all fp32). Our QDQ graphs put Q/DQ where they belong; nothing is left to move.
DISABLED_OPTIMIZERS = ("WeightBiasQuantization", "QDQPropagationTransformer")


class OrtRunner:
    """One InferenceSession; batches larger than the model's static batch run image by image."""

    def __init__(self, path: Path, threads: int = 1, profile_prefix: str | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendUnavailableError(f"onnxruntime is not installed ({e}); install it with: "
                                          f"{OnnxRuntimeBackend.install_hint}") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = profile_prefix
        if not Path(path).is_file():
            raise ArtifactError(f"model file '{path}' does not exist")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=list(DISABLED_OPTIMIZERS))
        except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf types
            raise ArtifactError(f"onnxruntime cannot load '{path}' ({type(e).__name__}: {str(e)[:200]}); "
                                "the file is corrupt or truncated: export it again") from e
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.batch is None or x.shape[0] == self.batch:
            return self.session.run(None, {self.input_name: x})[0]
        step = self.batch
        return np.concatenate([self.session.run(None, {self.input_name: x[i:i + step]})[0]
                               for i in range(0, x.shape[0], step)])


def parse_ort_profile(events: list[dict[str, Any]], warmup: int) -> list[LayerTiming]:
    """ONNX Runtime's chrome-trace JSON -> per-node median kernel time, in execution order.

    Node events have ``cat == "Node"`` and a name ending in ``_kernel_time`` (the
    ``_fence_before`` / ``_fence_after`` events are bookkeeping); ``dur`` is in us.
    The first ``warmup`` occurrences of each node are dropped.
    """
    suffix = "_kernel_time"
    durations: dict[tuple[str, str], list[float]] = {}
    ops: dict[tuple[str, str], str] = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith(suffix):
            continue
        args = e.get("args", {})
        key = (e["name"][: -len(suffix)], str(args.get("node_index", "")))
        durations.setdefault(key, []).append(float(e["dur"]))
        ops[key] = str(args.get("op_name", "?"))
    out = []
    for key, ds in durations.items():
        measured = ds[warmup:]
        if measured:
            out.append(LayerTiming(key[0], ops[key], float(statistics.median(measured)), len(measured)))
    return out
