"""LiteRT (.tflite through ai-edge-litert): every zoo family exports at fp32 (matches torch) and at
full int8: int8 conv kernels, every activation scale taken from the shared calibration table, and so
the same SQNR as ONNX Runtime's int8 on the same table (requirement 4: backends differ by their
kernels, not by calibration). Bad files and external ONNX sources are refused clearly.

Timing: each family converts twice (fp32, int8) with litert-torch, 6-25 s each on two cores; the
SQNR >= 20 dB bar on trained weights is tests/backends/test_conformance.py's (the untrained families
here carry BatchNorm statistics of real images so their activations are realistic, but random
weights quantize at 15-25 dB on every backend; the trained tiny yolo_tiny checkpoint meets 20 dB)."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("ai_edge_litert")
pytest.importorskip("litert_torch")

from edge_compress.backends import ExportSource, get_backend  # noqa: E402
from edge_compress.backends.litert import activation_scales, weight_ops  # noqa: E402
from edge_compress.backends.litert import _from_tensor, _to_tensor  # noqa: E402
from edge_compress.backends.onnx_export import INPUT_NAME  # noqa: E402
from edge_compress.data.synth import CLASS_NAMES  # noqa: E402
from edge_compress.data.transforms import normalize  # noqa: E402
from edge_compress.errors import ArtifactError, BackendUnavailableError, ConfigError  # noqa: E402
from edge_compress.export import FP32_REL_TOL, INT8_MIN_SQNR_DB, export_model, relative_error, sqnr_db  # noqa: E402
from edge_compress.models import create_detector  # noqa: E402
from edge_compress.pipeline import open_split  # noqa: E402
from edge_compress.quant import QuantConfig  # noqa: E402
from edge_compress.train import load_detector  # noqa: E402

FAMILIES = ["yolo_tiny", "picodet_s", "ssdlite_mbv2", "ssdlite_mbv3"]


def _with_data_statistics(model, synth):
    """An untrained detector whose BatchNorm statistics come from real images: without this its
    default running stats shrink activations layer by layer to ~1e-10, where neither int8 nor an
    SQNR means anything."""
    ds = open_split(synth, "train", (64, 64))
    x = torch.from_numpy(np.concatenate([normalize(np.asarray(ds[i][0])[None], model.input_spec)
                                         for i in range(16)]))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None   # cumulative average over the batch
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tiny_checkpoint, tiny_synth, tmp_path_factory):
    """(model, fp32 artifact, int8 artifact) per family: yolo_tiny is the trained tiny checkpoint."""
    name = request.param
    if name == "yolo_tiny":
        model = load_detector(tiny_checkpoint).eval()
    else:
        torch.manual_seed(0)
        model = _with_data_statistics(create_detector(name, class_names=CLASS_NAMES, input_size=64), tiny_synth)
    out = tmp_path_factory.mktemp(f"litert_{name}")
    fp32 = export_model(model, "litert", out / "fp32")
    int8 = export_model(model, "litert", out / "int8", quant=QuantConfig(num_images=8), data=tiny_synth,
                        min_sqnr_db=0 if name != "yolo_tiny" else INT8_MIN_SQNR_DB)   # see the module docstring
    return model, fp32, int8


def test_fp32_matches_torch(exported, tiny_synth):
    model, art, _ = exported
    m = art.manifest
    assert m["backend"]["name"] == "litert" and m["model_file"] == "model.tflite"
    assert sorted(m["files"]) == ["model.tflite"]
    assert m["validation"]["rel_error"] <= FP32_REL_TOL

    # inputs independent of the export's own check: two validation images as a batch of 2 (the model
    # has batch 1: the runner goes image by image)
    ds = open_split(tiny_synth, "val", (64, 64))
    x = np.concatenate([normalize(np.asarray(ds[i][0])[None], model.input_spec) for i in (0, 1)])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    runner = get_backend("litert").load(art.path)
    out = runner(x)
    assert runner.input["shape"].tolist() == [1, 3, 64, 64]          # litert-torch keeps torch's NCHW
    assert out.shape == ref.shape == (2, len(model.priors()), model.post.channels)
    assert relative_error(ref, out) <= FP32_REL_TOL

    # one precision entry per Conv2d of the model (depthwise ones are DEPTHWISE_CONV_2D), all fp32
    ops = weight_ops(art.path / "model.tflite")
    assert len(ops) == sum(isinstance(mod, torch.nn.Conv2d) for mod in model.modules())
    assert len(m["precision"]) == len(ops) and set(m["precision"].values()) == {"fp32"}


def _val_images(model, synth, n=8):
    ds = open_split(synth, "val", (64, 64))
    return np.concatenate([normalize(np.asarray(ds[i][0])[None], model.input_spec) for i in range(n)])


def _ort_int8(model, table_file, tmp_path):
    """ONNX Runtime on the QDQ graph of the same calibration table (the export's QDQ defaults)."""
    from edge_compress.backends.onnx_export import export_onnx
    from edge_compress.backends.ort import OrtRunner
    from edge_compress.quant import CalibrationTable
    from edge_compress.quant.qdq import quantize_onnx

    table = CalibrationTable.from_dict(json.loads(table_file.read_text()))
    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    return OrtRunner(quantize_onnx(fp32, table, tmp_path / "int8.onnx").path)


def test_int8_is_full_integer_with_the_shared_scales(exported, tiny_synth, tmp_path):
    model, _, art = exported
    m, q = art.manifest, art.manifest["litert_int8"]

    # int8 conv kernels everywhere except the head's output convs, which stay float as in the QDQ graph
    convs = sum(isinstance(mod, torch.nn.Conv2d) for mod in model.modules())
    kept = m["quantization"]["kept_fp32"]
    assert len(q["float_convs"]) == len(kept) > 0
    assert list(m["precision"].values()).count("fp32") == len(kept)
    assert list(m["precision"].values()).count("int8") == convs - len(kept)

    # every PT2E activation observer took its range from the shared table
    ranges = q["activation_ranges"]
    assert ranges["from_shared_table"] == ranges["observers"] > 0 and ranges["from_own_calibrator"] == 0

    # ... and the .tflite carries those scales: scale = (hi - lo) / 255 of a table range, int8 zero
    # point = the uint8 one - 128; the graph input exactly so
    table_file = art.path / m["quantization"]["calibration_file"]
    table = json.loads(table_file.read_text())["ranges"]
    runner = get_backend("litert").load(art.path)
    assert runner.input["dtype"] == np.int8 and runner.output["dtype"] == np.float32
    lo, hi = table[INPUT_NAME]
    scale, zero = runner.input["quantization"]
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-5) and abs(zero - (round(-lo / scale) - 128)) <= 1
    table_scales = np.array([(b - a) / 255 for a, b in table.values()])
    scales = activation_scales(art.path / "model.tflite")
    from_table = [np.min(np.abs(table_scales - s)) <= 1e-5 * s for s, _ in scales.values()]
    assert len(scales) > 20 and np.mean(from_table) >= 0.95

    # same table, same accuracy: LiteRT's int8 SQNR is ONNX Runtime's to within 1 dB
    x = _val_images(model, tiny_synth)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    litert, ort = sqnr_db(ref, runner(x)), sqnr_db(ref, _ort_int8(model, table_file, tmp_path)(x))
    print(f"\n{model.name}: int8 SQNR litert {litert:.2f} dB, onnxruntime {ort:.2f} dB (export's check "
          f"{m['validation']['sqnr_db']:.2f} dB); fp32 rel err {exported[1].manifest['validation']['rel_error']:.2e}; "
          f"activation ranges from the table {ranges['from_shared_table']}/{ranges['observers']}, "
          f"tflite scales from the table {int(np.sum(from_table))}/{len(scales)}")
    assert abs(litert - ort) <= 1.0
    if model.name == "yolo_tiny":   # the trained checkpoint: the conformance bar
        assert m["validation"]["sqnr_db"] >= INT8_MIN_SQNR_DB and litert >= INT8_MIN_SQNR_DB


