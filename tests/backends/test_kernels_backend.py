"""The 'kernels' backend through the shared export flow: fp32, int8 (the flow's calibration), a per-layer
lowering (sparse), per-op profile, and clear errors for tampered artifacts and misplaced options."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge_compress.backends import get_backend
from edge_compress.data.transforms import normalize
from edge_compress.errors import ArtifactError, ConfigError
from edge_compress.export import FP32_REL_TOL, export_model, relative_error, sqnr_db
from edge_compress.quant import QuantConfig
from edge_compress.train import load_detector

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "conformance"


@pytest.fixture(scope="module")
def val_inputs(synth128):
    from edge_compress.pipeline import open_split

    ds = open_split(synth128, "val", (128, 128))
    spec = load_detector(ASSETS / "yolo_tiny.pt").input_spec
    return np.concatenate([normalize(np.asarray(ds[i][0])[None], spec) for i in range(4)])


def torch_out(model, x):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def test_fp32_export_runs_and_profiles(tmp_path, val_inputs):
    model = load_detector(ASSETS / "picodet_s.pt")
    art = export_model(model, "kernels", tmp_path / "art")
    assert {"graph.json", "weights.npz", "manifest.json"} <= {p.name for p in art.path.iterdir()}
    m = art.manifest
    assert m["backend"]["name"] == "kernels" and "numba" in m["backend"]["runtime_version"]
    assert set(m["precision"].values()) == {"fp32"} and len(m["precision"]) == 118   # one entry per Conv node
    assert m["validation"]["rel_error"] <= FP32_REL_TOL and m["lowering"]["config"]["default"] == "fp32"
    be = get_backend("kernels")
    out = be.load(art.path)(val_inputs)                     # a batch of 4 on a batch-1 graph
    assert relative_error(torch_out(model, val_inputs), out) <= FP32_REL_TOL
    timings = be.profile_layers(art.path, val_inputs[:1], repeats=3, warmup=1)
    graph = json.loads((art.path / "graph.json").read_text())
    assert [t.name for t in timings] == [op["name"] for op in graph["ops"]]
    assert all(t.median_us > 0 and t.samples == 3 for t in timings)
    assert set(m["precision"]) <= {t.name for t in timings if t.op_type == "conv"}

    # `profile --device local` (the repository's devices.yaml) takes it as it takes the other backends' artifacts
    from edge_compress.cli.main import main

    store = tmp_path / "profiles"
    devices = Path(__file__).resolve().parents[2] / "devices.yaml"
    assert main(["profile", str(art.path), "--device", "local", "--devices", str(devices),
                 "--store", str(store), "--warmup", "1", "--max-seconds", "0.2", "--max-repeats", "20"]) == 0
    (record,) = store.glob("local/kernels/*/*.json")
    per_layer = json.loads(record.read_text())["per_layer"]
    assert {r["name"] for r in per_layer["layers"]} == {op["name"] for op in graph["ops"]}


def test_int8_export_uses_the_flow_calibration(tmp_path, synth128, val_inputs):
    model = load_detector(ASSETS / "ssdlite_mbv3.pt")
    art = export_model(model, "kernels", tmp_path / "art", quant=QuantConfig(num_images=16), data=synth128)
    m = art.manifest
    assert m["validation"]["sqnr_db"] >= 20.0
    precisions = list(m["precision"].values())
    assert precisions.count("int8") >= 0.8 * len(precisions)
    # the head's output convs stay fp32, as in the QDQ graph every other backend gets
    assert precisions.count("fp32") == len(m["quantization"]["kept_fp32"]) > 0
    out = get_backend("kernels").load(art.path)(val_inputs)
    assert sqnr_db(torch_out(model, val_inputs), out) >= 20.0


def test_lowering_reaches_the_backend(tmp_path, val_inputs):
    model = load_detector(ASSETS / "yolo_tiny.pt")
    name = next(n for n, c in model.named_modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)
                and c.in_channels >= 16)
    w = dict(model.named_modules())[name].weight
    with torch.no_grad():
        w[w.abs() < w.abs().flatten().quantile(0.9)] = 0
    art = export_model(model, "kernels", tmp_path / "art", lowering={"layers": {name: "sparse_csr"}})
    prec = art.manifest["precision"]
    assert sorted(prec.values()).count("sparse_csr") == 1 and art.manifest["lowering"]["config"]["layers"] == {
        name: "sparse_csr"}
    out = get_backend("kernels").load(art.path)(val_inputs)
    assert relative_error(torch_out(model, val_inputs), out) <= FP32_REL_TOL


def test_misplaced_or_impossible_lowering_is_refused(tmp_path):
    model = load_detector(ASSETS / "yolo_tiny.pt")
    with pytest.raises(ConfigError, match="for the 'kernels' backend, not 'onnxruntime'"):
        export_model(model, "onnxruntime", tmp_path / "a", lowering={"default": "int8"})
    with pytest.raises(ConfigError, match="int8 layers need activation ranges"):
        export_model(model, "kernels", tmp_path / "b", lowering={"default": "int8"})
    with pytest.raises(ConfigError, match="unknown lowering setting"):
        export_model(model, "kernels", tmp_path / "c", lowering={"layer": {}})
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_tampered_artifact_fails_to_load(tmp_path):
    art = export_model(load_detector(ASSETS / "yolo_tiny.pt"), "kernels", tmp_path / "art")
    # the device side: loading and running the artifact imports neither torch nor onnx
    code = ("import sys; sys.modules.update(torch=None, onnx=None, onnxruntime=None); import numpy as np; "
            "from edge_compress.backends import get_backend; "
            f"r = get_backend('kernels').load(r'{art.path}'); print(r(np.zeros((1, 3, 128, 128), np.float32)).shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    g = art.path / "graph.json"
    g.write_text(g.read_text().replace('"leaky_relu"', '"leaky"', 1))
    with pytest.raises(ArtifactError, match="unknown type 'leaky'"):
        get_backend("kernels").load(art.path)


def test_cli_exports_a_masked_checkpoint_with_its_zeros_lowered_sparse(tmp_path):
    """A magnitude-pruned compressed checkpoint (masks still attached) exported with `--lower sparse_csr`:
    the pruned convs run on the CSR kernel; a malformed --lower-layer is a one-line error."""
    from edge_compress.compress.checkpoint import AppliedStep, save_compressed
    from edge_compress.compress.sparsity import SparsityConfig, masks, prune_unstructured

    model = load_detector(ASSETS / "yolo_tiny.pt")
    report = prune_unstructured(model, SparsityConfig(method="magnitude", sparsity=0.8)).to_dict()
    ckpt = tmp_path / "sparse.pt"
    save_compressed(ckpt, model, [AppliedStep("magnitude", {"method": "magnitude", "sparsity": 0.8}, report["plan"])])
    cli = [sys.executable, "-m", "edge_compress.cli.main", "export", str(ckpt), "--backend", "kernels"]
    done = subprocess.run(cli + ["--out", str(tmp_path / "art"), "--lower", "sparse_csr"], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    precision = json.loads((tmp_path / "art" / "manifest.json").read_text())["precision"]
    assert sum(p == "sparse_csr" for p in precision.values()) == len(masks(model)) > 0
    bad = subprocess.run(cli + ["--out", str(tmp_path / "bad"), "--lower-layer", "backbone"], capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "must be LAYER=CHOICE" in bad.stderr and not (tmp_path / "bad").exists()


def test_cli_int8_lowering_without_calibration_names_the_flag(tmp_path):
    """`--lower int8` (or `--lower-layer L=int8`) without `--int8` has no activation ranges: a one-line error
    naming the flag that calibrates them, nothing written."""
    cli = [sys.executable, "-m", "edge_compress.cli.main", "export", str(ASSETS / "yolo_tiny.pt"), "--backend",
           "kernels"]
    for extra in (["--lower", "int8"], ["--lower-layer", "backbone.stem.0.conv=int8"]):
        done = subprocess.run(cli + ["--out", str(tmp_path / "art"), *extra], capture_output=True, text=True)
        assert done.returncode == 2 and "add --int8" in done.stderr, done.stderr
        assert not (tmp_path / "art").exists()
