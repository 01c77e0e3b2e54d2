"""TensorRT backend: a TensorRT-ready ONNX here, the engine on the device.

A TensorRT engine is specific to the GPU and the TensorRT version that built it,
so the artifact does not ship one. It ships ``model.onnx``, the graph TensorRT
builds from: static shapes, and for int8 explicit quantization, i.e.
QuantizeLinear/DequantizeLinear pairs with int8 data and zero point 0 (TensorRT
quantizes symmetrically; the export flow writes this format because the backend
asks for ``qdq_activations = "symmetric"``). The manifest carries the exact
``trtexec`` command that builds and times the engine on the device, and
``parse_trtexec_log`` / ``parse_trtexec_profile`` / ``parse_trtexec_times`` turn
what it prints and writes into our profile format.

Where TensorRT, cuda-python and an NVIDIA GPU exist (a Jetson: JetPack ships
TensorRT), ``load`` builds the engine with TensorRT's Python API (cached under
the user's cache folder, keyed by the graph's sha256, the TensorRT version and
the GPU; never inside the artifact folder) and runs it. Everywhere else every
runtime call raises ``BackendUnavailableError`` saying why, and the export flow
checks the deployed graph with ONNX Runtime instead (``exports_without_runtime``).
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from edge_compress.backends.base import ExportSource, LayerTiming
# The trtexec parsers live in their own module; re-exported for callers of this backend.
from edge_compress.backends.trtexec import (  # noqa: F401
    TrtexecOutputError, TrtexecReport, TrtexecTimes, parse_trtexec_log, parse_trtexec_profile, parse_trtexec_times,
    trt_layer_type)
from edge_compress.errors import ArtifactError, BackendUnavailableError, ConfigError

ENGINE_FILE = "model.engine"
TRTEXEC_LOG = "trtexec.log"
PROFILE_JSON, TIMES_JSON, LAYERS_JSON = "profile.json", "times.json", "layers.json"
WORKSPACE_BYTES = 1 << 30
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Device nodes of an NVIDIA GPU: desktop/server driver, Jetson (nvgpu) before and since JetPack 5.
GPU_DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/nvhost-ctrl-gpu", "/dev/nvhost-gpu", "/dev/nvgpu/igpu0/*")
INSTALL_HINT = ("on a Jetson TensorRT comes with JetPack (`sudo apt install nvidia-jetpack`, Python bindings "
                "`python3-libnvinfer`); on x86 with an NVIDIA GPU `pip install tensorrt --extra-index-url "
                "https://pypi.nvidia.com` (the PyPI package is a placeholder that downloads from NVIDIA's index); "
                "running engines from Python also needs `pip install cuda-python` matching the CUDA version")


class TensorRtBackend:
    name = "tensorrt"
    model_file = "model.onnx"        # the TensorRT-ready graph; the engine is built on the device
    install_hint = INSTALL_HINT
    precisions = ("fp32", "int8")
    qdq_activations = "symmetric"    # int8 activations with zero point 0: TensorRT's explicit quantization
    exports_without_runtime = True   # export() needs onnx only; validation then runs the graph on ORT

    def available(self) -> tuple[bool, str]:
        why = _missing_runtime()
        return why is None, why or ""

    def runtime_version(self) -> str:
        return _tensorrt().__version__

    def export(self, source: ExportSource, out_dir: Path) -> Path:
        from edge_compress.backends.onnx_export import check_onnx

        target = Path(out_dir) / self.model_file
        shutil.copyfile(source.onnx, target)
        graph = check_onnx(target)
        require_static_shapes(graph, source.onnx)
        if source.precision == "int8":
            require_explicit_int8(graph, source.onnx)
        return target

    def manifest_extra(self, source: ExportSource, out_dir: Path) -> dict[str, Any]:
        return {"tensorrt": {
            "trtexec_command": trtexec_command(self.model_file, source.precision),
            "engine_file": ENGINE_FILE, "precision": source.precision, "log_file": TRTEXEC_LOG,
            "profile_files": {"profile": PROFILE_JSON, "times": TIMES_JSON, "layers": LAYERS_JSON},
            "notes": _notes(source.precision)}}

    def layer_precision(self, model_path: Path) -> dict[str, str]:
        """Conv (and Gemm/MatMul) node -> "int8" when its input and weight come through a DequantizeLinear."""
        from edge_compress.backends.onnx_export import compute_node_precision

        return compute_node_precision(model_path)

    def load(self, artifact_dir: Path, threads: int = 1) -> "TensorRtRunner":
        self._require_runtime()
        return TensorRtRunner(Path(artifact_dir) / self.model_file)

    def profile_layers(self, artifact_dir: Path, x: np.ndarray, repeats: int = 20, warmup: int = 3,
                       threads: int = 1) -> list[LayerTiming]:
        """Per-layer medians from TensorRT's IProfiler (``threads`` does not apply to a GPU)."""
        if repeats < 1 or warmup < 0:
            raise ConfigError(f"profile: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
        self._require_runtime()
        profiler = _layer_profiler(_tensorrt())
        runner = TensorRtRunner(Path(artifact_dir) / self.model_file, profiler=profiler)
        for _ in range(warmup + repeats):
            runner(x[:1])
        return layer_times_to_timings(profiler.times, warmup)

    def _require_runtime(self) -> None:
        ok, why = self.available()
        if not ok:
            raise BackendUnavailableError(f"backend 'tensorrt' cannot run here: {why}")


# --- what the device runs: the trtexec command ------------------------------------------------

def trtexec_command(model_file: str = "model.onnx", precision: str = "fp32") -> str:
    """The trtexec command (TensorRT 8.5 to 10.x; flags as in trtexec --help) that builds the
    engine from ``model_file`` and times it: a warm-up of 500 ms, then at least 100 queries (and
    trtexec's default 3 s), a second, separate profiled run for per-layer times so the profiler
    does not slow the timed one, and everything written to JSON beside the engine."""
    if precision not in ("fp32", "int8"):
        raise ConfigError(f"precision '{precision}' has no TensorRT build; choose fp32 or int8")
    flags = [f"--onnx={model_file}", f"--saveEngine={ENGINE_FILE}"]
    if precision == "int8":
        # The Q/DQ nodes already fix which tensors are int8 (explicit quantization; no calibration).
        # --int8 lets the builder use int8 kernels there: TensorRT 8.x requires it for Q/DQ graphs and
        # 10.x still accepts it. --stronglyTyped (TensorRT >= 10, what NVIDIA now recommends) would give
        # the same engine but does not exist on 8.5/8.6, which JetPack 5 and 6.0 ship.
        flags.append("--int8")
    # fp32: no precision flag. --percentile is left at its default: recent releases (8.6, 10.x) print
    # 90/95/99, older 8.x (8.4 seen) accept a single value only. Without --separateProfileRun,
    # --dumpProfile makes trtexec skip the performance summary ("e2e network timing is not reported").
    flags += ["--warmUp=500", "--iterations=100", "--avgRuns=10", "--useSpinWait", "--separateProfileRun",
              "--dumpProfile", f"--exportProfile={PROFILE_JSON}", f"--exportTimes={TIMES_JSON}",
              "--dumpLayerInfo", f"--exportLayerInfo={LAYERS_JSON}", "--profilingVerbosity=detailed"]
    return " ".join(["trtexec", *flags])


def _notes(precision: str) -> str:
    quant = ("The graph is explicitly quantized: its Q/DQ scales are the shared calibration, so TensorRT does "
             "not calibrate again. On TensorRT >= 10 `--stronglyTyped` may replace `--int8`. "
             if precision == "int8" else
             "fp32 engines may use TF32 tensor-core math on Ampere and newer GPUs (Jetson Orin included), "
             "TensorRT's default; add --noTF32 for IEEE fp32. ")
    return (f"Build and time the engine on the target device (an engine only runs on the GPU model and TensorRT "
            f"version that built it): run the command in the artifact folder as `<trtexec_command> 2>&1 | tee "
            f"{TRTEXEC_LOG}`, then read {TRTEXEC_LOG}, {PROFILE_JSON} and {TIMES_JSON} with "
            "edge_compress.backends.tensorrt.parse_trtexec_log / parse_trtexec_profile / parse_trtexec_times. "
            + quant).strip()


# --- what export() checks: static shapes, explicit int8 -----------------------------------------

def require_static_shapes(model, path: Path) -> None:
    """Every graph input and output has a fixed, positive size in every dimension."""
    inits = {i.name for i in model.graph.initializer}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            if v.name in inits:
                continue
            shape = _shape(v)
            if shape is None or not all(isinstance(d, int) for d in shape):
                raise ConfigError(
                    f"'{path}' {kind} '{v.name}' has dynamic shape {shape or 'unknown'}; the TensorRT artifact "
                    "needs static shapes, so the engine is built for exactly one shape with no optimization "
                    "profile: export it with fixed sizes (edge-compress exports 1x3xHxW) or fix them with "
                    "`python -m onnxruntime.tools.make_dynamic_shape_fixed --dim_param NAME --dim_value N`")


def _shape(value_info) -> list[int | str] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in t.shape.dim]


