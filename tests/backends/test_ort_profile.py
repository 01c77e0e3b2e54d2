"""ONNX Runtime per-layer profiling: the trace parser on ORT's format, and a real profiled run."""

import numpy as np
import pytest
import torch

from edge_compress.backends import get_backend
from edge_compress.backends.onnx_export import export_onnx
from edge_compress.backends.ort import parse_ort_profile
from edge_compress.errors import ConfigError
from edge_compress.models import create_detector


def _event(name, dur, op, index, cat="Node"):
    # the fields ONNX Runtime 1.32 writes for a node event (chrome trace format)
    return {"cat": cat, "pid": 1, "tid": 1, "dur": dur, "ts": 0, "ph": "X", "name": name,
            "args": {"op_name": op, "node_index": str(index), "provider": "CPUExecutionProvider"}}


def test_parser_drops_warmup_and_fences_and_takes_medians():
    events = [{"cat": "Session", "dur": 9999, "name": "model_loading_uri", "args": {}}]
    for run, scale in enumerate([100, 1, 3, 2]):  # run 0 is the warm-up
        events += [_event("/stem/Conv_fence_before", 0, "Conv", 0),
                   _event("/stem/Conv_kernel_time", 10 * scale, "Conv", 0),
                   _event("/stem/Conv_fence_after", 0, "Conv", 0),
                   _event("/head/Sigmoid_kernel_time", scale, "Sigmoid", 1)]
        events.append(_event("model_run", 12345, "", "", cat="Session"))
    got = parse_ort_profile(events, warmup=1)
    assert [(t.name, t.op_type, t.median_us, t.samples) for t in got] == [
        ("/stem/Conv", "Conv", 20.0, 3), ("/head/Sigmoid", "Sigmoid", 2.0, 3)]


def test_real_profile_of_an_exported_detector(tmp_path):
    torch.manual_seed(0)
    model = create_detector("ssdlite_mbv2", num_classes=3, input_size=64)
    ort_backend = get_backend("onnxruntime")
    export_onnx(model, tmp_path / "model.onnx")
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    timings = ort_backend.profile_layers(tmp_path, x, repeats=5, warmup=2)
    assert timings and all(t.samples == 5 and t.median_us >= 0 for t in timings)
    ops = {t.op_type for t in timings}
    assert any(op.startswith("Conv") or op == "FusedConv" for op in ops), ops
    assert sum(t.median_us for t in timings) > 0
    assert list(tmp_path.iterdir()) == [tmp_path / "model.onnx"]  # the trace file is not left behind
    with pytest.raises(ConfigError, match="repeats"):
        ort_backend.profile_layers(tmp_path, x, repeats=0)


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory):
    """A small yolo_tiny's fp32 ONNX, one input and its calibration table."""
    from edge_compress.quant import QuantConfig, calibrate

    torch.manual_seed(0)
    model = create_detector("yolo_tiny", num_classes=3, input_size=64, width_mult=0.25).eval()
    fp32 = export_onnx(model, tmp_path_factory.mktemp("ort_qdq") / "fp32.onnx")
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    return fp32, x, calibrate(fp32, [x], QuantConfig(calibrator="minmax"))


def test_a_conv_kept_in_fp32_runs_in_fp32_inside_an_int8_graph(tiny_fp32, tmp_path):
    """ONNX Runtime's WeightBiasQuantization would quantize the float weights of a conv between a
    DequantizeLinear and a QuantizeLinear and run it as QLinearConv; the runner turns it off, so a
    ``keep_fp32`` layer runs in float and every other conv in int8."""
    import onnx

    from edge_compress.quant.qdq import quantize_onnx

    fp32, x, table = tiny_fp32
    convs = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"]
    kept = convs[3]                                          # mid-backbone: DequantizeLinear in, QuantizeLinear out
    art = tmp_path / "art"
    art.mkdir()
    r = quantize_onnx(fp32, table, art / "model.onnx", keep_fp32=[kept])
    ops = [t.op_type for t in get_backend("onnxruntime").profile_layers(art, x, repeats=2, warmup=1)]
    assert ops.count("QLinearConv") == len(r.quantized) and len(r.quantized) < len(convs) - 1
    assert ops.count("Conv") + ops.count("FusedConv") == len(convs) - len(r.quantized)


def test_a_pool_left_float_runs_float(tiny_fp32, tmp_path):
    """A MaxPool the QDQ graph leaves float (it reads a float conv's output) stays float: ONNX Runtime's
    QDQPropagationTransformer would move the QuantizeLinear of the int8 conv it feeds above it, and run it on
    uint8 in NCHW, a slow kernel; the runner turns that optimizer off."""
    import json
    from pathlib import Path

    import onnx

    from edge_compress.backends.ort import OrtRunner
    from edge_compress.quant.qdq import float_neighbours, quantize_onnx

    fp32, x, table = tiny_fp32
    g = onnx.load(str(fp32))
    convs = [n.name for n in g.graph.node if n.op_type == "Conv"]
    kept = convs[2]                           # backbone.stage3.conv1: one input of the Concat before the pool
    pool = next(n.name for n in g.graph.node if n.op_type == "MaxPool" and "stage3" in n.name)
    assert pool in float_neighbours(g, {kept})
    quantize_onnx(fp32, table, tmp_path / "q.onnx", keep_fp32=[kept])
    runner = OrtRunner(tmp_path / "q.onnx", 1, profile_prefix=str(tmp_path / "trace"))
    runner(x)
    events = json.loads(Path(runner.session.end_profiling()).read_text())
    args = [e["args"] for e in events if e.get("cat") == "Node" and e["name"].startswith(pool)
            and e["args"].get("op_name") == "MaxPool"]
    assert args and {t for a in args for shape in a["input_type_shape"] for t in shape} == {"float"}