def test_unmatched_tensors_get_our_calibrator_on_the_same_images(tmp_path):
    """Tensors with no range in the table fall back to our calibrator (same method, same images) on
    the PT2E graph, which gives back the very range the table had."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from edge_compress.backends import litert
    from edge_compress.backends.onnx_export import export_onnx
    from edge_compress.quant import calibrate

    torch.manual_seed(0)
    model = create_detector("yolo_tiny", num_classes=2, input_size=32, width_mult=0.25).eval()
    onnx_path = export_onnx(model, tmp_path / "fp32.onnx")
    xs = tuple(np.random.default_rng(i).random((1, 3, 32, 32), dtype=np.float32) for i in range(4))
    config = QuantConfig(calibrator="percentile", num_images=4)
    table = calibrate(onnx_path, xs, config)
    dropped = [n for n in table.ranges if n.endswith("LeakyRelu_output_0")][:3]
    assert len(dropped) == 3
    source = ExportSource(onnx=onnx_path, fp32_onnx=onnx_path, precision="int8", model=model, calibration_inputs=xs,
                          calibration={k: v for k, v in table.ranges.items() if k not in dropped})
    gm = prepare_pt2e(torch.export.export(model, (torch.from_numpy(xs[0]),)).module(),
                      litert.make_quantizer(True, set()))
    calib = {"calibrator": config.calibrator, "bins": config.bins, "percentile": config.percentile}
    ranges, report = litert.table_ranges(gm, source, calib)
    r = report["activation_ranges"]
    assert r["from_own_calibrator"] == len(r["own_calibrator_tensors"]) == len(dropped)
    assert r["from_shared_table"] + r["from_own_calibrator"] == r["observers"]
    assert all("leaky_relu" in t for t in r["own_calibrator_tensors"]), r["own_calibrator_tensors"]
    observers = litert.activation_observers(gm)
    seen = litert.observed_values(gm, observers, xs[:2])
    own = [k for k, v in litert.match_observers(seen, litert.onnx_values(onnx_path, xs[:2]),
                                                source.calibration).items() if v is None]
    for name in dropped:   # each dropped range comes back from an observer calibrated by us
        lo, hi = table.ranges[name]
        tol = 2 * (hi - lo) / config.bins
        assert any(abs(ranges[o][0] - lo) <= tol and abs(ranges[o][1] - hi) <= tol for o in own), name


@pytest.fixture(scope="module")
def small_tflite(tiny_checkpoint, tmp_path_factory):
    """An fp32 artifact of the tiny checkpoint (its conversion is usually still cached from ``exported``)."""
    return export_model(load_detector(tiny_checkpoint), "litert", tmp_path_factory.mktemp("litert") / "art").path


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_tflite_is_a_clear_error(small_tflite, tmp_path, damage):
    bad = shutil.copytree(small_tflite, tmp_path / "bad")
    data = (bad / "model.tflite").read_bytes()
    (bad / "model.tflite").write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64 + data[64:])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        get_backend("litert").load(bad)
    (bad / "model.tflite").unlink()
    with pytest.raises(ArtifactError, match="does not exist"):
        get_backend("litert").load(bad)


def test_external_onnx_source_is_refused(tmp_path):
    from edge_compress.external import load_external

    class Raw(torch.nn.Module):   # a "decoded" detector as someone else's ONNX file: (1, P, 4 + C)
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 8, stride=8)

        def forward(self, x):
            return self.conv(x).flatten(2).transpose(1, 2).sigmoid()

    path = tmp_path / "ext.onnx"
    torch.onnx.export(Raw().eval(), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17)
    ext = load_external(path, "raw", ["a", "b"], 32)
    with pytest.raises(ConfigError, match="LiteRT export needs a zoo/torch model"):
        export_model(ext, "litert", tmp_path / "art")
    assert not (tmp_path / "art").exists()
    with pytest.raises(ConfigError, match="zoo/torch model"):
        get_backend("litert").export(ExportSource(onnx=path, fp32_onnx=path), tmp_path)


def test_no_per_op_profiler_says_where_to_profile(small_tflite):
    with pytest.raises(BackendUnavailableError, match="benchmark_model"):
        get_backend("litert").profile_layers(small_tflite, np.zeros((1, 3, 64, 64), np.float32))


def test_runner_quantizes_int8_inputs_and_handles_nhwc():
    x = np.random.default_rng(0).random((1, 3, 4, 5), dtype=np.float32)
    nchw = {"shape": np.array([1, 3, 4, 5]), "dtype": np.float32, "quantization": (0.0, 0)}
    assert np.array_equal(_to_tensor(x, nchw), x)
    nhwc = {**nchw, "shape": np.array([1, 4, 5, 3])}
    assert np.array_equal(_to_tensor(x, nhwc), x.transpose(0, 2, 3, 1))
    q = {**nchw, "dtype": np.int8, "quantization": (1 / 255, -128)}
    xq = _to_tensor(x, q)
    assert xq.dtype == np.int8 and np.abs(_from_tensor(xq, q) - x).max() <= 0.5 / 255 + 1e-7
    with pytest.raises(ConfigError, match="does not fit"):
        _to_tensor(x, {**nchw, "shape": np.array([1, 3, 8, 8])})


def test_missing_runtime_or_converter_says_how_to_install(monkeypatch, tmp_path):
    backend = get_backend("litert", require_available=False)
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    ok, why = backend.exporter_available()
    assert not ok and "pip install 'edge-compress[litert]'" in why
    model = create_detector("yolo_tiny", num_classes=2, input_size=32, width_mult=0.25)
    with pytest.raises(BackendUnavailableError, match=r"edge-compress\[litert\]"):
        backend.export(ExportSource(onnx=tmp_path / "x.onnx", fp32_onnx=tmp_path / "x.onnx", model=model), tmp_path)
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    ok, why = backend.available()
    assert not ok and "pip install 'edge-compress[litert]'" in why
    with pytest.raises(BackendUnavailableError, match=r"edge-compress\[litert\]"):
        get_backend("litert")
