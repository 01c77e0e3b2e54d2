"""LiteRT (TFLite) backend: a ``.tflite`` file run by ai-edge-litert's Interpreter (XNNPACK on CPU).

A device needs only ``ai-edge-litert`` (the maintained successor of tflite-runtime);
exporting also needs ``litert-torch``, which converts torch programs (not ONNX), so
the source must be a zoo/torch detector. litert-torch keeps torch's NCHW signature:
the model takes ``(1, 3, H, W)`` and returns the raw ``(1, P, K)`` head output.

- fp32: ``litert_torch.convert(model, (example,))``.
- int8 (full integer): litert-torch's PT2E flow (``prepare_pt2e`` -> ranges ->
  ``convert_pt2e`` -> ``litert_torch.convert``). Weights int8 symmetric per output
  channel (per tensor if the QDQ graph is), activations int8 asymmetric per tensor,
  biases int32 (the converter's), int8 kernels for every conv, depthwise conv, add,
  mul, concat, max-pool, mean, resize, LeakyReLU and HardSwish (litert-torch's own
  quantizer leaves HardSwish, LeakyReLU, fused ReLU6 and chained residual adds out,
  and pools a squeeze-excite mean on its input's scale: ``make_quantizer`` fixes
  these). The *input* tensor is int8
  (the converter folds the first quantize into the signature): the runner quantizes
  the float input with that tensor's scale and zero point. The *output* is float32:
  as in the QDQ graph of every other backend, the head's output convs (unless
  ``quantize_outputs``), any ``keep_fp32`` layer and the output tail stay float. The
  hard-sigmoid gates of squeeze-excite blocks run in float too: TFLite has no int8
  HARD_SIGMOID and litert-torch lowers it to float ADD/MUL with quantize/dequantize around.

Activation ranges come from the shared calibration table (``source.calibration``),
never from PT2E's observers: both graphs run on the same calibration images, and
each PT2E activation observer takes the range of the fp32-ONNX tensor(s) whose values
equal what it observed (``match_observers``); an observer with no unambiguous match
gets a range from our own calibrator (same method, same images) run on the PT2E graph.
The split is recorded in the manifest (``activation_ranges``). int8 scales are those
of the uint8 QDQ graph: ``scale = (hi - lo) / 255``, int8 zero point = uint8 zero point - 128.
Where TFLite's int8 kernels want one scale on several tensors (concat inputs and output,
max-pool, nearest resize, reshapes) the observer is shared and takes the union of their
ranges, and the converter requantizes the inputs that differ. Scales are floored at
float32's eps (litert-torch's 2**-12 would alter the scales of small-range tensors).

Per-op profiling: ai-edge-litert's Python API has no profiler (the interpreter's
``experimental_force_delegate_node_profiling`` only feeds the C++ profiler, which Python
cannot read), so ``profile_layers`` raises; on the device, LiteRT's ``benchmark_model``
binary with ``--enable_op_profiling=true`` gives per-op times.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edge_compress.backends.base import ExportSource, LayerTiming
from edge_compress.errors import ArtifactError, BackendUnavailableError, ConfigError

WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")   # the ops layer_precision reports
OBSERVER_EPS = float(np.finfo(np.float32).eps)   # scale floor (see the module docstring)
MATCH_IMAGES = 2      # calibration images both graphs run to pair tensors by value
MATCH_RTOL = 1e-3     # max|pt2e - onnx| <= MATCH_RTOL * max|onnx|: same tensor up to BN folding and op order
PROFILE_HINT = ("LiteRT's Python API has no per-op profiler; on the device run LiteRT's benchmark_model "
                "binary: benchmark_model --graph=model.tflite --num_threads=1 --enable_op_profiling=true")


class LiteRtBackend:
    name = "litert"
    model_file = "model.tflite"
    install_hint = "pip install 'edge-compress[litert]' (ai-edge-litert runs models; litert-torch exports them)"
    precisions = ("fp32", "int8")
    qdq_activations = "asymmetric"

    def __init__(self) -> None:
        self._reports: dict[str, dict[str, Any]] = {}   # out_dir -> what the int8 export did, for the manifest

    def available(self) -> tuple[bool, str]:
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError as e:
            return False, f"ai-edge-litert cannot be imported ({e}); install it with: {self.install_hint}"
        return True, ""

    def exporter_available(self) -> tuple[bool, str]:
        try:
            import litert_torch  # noqa: F401
        except ImportError as e:
            return False, f"litert-torch cannot be imported ({e}); exporting needs it: {self.install_hint}"
        return True, ""

    def runtime_version(self) -> str:
        from importlib.metadata import version

        return version("ai-edge-litert")

    def export(self, source: ExportSource, out_dir: Path) -> Path:
        if source.model is None:
            raise ConfigError("LiteRT export needs a zoo/torch model: litert-torch converts torch programs, not ONNX "
                              f"files ('{source.fp32_onnx.name}'); export a zoo model or a checkpoint, or use the "
                              "onnxruntime/openvino backends for an external ONNX detector")
        ok, why = self.exporter_available()
        if not ok:
            raise BackendUnavailableError(why)
        target = Path(out_dir) / self.model_file
        if source.precision == "int8":
            content, self._reports[str(out_dir)] = _int8_tflite(source, _calibrator_settings(Path(out_dir)))
        else:
            content = fp32_tflite(source.model)
        target.write_bytes(content)
        return target

    def manifest_extra(self, source: ExportSource, out_dir: Path) -> dict[str, Any]:
        """int8 only: where each activation range of the PT2E graph came from."""
        report = self._reports.pop(str(out_dir), None)
        return {} if report is None else {"litert_int8": report}

    def layer_precision(self, model_path: Path) -> dict[str, str]:
        """Per conv / depthwise conv / fully connected op: "int8" when its input and filter tensors
        are int8, else "fp32"; keyed ``"<op index>:<output tensor name>"``."""
        return {f"{i}:{out}": prec for i, _, out, prec in weight_ops(Path(model_path))}

    def load(self, artifact_dir: Path, threads: int = 1) -> "LiteRtRunner":
        return LiteRtRunner(Path(artifact_dir) / self.model_file, threads)

    def profile_layers(self, artifact_dir: Path, x: np.ndarray, repeats: int = 20, warmup: int = 3,
                       threads: int = 1) -> list[LayerTiming]:
        raise BackendUnavailableError(PROFILE_HINT)


class LiteRtRunner:
    """One Interpreter (XNNPACK delegate, the default); runs image by image (the model's batch is 1).
    An int8 input is quantized and an int8 output dequantized with the tensor's own scale/zero point."""

    def __init__(self, path: Path, threads: int = 1):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise BackendUnavailableError(f"ai-edge-litert is not installed ({e}); install it with: "
                                          f"{LiteRtBackend.install_hint}") from e
        if not Path(path).is_file():
            raise ArtifactError(f"model file '{path}' does not exist")
        _read_model(Path(path))   # a clear error before the C++ loader sees a bad flatbuffer
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=int(threads))
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ArtifactError(f"ai-edge-litert cannot load '{path}' ({type(e).__name__}: {str(e)[:200]}); "
                                "the file is corrupt or truncated: export it again") from e
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def _one(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], _to_tensor(x, self.input))
        self.interpreter.invoke()
        return _from_tensor(self.interpreter.get_tensor(self.output["index"]), self.output)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.concatenate([self._one(x[i:i + 1]) for i in range(x.shape[0])])


