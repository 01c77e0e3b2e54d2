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
