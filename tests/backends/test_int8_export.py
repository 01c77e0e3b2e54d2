"""int8 export flow: what the manifest records, the loud slower-int8 warning, and refusals."""

import json
import shutil
from pathlib import Path

import pytest

import edge_compress.export as export_mod
from edge_compress.artifact import load_artifact
from edge_compress.cli.main import main
from edge_compress.errors import ConfigError, DataError, ExportValidationError, UnknownNameError
from edge_compress.export import Int8SlowerWarning, export_model
from edge_compress.quant import QuantConfig
from edge_compress.train import load_detector

ASSET = Path(__file__).resolve().parents[1] / "assets" / "conformance" / "yolo_tiny.pt"


@pytest.fixture(scope="module")
def data(synth128):
    return synth128


@pytest.fixture(scope="module")
def int8_artifact(data, tmp_path_factory):
    return export_model(load_detector(ASSET), "onnxruntime", tmp_path_factory.mktemp("a") / "art",
                        quant=QuantConfig(num_images=12, calibrator="mse"), data=data)


def test_manifest_records_quantization_validation_and_both_maps(int8_artifact):
    m = int8_artifact.manifest
    q = m["quantization"]
    assert q["config"]["calibrator"] == "mse" and q["calibration_images"] == 12
    assert q["calibration_split"] == "instances_train.json"
    assert q["kept_fp32"] == ["/head/pred16/Conv", "/head/pred32/Conv"]    # the output convs, by default
    assert "uint8 asymmetric" in q["activations"] and "per output channel" in q["weights"]
    table = json.loads((int8_artifact.path / q["calibration_file"]).read_text())
    assert table["num_images"] == 12 and "images" in table["ranges"]
    assert q["calibration_file"] in m["files"]                              # hashed like every file
    prec = m["precision"]
    assert sorted(k for k, v in prec.items() if v == "fp32") == q["kept_fp32"]
    assert m["validation"]["sqnr_db"] >= 20 and m["validation"]["passed"]
    lat = m["metrics"]["latency_check"]
    assert lat["int8_p50_ms"] > 0 and lat["fp32_p50_ms"] > 0 and lat["threads"] == 1
    assert 0 <= m["metrics"]["map"]["ap"] <= 1 and 0 <= m["metrics"]["map_fp32"]["ap"] <= 1
    assert m["metrics"]["map_delta_points"] == pytest.approx(
        100 * (m["metrics"]["map_fp32"]["ap"] - m["metrics"]["map"]["ap"]))
    assert isinstance(m["warnings"], list)


def test_a_slower_int8_is_reported_loudly_and_recorded(data, tmp_path, monkeypatch, capsys):
    def slower(fp32, int8, x, threads, **kw):
        return {"device": "local", "threads": threads, "warmup": 0, "repeats": 1, "fp32_p50_ms": 1.0,
                "int8_p50_ms": 1.25, "int8_speedup": 0.8}

    monkeypatch.setattr(export_mod, "compare_latency", slower)
    with pytest.warns(Int8SlowerWarning, match="SLOWER than fp32 on onnxruntime"):
        art = export_model(load_detector(ASSET), "onnxruntime", tmp_path / "a", quant=QuantConfig(num_images=4),
                           data=data)
    assert art.manifest["warnings"] == [w for w in art.manifest["warnings"] if "x0.80" in w] != []
    assert main(["export", str(ASSET), "--backend", "onnxruntime", "--out", str(tmp_path / "b"), "--data", str(data),
                 "--int8", "--calib-images", "4"]) == 0
    assert "WARNING: int8 is SLOWER than fp32" in capsys.readouterr().err


def test_low_sqnr_refuses_and_writes_nothing(data, tmp_path):
    with pytest.raises(ExportValidationError, match=r"dB SQNR .*minimum 200 dB.*--calibrator"):
        export_model(load_detector(ASSET), "openvino", tmp_path / "a", quant=QuantConfig(num_images=4), data=data,
                     min_sqnr_db=200)
    assert list(tmp_path.iterdir()) == []


def test_refusals(data, tmp_path, capsys):
    model = load_detector(ASSET)
    with pytest.raises(ConfigError, match="needs a dataset to calibrate on"):
        export_model(model, "onnxruntime", tmp_path / "a", quant=QuantConfig())
    with pytest.raises(UnknownNameError, match="choose one of: litert, onnxruntime, openvino, tensorrt|choose one of"):
        export_model(model, "tflite", tmp_path / "a")
    with pytest.raises(ConfigError, match=r"\['head.nope'\] match no layer"):
        export_model(model, "onnxruntime", tmp_path / "a", quant=QuantConfig(num_images=2, keep_fp32=("head.nope",)),
                     data=data)
    assert main(["export", str(ASSET), "--backend", "onnxruntime", "--out", str(tmp_path / "b"),
                 "--calibrator", "mse"]) == 2
    assert "only apply to int8 exports: add --int8" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_empty_calibration_split_is_a_clear_error(data, tmp_path):
    empty = shutil.copytree(data, tmp_path / "data")
    ann = empty / "annotations" / "instances_train.json"
    d = json.loads(ann.read_text())
    d["images"], d["annotations"] = [], []
    ann.write_text(json.dumps(d))
    with pytest.raises(DataError, match="no images"):
        export_model(load_detector(ASSET), "onnxruntime", tmp_path / "a", quant=QuantConfig(num_images=4), data=empty)
    assert not (tmp_path / "a").exists()


def test_int8_artifact_evaluates_and_runs_through_the_cli(int8_artifact, data, tmp_path, capsys):
    assert main(["eval", str(int8_artifact.path), "--data", str(data)]) == 0
    assert "AP" in capsys.readouterr().out
    art = load_artifact(int8_artifact.path)
    assert art.manifest == int8_artifact.manifest