def _to_tensor(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """NCHW float32 ``(1, C, H, W)`` -> the input tensor's layout and dtype."""
    shape = tuple(int(d) for d in detail["shape"])
    if shape != x.shape:
        if shape != (x.shape[0], x.shape[2], x.shape[3], x.shape[1]):
            raise ConfigError(f"input of shape {x.shape} does not fit the model's input {shape}")
        x = x.transpose(0, 2, 3, 1)   # an NHWC model
    if detail["dtype"] == np.float32:
        return np.ascontiguousarray(x)
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(detail["dtype"])


def _from_tensor(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return y.copy()
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - zero) * np.float32(scale)


# ---------------------------------------------------------------- reading .tflite files (no runtime needed)

def _read_model(path: Path):
    return _parse(path.read_bytes(), f"'{path}'")


def _parse(buf: bytes, what: str):
    from ai_edge_litert import schema_py_generated as schema

    try:
        if len(buf) < 8 or not schema.Model.ModelBufferHasIdentifier(buf, 0):
            raise ValueError("no TFL3 file identifier")
        model = schema.Model.GetRootAs(buf, 0)
        _ = [model.Subgraphs(i).OperatorsLength() for i in range(model.SubgraphsLength())]
        _ = [model.Buffers(i).DataLength() for i in range(model.BuffersLength())]
    except Exception as e:  # flatbuffers raises struct/index errors on a cut file
        raise ArtifactError(f"{what} is not a readable .tflite model ({type(e).__name__}: {e}); the file is "
                            "corrupt or truncated: export it again") from e
    return model


def _io_types(content: bytes) -> dict[str, str]:
    """dtype of the model's input and output tensors, e.g. ``{"input": "int8", "output": "float32"}``."""
    from ai_edge_litert import schema_py_generated as schema

    g = _parse(content, "the converted model").Subgraphs(0)
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    return {"input": types[g.Tensors(g.Inputs(0)).Type()], "output": types[g.Tensors(g.Outputs(0)).Type()]}


def weight_ops(path: Path) -> list[tuple[int, str, str, str]]:
    """``(op index, op type, output tensor name, "int8"|"fp32")`` of every conv / depthwise conv /
    fully connected op of the main subgraph, in execution order."""
    from ai_edge_litert import schema_py_generated as schema

    model = _read_model(path)
    g = model.Subgraphs(0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    out = []
    for i in range(g.OperatorsLength()):
        op = g.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        kind = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "?")
        if kind in WEIGHT_OPS:
            x, w = (g.Tensors(op.Inputs(j)) for j in (0, 1))
            int8 = x.Type() == w.Type() == schema.TensorType.INT8
            out.append((i, kind, g.Tensors(op.Outputs(0)).Name().decode(), "int8" if int8 else "fp32"))
    return out


def activation_scales(path: Path) -> dict[str, tuple[float, int]]:
    """Per-tensor ``(scale, zero point)`` of every int8 activation tensor (no buffer, one scale)."""
    from ai_edge_litert import schema_py_generated as schema

    model = _read_model(path)
    g = model.Subgraphs(0)
    out = {}
    for i in range(g.TensorsLength()):
        t = g.Tensors(i)
        q = t.Quantization()
        if t.Type() == schema.TensorType.INT8 and q is not None and q.ScaleLength() == 1 \
                and model.Buffers(t.Buffer()).DataLength() == 0:
            out[t.Name().decode()] = (float(q.Scale(0)), int(q.ZeroPoint(0)))
    return out


# ---------------------------------------------------------------- export

_FP32_CACHE: dict[str, bytes] = {}   # model key -> .tflite bytes (the last few conversions)
_FP32_CACHE_SIZE = 4


def fp32_tflite(model) -> bytes:
    """``litert_torch.convert(model, (example,))`` as .tflite bytes. A conversion is a pure function of
    the architecture, the weights and the input shape, and costs seconds (20 s for picodet_s on two
    cores); the int8 export converts the same model again for its fp32 latency reference, so the last
    few results are kept, keyed by a hash of all three."""
    import torch
    import litert_torch

    key = _model_key(model)
    if key not in _FP32_CACHE:
        s = model.input_spec
        example = torch.from_numpy(np.random.default_rng(0).random((1, s.channels, s.height, s.width), np.float32))
        with torch.no_grad():
            content = litert_torch.convert(model.eval(), (example,)).model_content()
        while len(_FP32_CACHE) >= _FP32_CACHE_SIZE:
            _FP32_CACHE.pop(next(iter(_FP32_CACHE)))
        _FP32_CACHE[key] = content
    return _FP32_CACHE[key]


def _model_key(model) -> str:
    import hashlib

    import torch

    s = model.input_spec
    h = hashlib.sha256(f"{type(model).__qualname__}|{getattr(model, 'name', '')}|{s.channels}x{s.height}x{s.width}|"
                       f"{model.config() if hasattr(model, 'config') else ''}".encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().view(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _calibrator_settings(out_dir: Path) -> dict[str, Any]:
    """Calibrator of the shared table: its name from the ``calibration.json`` the export flow wrote
    beside the model (``ExportSource`` does not carry the QuantConfig); bins and percentile are
    QuantConfig's defaults, which the table file does not record."""
    from edge_compress.quant import QuantConfig

    d = QuantConfig()
    table = out_dir / "calibration.json"
    method = json.loads(table.read_text()).get("calibrator", d.calibrator) if table.is_file() else d.calibrator
    return {"calibrator": method, "bins": d.bins, "percentile": d.percentile}


def _int8_tflite(source: ExportSource, calib: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    import torch
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not source.calibration or not source.calibration_inputs:
        raise ConfigError("a LiteRT int8 export needs the shared calibration table and its images "
                          "(ExportSource.calibration and .calibration_inputs); export through export_model")
    model = source.model.eval()
    example = (torch.from_numpy(np.ascontiguousarray(source.calibration_inputs[0], np.float32)),)
    plan = _qdq_plan(source, model)
    quantizer = make_quantizer(plan["per_channel"], plan["float_modules"])
    with torch.no_grad():
        gm = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
        ranges, report = table_ranges(gm, source, calib)
        set_observer_ranges(gm, ranges)
        gm = move_exported_model_to_eval(convert_pt2e(gm, fold_quantize=False))
        content = litert_torch.convert(gm, example, quant_config=QuantConfig(pt2e_quantizer=quantizer)).model_content()
    report.update({"weights": "int8 symmetric " + ("per output channel" if plan["per_channel"] else "per tensor"),
                   "activations": "int8 asymmetric per tensor (scale and uint8 zero point - 128 of the QDQ graph)",
                   "float_convs": sorted(plan["float_modules"]),
                   "io": _io_types(content)})
    return content, report


def _qdq_plan(source: ExportSource, model) -> dict[str, Any]:
    """What the QDQ graph decided, so the PT2E graph makes the same choices: the torch Conv2d modules
    it leaves in float (keep_fp32, the head's output convs) and per-channel or per-tensor weights."""
    import onnx

    from edge_compress.quant.qdq import conv_module_map

    qdq = onnx.load(str(source.onnx))
    producers = {o: n for n in qdq.graph.node for o in n.output}
    inits = {i.name: i for i in qdq.graph.initializer}
    float_nodes, per_channel = set(), False
    for n in qdq.graph.node:
        if n.op_type != "Conv":
            continue
        dq = producers.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            float_nodes.add(n.name)
        elif dq.input[1] in inits and int(np.prod(inits[dq.input[1]].dims)) > 1:
            per_channel = True
    module_of = {v: k for k, v in conv_module_map(model, onnx.load(str(source.fp32_onnx))).items()}
    missing = sorted(float_nodes - set(module_of))
    if missing:
        raise ConfigError(f"the QDQ graph keeps ONNX conv(s) {missing[:4]} in float but they cannot be traced back "
                          "to torch modules of the model; LiteRT int8 cannot mirror them")
    return {"float_modules": {module_of[n] for n in float_nodes}, "per_channel": per_channel}


# ---------------------------------------------------------------- the PT2E quantizer

def make_quantizer(per_channel: bool, float_modules: set[str]):
    """litert-torch's PT2EQuantizer with MinMax observers (their ranges are overwritten from the
    table), plus int8 patterns it lacks (conv + ReLU6/hardtanh fused, HardSwish, LeakyReLU,
    nearest resize, channel-shuffle reshapes); ``float_modules`` and the output tail are left unannotated."""
    import torch
    from litert_torch.quantize import pt2e_quantizer as pq
    from litert_torch.quantize import pt2e_quantizer_utils as pqu
    from torchao.quantization.pt2e.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    act = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_affine,
                           observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=OBSERVER_EPS))
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=-127, quant_max=127, ch_axis=0,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        observer_or_fake_quant_ctr=(PerChannelMinMaxObserver if per_channel else MinMaxObserver).with_args(
            eps=OBSERVER_EPS))
    base = pq.get_symmetric_quantization_config(is_per_channel=per_channel)
    config = pqu.QuantizationConfig(act, act, weight, None, base.fixed_qparams)

    class TableQuantizer(pq.PT2EQuantizer):
        def annotate(self, gm):
            skip = _float_nodes(gm, float_modules)

            def keep(n):
                return n not in skip

            _annotate_extra(gm, config, keep)
            self._annotate_all_static_patterns(gm, config, keep)
            pqu.propagate_annotation(gm)
            return gm

    return TableQuantizer().set_global(config)


_COMPUTE = ("aten.conv1d.default", "aten.conv2d.default", "aten.convolution.default", "aten.linear.default")


def _float_nodes(gm, float_modules: set[str]) -> set:
    """Conv nodes of ``float_modules`` plus the tail: nodes from which no conv/linear is reachable."""
    nodes = list(gm.graph.nodes)
    reaches: dict[Any, bool] = {}
    for n in reversed(nodes):
        reaches[n] = any(str(u.target) in _COMPUTE or reaches.get(u, False) for u in n.users)
    tail = {n for n in nodes if n.op == "call_function" and str(n.target) not in _COMPUTE and not reaches[n]}
    return tail | {n for n in nodes if str(n.target) in _COMPUTE and _module_of(n) in float_modules}


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _annotate_extra(gm, config, keep) -> None:
    import torch
    from torch.fx import Node
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    aten = torch.ops.aten
    act = config.input_activation
    for n in gm.graph.nodes:
        if n.op != "call_function" or not keep(n) or "quantization_annotation" in n.meta:
            continue
        x = n.args[0] if n.args else None
        if n.target in (aten.hardtanh.default, aten.relu.default) and _is_fusable_conv(x, keep):
            # conv + clamp: one int8 CONV_2D with the clamp fused; only the clamp's output is observed
            ins = {x.args[0]: act, x.args[1]: config.weight}
            x.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=ins, _annotated=True)
            n.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=act, _annotated=True)
        elif n.target in (aten.hardswish.default, aten.leaky_relu.default, aten.hardtanh.default, aten.relu.default):
            n.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map={x: act}, output_qspec=act,
                                                                       _annotated=True)
        elif n.target in (aten.add.Tensor, aten.mul.Tensor) and all(isinstance(a, Node) for a in n.args[:2]):
            # litert-torch annotates add/mul by source partition, which merges chained residual adds
            # (add_2(add_1, ...)) and leaves one of them, and everything it feeds, in float
            n.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={a: act for a in n.args[:2]}, output_qspec=act, _annotated=True)
        elif n.target in (aten.adaptive_avg_pool2d.default, aten.mean.dim):
            # an average has a narrower range than its input (TFLite's int8 MEAN requantizes): its own
            # observer, not litert-torch's shared one, which would quantize the pooled values of a
            # squeeze-excite block on the input's coarse scale
            n.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map={x: act}, output_qspec=act,
                                                                       _annotated=True)
        elif n.target in (aten.upsample_nearest2d.vec, aten.transpose.int, aten.reshape.default):
            # pure data movement: int8 in, int8 out at the input's scale
            n.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={x: act}, output_qspec=SharedQuantizationSpec((x, n)), _annotated=True)


