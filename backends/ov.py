"""OpenVINO backend on the CPU plugin: fp32, and int8 from a QDQ graph.

The IR (``model.xml`` + ``model.bin``) comes from OpenVINO's own converter run on
the source ONNX graph, which never enters the artifact. A QDQ graph converts to
FakeQuantize nodes, which the CPU plugin executes with int8 kernels (its
low-precision transformations); the per-layer precision reported is then the
plugin's runtime precision of each convolution. Weights are saved in fp32 (``compress_to_fp16=False``)
and the CPU plugin is told to infer in f32, since on CPUs with bf16/fp16 support
it would otherwise pick a lower precision on its own.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from edge_compress.backends.base import ExportSource, LayerTiming
from edge_compress.errors import ArtifactError, BackendUnavailableError, ConfigError
from edge_compress.sigstack import preserved_signal_stack

CONV_TYPES = ("Convolution", "GroupConvolution")   # GroupConvolution: depthwise and grouped convs
_PRECISION = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "i8": "int8", "u8": "int8"}


class OpenVinoBackend:
    name = "openvino"
    model_file = "model.xml"       # the topology; OpenVINO reads its weights from model.bin beside it
    install_hint = "pip install 'edge-compress[openvino]' (export also needs the onnx extra)"
    precisions = ("fp32", "int8")
    qdq_activations = "asymmetric"

    def available(self) -> tuple[bool, str]:
        try:
            import openvino  # noqa: F401
        except ImportError as e:
            return False, f"openvino cannot be imported ({e}); install it with: {self.install_hint}"
        return True, ""

    def runtime_version(self) -> str:
        import openvino

        return openvino.get_version()

    def export(self, source: ExportSource, out_dir: Path) -> Path:
        import openvino as ov

        xml = Path(out_dir) / self.model_file
        ov.save_model(ov.convert_model(str(source.onnx)), str(xml), compress_to_fp16=False)
        return xml

    def layer_precision(self, model_path: Path) -> dict[str, str]:
        """Per conv node of the IR: the precision the CPU plugin runs it in (``runtimePrecision``
        of the compiled model's node that absorbed it), falling back to the weights' element
        type when the plugin does not report the node."""
        ir = _read(Path(model_path))
        compiled = _compile(ir, {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
        runtime: dict[str, str] = {}
        for op in compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            if "runtimePrecision" in rt and "originalLayersNames" in rt:
                for name in rt["originalLayersNames"].astype(str).split(","):
                    runtime.setdefault(name, rt["runtimePrecision"].astype(str))
        return {op.get_friendly_name(): _PRECISION.get(runtime.get(op.get_friendly_name(), ""), _weight_precision(op))
                for op in ir.get_ordered_ops() if op.get_type_name() in CONV_TYPES}

    def load(self, artifact_dir: Path, threads: int = 1) -> "OpenVinoRunner":
        return OpenVinoRunner(Path(artifact_dir) / self.model_file, threads)

    def profile_layers(self, artifact_dir: Path, x: np.ndarray, repeats: int = 20, warmup: int = 3,
                       threads: int = 1) -> list[LayerTiming]:
        if repeats < 1 or warmup < 0:
            raise ConfigError(f"profile: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
        runner = OpenVinoRunner(Path(artifact_dir) / self.model_file, threads, perf_count=True)
        runs = []
        for i in range(warmup + repeats):
            runner(x[:1])
            if i >= warmup:
                runs.append(runner.request.get_profiling_info())
        return perf_counts_to_timings(runs)


class OpenVinoRunner:
    """One compiled model and infer request; batches larger than the model's static batch run image by image."""

    def __init__(self, path: Path, threads: int = 1, perf_count: bool = False):
        model = _read(Path(path))
        config = {"INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32",
                  "PERF_COUNT": bool(perf_count)}
        self.compiled = _compile(model, config)
        self.request = self.compiled.create_infer_request()
        batch = model.inputs[0].get_partial_shape()[0]
        self.batch = batch.get_length() if batch.is_static else None

    def _run(self, x: np.ndarray) -> np.ndarray:
        # share_inputs: the contiguous float32 input is read in place (no copy); the output comes back
        # as a fresh array (share_outputs stays off: the request reuses its tensor on the next call)
        return self.request.infer({0: x}, share_inputs=True)[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.batch is None or x.shape[0] == self.batch:
            return self._run(x)
        step = self.batch
        return np.concatenate([self._run(x[i:i + step]) for i in range(0, x.shape[0], step)])


def perf_counts_to_timings(runs: list[list[Any]]) -> list[LayerTiming]:
    """Per-run ``ProfilingInfo`` lists -> per-node median ``real_time`` in us, in execution order.

    Nodes with status NOT_RUN in every run were fused into a neighbour by the plugin and take
    no time of their own; they are left out. A node that runs in some runs only (the CPU plugin
    skips some layout reorders when their input is already in place) counts 0 us in the others,
    so its median is over all runs, like the nodes that always run.
    """
    per_run: list[dict[tuple[str, str], float]] = []
    for infos in runs:
        run: dict[tuple[str, str], float] = {}
        for p in infos:
            if not str(p.status).endswith("NOT_RUN"):
                key = (p.node_name, p.node_type)
                run[key] = run.get(key, 0.0) + p.real_time.total_seconds() * 1e6
        per_run.append(run)
    order = list(dict.fromkeys(key for run in per_run for key in run))   # first-seen execution order
    return [LayerTiming(name, op, float(statistics.median(run.get((name, op), 0.0) for run in per_run)), len(per_run))
            for name, op in order]


def _compile(model, config: dict[str, Any]):
    """``compile_model`` on the CPU, keeping the thread's alternate signal stack: the CPU plugin swaps
    in one that it frees later (see edge_compress.sigstack)."""
    import openvino as ov

    with preserved_signal_stack():
        return ov.Core().compile_model(model, "CPU", config)


def _read(xml: Path):
    try:
        import openvino as ov
    except ImportError as e:
        raise BackendUnavailableError(f"openvino is not installed ({e}); install it with: "
                                      f"{OpenVinoBackend.install_hint}") from e
    if not xml.is_file() or not xml.with_suffix(".bin").is_file():
        raise ArtifactError(f"OpenVINO model '{xml}' or its weights '{xml.with_suffix('.bin').name}' do not exist")
    try:
        return ov.Core().read_model(str(xml))
    except Exception as e:  # OpenVINO raises RuntimeError for bad XML and short .bin files alike
        raise ArtifactError(f"openvino cannot read '{xml}' ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                            "the file is corrupt or truncated: export it again") from e


def _weight_precision(conv) -> str:
    weights = conv.input_value(1).get_node()
    if weights.get_type_name() == "Convert":
        weights = weights.input_value(0).get_node()
    etype = weights.get_output_element_type(0).get_type_name()
    return _PRECISION.get(etype, etype)