def require_explicit_int8(model, path: Path) -> int:
    """The graph is explicitly quantized the way TensorRT reads it: Q/DQ nodes whose zero point is a
    constant int8 zero (a missing zero point means uint8 in ONNX). Returns the number of Q/DQ nodes."""
    consts = _constants(model)
    qdq = [n for n in model.graph.node if n.op_type in QDQ_OPS]
    if not qdq:
        raise ConfigError(f"'{path}' has no QuantizeLinear/DequantizeLinear nodes: it is not explicitly "
                          "quantized, so TensorRT would build it in float; export it with quant=QuantConfig(...)")
    bad = [why for why in (_zero_point_problem(n, consts) for n in qdq) if why]
    if bad:
        raise ConfigError(f"'{path}' is not quantized the way TensorRT needs (int8 Q/DQ, zero point 0): "
                          f"{len(bad)} of {len(qdq)} Q/DQ nodes fail, e.g. {bad[:3]}; export the int8 graph for "
                          "the tensorrt backend (symmetric int8 activations), not another backend's uint8 graph")
    return len(qdq)


def _zero_point_problem(node, consts: dict[str, np.ndarray]) -> str | None:
    zp_name = node.input[2] if len(node.input) > 2 else ""
    if not zp_name:
        return f"{node.name}: no zero point (ONNX then means uint8)"
    zp = consts.get(zp_name)
    if zp is None:
        return f"{node.name}: zero point '{zp_name}' is not a constant"
    if zp.dtype != np.int8:
        return f"{node.name}: zero point is {zp.dtype}, TensorRT needs int8"
    if np.any(zp != 0):
        return f"{node.name}: zero point {zp.ravel()[:4].tolist()} is not 0 (TensorRT quantizes symmetrically)"
    return None