def _is_fusable_conv(x, keep) -> bool:
    return (getattr(x, "op", None) == "call_function" and str(x.target) in _COMPUTE[:3] and keep(x)
            and len(x.users) == 1 and "quantization_annotation" not in x.meta)


# ---------------------------------------------------------------- ranges from the shared table

def activation_observers(gm) -> dict[str, Any]:
    """Name -> observer module of every activation observer (per-tensor affine) of a prepared graph."""
    import torch

    return {name: m for name, m in gm.named_modules()
            if getattr(m, "qscheme", None) == torch.per_tensor_affine and hasattr(m, "min_val")}


def observed_values(gm, observers: dict[str, Any], inputs) -> dict[str, list[list[np.ndarray]]]:
    """Per observer, per input image: the tensors it saw, in call order (a shared observer sees several)."""
    import torch

    seen: dict[str, list[list[np.ndarray]]] = {k: [] for k in observers}
    hooks = [m.register_forward_pre_hook(lambda mod, args, k=k: seen[k][-1].append(args[0].detach().numpy().copy()))
             for k, m in observers.items()]
    try:
        for x in inputs:
            for k in seen:
                seen[k].append([])
            gm(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    finally:
        for h in hooks:
            h.remove()
    return seen


def onnx_values(onnx_path: Path, inputs) -> list[dict[str, np.ndarray]]:
    """Every float tensor of the fp32 ONNX graph (input and node outputs), per input image."""
    import onnx
    import onnxruntime as ort

    from edge_compress.quant.calibrate import float_tensors

    model = onnx.load(str(onnx_path))
    names = float_tensors(model)
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names[1:] if n not in outputs)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # keep every tensor
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    in_name, out_names = sess.get_inputs()[0].name, [o.name for o in sess.get_outputs()]
    return [{in_name: x, **dict(zip(out_names, sess.run(out_names, {in_name: x})))} for x in inputs]


