"""Artifacts: a complete manifest, verified hashes, atomic and never overwritten, torch-free to run."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from edge_compress.artifact import MANIFEST, REQUIRED_KEYS, load_artifact, sha256_file
from edge_compress.backends import get_backend, list_backends
from edge_compress.backends.ort import OnnxRuntimeBackend
from edge_compress.errors import ArtifactError, BackendUnavailableError, ExportValidationError, UnknownNameError
from edge_compress.export import export_model, model_sha256
from edge_compress.models import InputSpec, PostProcessConfig, create_detector


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return create_detector("yolo_tiny", class_names=("cat", "dog"), input_size=64, width_mult=0.25).eval()


@pytest.fixture(scope="module")
def artifact(small_model, tmp_path_factory):
    return export_model(small_model, "onnxruntime", tmp_path_factory.mktemp("a") / "art")


def test_manifest_is_complete(artifact, small_model):
    m = json.loads((artifact.path / MANIFEST).read_text())
    assert set(REQUIRED_KEYS) <= set(m)
    assert m["backend"] == {"name": "onnxruntime", "runtime_version": get_backend("onnxruntime").runtime_version()}
    assert InputSpec.from_dict(m["input_spec"]) == small_model.input_spec
    assert PostProcessConfig.from_dict(m["postprocess"]) == small_model.post
    assert m["class_names"] == ["cat", "dog"]
    assert m["source_model_sha256"] == model_sha256(small_model)
    assert m["recipe"] == {"steps": []}
    assert m["files"] == {"model.onnx": sha256_file(artifact.path / "model.onnx")}
    assert m["metrics"]["params"] == sum(p.numel() for p in small_model.parameters())
    assert m["metrics"]["model_bytes"] == (artifact.path / "model.onnx").stat().st_size
    assert m["validation"]["passed"] and 0 <= m["validation"]["rel_error"] <= 1e-3
    assert sorted(p.name for p in artifact.path.iterdir()) == [MANIFEST, "model.onnx"]


def test_tampered_file_is_named(artifact, tmp_path):
    import shutil

    copy = shutil.copytree(artifact.path, tmp_path / "copy")
    load_artifact(copy)  # intact copy verifies
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"sha256 of 'model.onnx' no longer matches"):
        load_artifact(copy)


def test_existing_target_is_never_overwritten(artifact, small_model):
    before = sha256_file(artifact.path / MANIFEST)
    with pytest.raises(ArtifactError, match="already exists"):
        export_model(small_model, "onnxruntime", artifact.path)
    assert sha256_file(artifact.path / MANIFEST) == before


def test_failed_validation_writes_nothing(small_model, tmp_path, monkeypatch):
    real_load = OnnxRuntimeBackend.load

    def off_by_a_bit(self, artifact_dir, threads=1):
        runner = real_load(self, artifact_dir, threads)
        return lambda x: runner(x) * 1.01

    monkeypatch.setattr(OnnxRuntimeBackend, "load", off_by_a_bit)
    with pytest.raises(ExportValidationError, match="relative error"):
        export_model(small_model, "onnxruntime", tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_unknown_and_unavailable_backends(monkeypatch):
    with pytest.raises(UnknownNameError, match="unknown backend 'tensorrtx'.*onnxruntime"):
        get_backend("tensorrtx")
    assert "onnxruntime" in list_backends()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now fails as if not installed
    with pytest.raises(BackendUnavailableError, match=r"pip install 'edge-compress\[onnx\]'"):
        get_backend("onnxruntime")


@pytest.fixture(params=["onnxruntime", "openvino"])
def device_artifact(request, artifact, small_model, tmp_path_factory):
    if request.param == "onnxruntime":
        return artifact
    pytest.importorskip("openvino")
    return export_model(small_model, "openvino", tmp_path_factory.mktemp("ov") / "art")


def test_reading_and_running_an_artifact_imports_no_torch(device_artifact, small_model, tmp_path):
    """The device side: load + verify + run + post-process without torch in sys.modules."""
    artifact = device_artifact
    x = np.random.default_rng(3).random((1, 3, 64, 64), dtype=np.float32)
    with torch.no_grad():
        ref = small_model(torch.from_numpy(x)).numpy()
    script = f"""
import sys, numpy as np
from edge_compress.artifact import load_artifact
from edge_compress.runtime import artifact_predictor, open_runner, detect
art = load_artifact({str(artifact.path)!r})
runner = open_runner(art)
x = np.random.default_rng(3).random((1, 3, 64, 64), dtype=np.float32)
np.save(sys.argv[1], runner(x))
artifact_predictor(art, runner)(np.zeros((2, 3, 64, 64), np.uint8))
detect(art, runner, np.zeros((40, 90, 3), np.uint8))
from PIL import Image
from edge_compress.cli.main import main
Image.new("RGB", (90, 40)).save(sys.argv[2] + "/img.png")
assert main(["run", art.path.as_posix(), sys.argv[2] + "/img.png", "--out-dir", sys.argv[2] + "/det"]) == 0
assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))
print('no torch')
"""
    out = tmp_path / "raw.npy"
    work = tmp_path
    r = subprocess.run([sys.executable, "-c", script, str(out), str(work)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no torch" in r.stdout
    assert (work / "det" / "img.json").is_file() and (work / "det" / "img.png").is_file()
    got = np.load(out)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) <= 1e-3