def _constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


# --- the device side: availability, engine build, runner -----------------------------------------

def _tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError) as e:   # the bindings wheel alone fails on a missing libnvonnxparser
        raise BackendUnavailableError(f"the tensorrt Python module cannot be imported ({type(e).__name__}: {e}); "
                                      f"{INSTALL_HINT}") from e
    return tensorrt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart   # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart                   # earlier cuda-python
        except ImportError as e:
            raise BackendUnavailableError(
                f"running a TensorRT engine from Python needs cuda-python for device buffers ({e}); install it "
                "with `pip install cuda-python` (on a Jetson the version matching JetPack's CUDA)") from e
    return cudart


def _missing_runtime() -> str | None:
    """Why TensorRT cannot run here (None when it can): no module, no GPU, no cuda-python, no CUDA device."""
    try:
        _tensorrt()
    except BackendUnavailableError as e:
        return str(e)
    if not any(glob.glob(p) for p in GPU_DEVICE_NODES):
        return ("no NVIDIA GPU is visible: none of /dev/nvidia0 (desktop/server GPUs) or /dev/nvhost-ctrl-gpu, "
                "/dev/nvgpu/igpu0 (Jetson) exists, and TensorRT runs only on NVIDIA GPUs; build and time the "
                "engine on the device with the trtexec command in the artifact's manifest")
    try:
        err, count = _cudart().cudaGetDeviceCount()
    except BackendUnavailableError as e:
        return str(e)
    if int(err) != 0 or count < 1:
        return f"the CUDA driver finds no usable GPU (cudaGetDeviceCount: {err}, {count} devices)"
    return None


def _check(result) -> Any:
    """cuda-python returns ``(error, *values)``; raise on an error, else return the value(s)."""
    err, *values = result
    if int(err) != 0:
        raise BackendUnavailableError(f"CUDA call failed: {err}")
    return values[0] if len(values) == 1 else values or None


def engine_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge_compress" / "tensorrt"