def match_observers(seen: dict[str, list[list[np.ndarray]]], onnx: list[dict[str, np.ndarray]],
                    table: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float] | None]:
    """Observer -> the table range of the ONNX tensor(s) it observed, or None when unmatched.

    A tensor matches an ONNX tensor of the same shape whose values agree within ``MATCH_RTOL``
    on every matching image; several matches must share one table range (identical tensors).
    A shared observer (TFLite wants one scale across concat, max-pool, nearest resize and
    reshapes) sees several tensors and takes the union of their ranges, so none is clipped; a
    tensor of it with no ONNX twin that only re-lays out another one it saw (a view the ONNX
    optimizer folded away) needs no range of its own."""
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name, v in onnx[0].items():
        if name in table:
            by_shape.setdefault(v.shape, []).append(name)
    out: dict[str, tuple[float, float] | None] = {}
    for obs, per_image in seen.items():
        edges = [[img[j] for img in per_image] for j in range(len(per_image[0]))] if per_image else []
        ranges = [_match_one(values, onnx, by_shape, table) for values in edges]
        needed = [r for r, values in zip(ranges, edges)
                  if r is not None or not _relayout_of_matched(values, edges, ranges)]
        out[obs] = None if not needed or None in needed else (min(r[0] for r in needed), max(r[1] for r in needed))
    return out


def _relayout_of_matched(values: list[np.ndarray], edges, ranges) -> bool:
    flat = np.sort(values[0], axis=None)
    return any(r is not None and other[0].size == flat.size and _close(flat, np.sort(other[0], axis=None))
               for other, r in zip(edges, ranges))


def _match_one(values: list[np.ndarray], onnx, by_shape, table) -> tuple[float, float] | None:
    cands = [n for n in by_shape.get(values[0].shape, [])
             if all(_close(v, img[n]) for v, img in zip(values, onnx))]
    found = {table[n] for n in cands}
    if not found:
        return None
    lo, hi = min(r[0] for r in found), max(r[1] for r in found)
    agree = all(np.isclose(r[0], lo, rtol=1e-6, atol=1e-12) and np.isclose(r[1], hi, rtol=1e-6, atol=1e-12)
                for r in found)
    return (lo, hi) if agree else None


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Same values up to float rounding, relative to the tensor's own scale (untrained nets carry
    activations of 1e-10 and less, so no absolute floor)."""
    return a.shape == b.shape and float(np.max(np.abs(a - b), initial=0.0)) <= MATCH_RTOL * float(
        np.max(np.abs(b), initial=0.0))


def own_ranges(gm, observers: dict[str, Any], inputs, calib: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Our calibrator (two passes: min/max, then a histogram) on the PT2E graph's tensors."""
    from edge_compress.quant.calibrators import TensorStats, compute_range

    stats = {k: TensorStats() for k in observers}
    for first_pass in (True, False):   # pass 1 fixes each tensor's min/max, pass 2 fills the histogram on it
        for k, per_image in observed_values(gm, observers, inputs).items():
            for v in (v for tensors in per_image for v in tensors):
                if first_pass:
                    stats[k].observe_range(v)
                else:
                    stats[k].observe_hist(v, calib["bins"])
    return {k: compute_range(s, calib["calibrator"], calib["bins"], calib["percentile"]) for k, s in stats.items()}