def build_engine(onnx_path: Path, cache_dir: Path | None = None) -> bytes:
    """The serialized engine of ``onnx_path`` for this GPU, built once and cached outside the artifact."""
    from edge_compress.io import atomic_path

    trt, cudart = _tensorrt(), _cudart()
    data = Path(onnx_path).read_bytes()
    gpu = _check(cudart.cudaGetDeviceProperties(0)).name
    key = hashlib.sha256(data + f"|{trt.__version__}|{gpu!r}".encode()).hexdigest()[:40]
    cached = Path(cache_dir or engine_cache_dir()) / f"{key}.engine"
    if cached.is_file():
        return cached.read_bytes()
    plan = _build(trt, data, onnx_path)
    with atomic_path(cached) as tmp:
        tmp.write_bytes(plan)
    return plan


def _build(trt, data: bytes, onnx_path: Path) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit = 0 if int(trt.__version__.split(".")[0]) >= 10 else \
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)   # the default (and only) mode from 10.0
    network = builder.create_network(explicit)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT's ONNX parser rejects '{onnx_path}': {errors[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED   # layer names for the profiler
    if any(network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers)):
        config.set_flag(trt.BuilderFlag.INT8)   # as --int8 in trtexec_command: the Q/DQ graph decides where
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ArtifactError(f"TensorRT could not build an engine from '{onnx_path}' (see its log above)")
    return bytes(plan)


class TensorRtRunner:
    """One engine and execution context; batches larger than the engine's static batch run image by image."""

    def __init__(self, path: Path, profiler: Any | None = None, cache_dir: Path | None = None):
        trt, self.cudart = _tensorrt(), _cudart()
        if not Path(path).is_file():
            raise ArtifactError(f"model file '{path}' does not exist")
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(build_engine(path, cache_dir))
        self.context = self.engine.create_execution_context()
        if profiler is not None:
            self.context.profiler = profiler
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ArtifactError(f"'{path}' has inputs {inputs} and outputs {outputs}; a detector has one of each")
        if any(self.engine.get_tensor_dtype(n) != trt.DataType.FLOAT for n in names):
            raise ArtifactError(f"'{path}' has non-float32 inputs or outputs; the runner feeds and reads float32")
        self.in_shape = tuple(self.engine.get_tensor_shape(inputs[0]))
        self.out = np.empty(tuple(self.engine.get_tensor_shape(outputs[0])), np.float32)
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.d_in = _check(self.cudart.cudaMalloc(int(np.prod(self.in_shape)) * 4))
        self.d_out = _check(self.cudart.cudaMalloc(self.out.nbytes))
        self.context.set_tensor_address(inputs[0], int(self.d_in))
        self.context.set_tensor_address(outputs[0], int(self.d_out))

    def _run(self, x: np.ndarray) -> np.ndarray:
        c = self.cudart
        if x.shape != self.in_shape:
            raise ConfigError(f"input shape {x.shape} differs from the engine's {self.in_shape}")
        _check(c.cudaMemcpyAsync(self.d_in, x.ctypes.data, x.nbytes, c.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                 self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise ArtifactError("TensorRT failed to enqueue the engine (see its log above)")
        _check(c.cudaMemcpyAsync(self.out.ctypes.data, self.d_out, self.out.nbytes,
                                 c.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(c.cudaStreamSynchronize(self.stream))
        return self.out.copy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        step = self.in_shape[0]
        return np.concatenate([self._run(x[i:i + step]) for i in range(0, x.shape[0], step)])

    def __del__(self):
        for ptr in (getattr(self, "d_in", None), getattr(self, "d_out", None)):
            if ptr is not None:
                self.cudart.cudaFree(ptr)
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamDestroy(self.stream)


def _layer_profiler(trt):
    """A ``trt.IProfiler`` collecting every reported layer time (ms), in execution order."""
    class LayerProfiler(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.times: dict[str, list[float]] = {}

        def report_layer_time(self, layer_name, ms):
            self.times.setdefault(layer_name, []).append(float(ms))

    return LayerProfiler()


def layer_times_to_timings(times: dict[str, list[float]], warmup: int) -> list[LayerTiming]:
    """IProfiler reports (layer -> ms per run) -> per-layer median in us over the runs after ``warmup``."""
    out = []
    for name, ms in times.items():
        measured = ms[warmup:]
        if measured:
            out.append(LayerTiming(name, trt_layer_type(name), 1e3 * statistics.median(measured), len(measured)))
    return out