def table_ranges(gm, source: ExportSource, calib: dict[str, Any]):
    """Every activation observer's range: the shared table's where the tensor maps, ours elsewhere."""
    observers = activation_observers(gm)
    images = source.calibration_inputs[:MATCH_IMAGES]
    matched = match_observers(observed_values(gm, observers, images), onnx_values(source.fp32_onnx, images),
                              source.calibration)
    ranges = {k: r for k, r in matched.items() if r is not None}
    unmatched = {k: observers[k] for k, r in matched.items() if r is None}
    if unmatched:
        ranges.update(own_ranges(gm, unmatched, source.calibration_inputs, calib))
    report = {"activation_ranges": {
        "observers": len(observers), "from_shared_table": len(observers) - len(unmatched),
        "from_own_calibrator": len(unmatched), "own_calibrator": calib if unmatched else None,
        "own_calibrator_tensors": [_describe(gm, k) for k in sorted(unmatched)],
        "matching": f"PT2E observer tensors paired with fp32-ONNX tensors by value on {len(images)} calibration "
                    f"image(s) (max abs diff <= {MATCH_RTOL:g} x max abs)"}}
    return ranges, report


def _describe(gm, observer: str) -> str:
    """``module path (aten op)`` of the tensor an observer first sees, for the manifest."""
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == observer)
    src = node.args[0]
    return f"{_module_of(src) or src.name} ({str(src.target) if src.op == 'call_function' else src.op})"


def set_observer_ranges(gm, ranges: dict[str, tuple[float, float]]) -> None:
    observers = dict(gm.named_modules())
    for name, (lo, hi) in ranges.items():
        obs = observers[name]
        obs.min_val.fill_(min(float(lo), 0.0))
        obs.max_val.fill_(max(float(hi), 0.0))
