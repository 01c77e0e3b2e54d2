"""OpenVINO fp32: every zoo family converts to IR and matches torch; per-layer profile; CLI round trip."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch

ov = pytest.importorskip("openvino")

from edge_compress.artifact import MANIFEST, sha256_file  # noqa: E402
from edge_compress.backends import get_backend  # noqa: E402
from edge_compress.cli.main import main  # noqa: E402
from edge_compress.errors import ArtifactError, ConfigError  # noqa: E402
from edge_compress.export import FP32_REL_TOL, export_model, relative_error  # noqa: E402
from edge_compress.models import create_detector  # noqa: E402

FAMILIES = ["yolo_tiny", "picodet_s", "ssdlite_mbv2", "ssdlite_mbv3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_exports_and_matches_torch(name, tmp_path):
    torch.manual_seed(1)
    model = create_detector(name, num_classes=5, input_size=64).eval()
    # The zoo's init keeps the output convs small (prior-probability bias init), so an untrained
    # detector's outputs hardly depend on the image: its image-dependent part sits at float32
    # rounding level (1e-4 against outputs of ~5) and no tolerance can check it. Kaiming weights
    # everywhere make the outputs really depend on the input.
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    art = export_model(model, "openvino", tmp_path / "art")

    m = art.manifest
    assert m["backend"] == {"name": "openvino", "runtime_version": ov.get_version()}
    assert m["model_file"] == "model.xml"
    assert sorted(m["files"]) == ["model.bin", "model.xml"]  # the intermediate ONNX is not kept
    assert sorted(p.name for p in art.path.iterdir()) == [MANIFEST, "model.bin", "model.xml"]
    assert m["metrics"]["model_bytes"] == sum((art.path / f).stat().st_size for f in m["files"])
    assert m["validation"]["rel_error"] <= FP32_REL_TOL

    # an input independent of the export's own validation input, batch of 2 (run image by image)
    x = np.random.default_rng(7).random((2, 3, 64, 64), dtype=np.float32) * 2 - 0.5
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = get_backend("openvino").load(art.path)(x)
    assert out.shape == ref.shape == (2, len(model.priors()), model.post.channels)
    assert relative_error(ref, out) <= FP32_REL_TOL
    # the part that depends on the input: a few percent of the outputs here, 1e5 times rounding noise
    assert np.abs(ref[1] - ref[0]).max() > 0.01 * np.abs(ref).max()
    assert relative_error(ref[1] - ref[0], out[1] - out[0]) <= FP32_REL_TOL

    # one precision entry per conv of the IR (depthwise ones are GroupConvolution), all fp32
    ir = ov.Core().read_model(str(art.path / "model.xml"))
    convs = [op.get_friendly_name() for op in ir.get_ordered_ops()
             if op.get_type_name() in ("Convolution", "GroupConvolution")]
    assert len(convs) == sum(isinstance(mod, torch.nn.Conv2d) for mod in model.modules())
    assert set(m["precision"]) == set(convs) and set(m["precision"].values()) == {"fp32"}


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = create_detector("ssdlite_mbv2", num_classes=3, input_size=64).eval()
    return export_model(model, "openvino", tmp_path_factory.mktemp("ov") / "art")


def test_real_profile_of_an_exported_detector(small_artifact):
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    timings = get_backend("openvino").profile_layers(small_artifact.path, x, repeats=5, warmup=2)
    odd = [t for t in timings if t.samples != 5 or t.median_us < 0]
    assert timings and not odd, odd
    convs = [t for t in timings if t.op_type in ("Convolution", "GroupConvolution")]
    assert convs and all(t.median_us > 0 for t in convs)
    assert {t.name for t in convs} <= set(small_artifact.manifest["precision"])  # IR names, not invented ones
    with pytest.raises(ConfigError, match="repeats"):
        get_backend("openvino").profile_layers(small_artifact.path, x, repeats=0)


@pytest.mark.parametrize("victim", ["model.xml", "model.bin"])
def test_truncated_ir_is_a_clear_error(small_artifact, tmp_path, victim):
    bad = shutil.copytree(small_artifact.path, tmp_path / "bad")
    (bad / victim).write_bytes((bad / victim).read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        get_backend("openvino").load(bad)
    (bad / "model.bin").unlink()
    with pytest.raises(ArtifactError, match="do not exist"):
        get_backend("openvino").load(bad)


def test_cli_export_then_eval(tiny_checkpoint, tiny_synth, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["export", str(tiny_checkpoint), "--backend", "openvino", "--out", str(out),
                 "--data", str(tiny_synth)]) == 0
    m = json.loads((out / MANIFEST).read_text())
    assert m["backend"]["name"] == "openvino" and m["source_model_sha256"] == sha256_file(tiny_checkpoint)
    assert main(["eval", str(tiny_checkpoint), "--data", str(tiny_synth), "--json", str(tmp_path / "t.json")]) == 0
    assert main(["eval", str(out), "--data", str(tiny_synth), "--json", str(tmp_path / "o.json")]) == 0
    via_torch = json.loads((tmp_path / "t.json").read_text())
    via_ov = json.loads((tmp_path / "o.json").read_text())
    assert via_ov["num_images"] == via_torch["num_images"] == 8
    assert via_ov["num_detections"] == via_torch["num_detections"] == m["metrics"]["map"]["num_detections"]
    for key in ("ap", "ap50", "ar100"):
        assert via_ov[key] == pytest.approx(via_torch[key], abs=1e-3)
    assert via_ov["ap"] == pytest.approx(m["metrics"]["map"]["ap"], abs=1e-9)


def test_missing_openvino_says_how_to_install(monkeypatch):
    from edge_compress.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "openvino", None)  # import now fails as if not installed
    ok, why = get_backend("openvino", require_available=False).available()
    assert not ok and "pip install 'edge-compress[openvino]'" in why
    with pytest.raises(BackendUnavailableError, match=r"pip install 'edge-compress\[openvino\]'"):
        get_backend("openvino")


def test_compiled_models_leave_the_threads_signal_stack_as_they_found_it(tmp_path):
    """OpenVINO's CPU plugin sets an alternate signal stack of its own when it compiles a model and
    puts back the one it saw when that model is destroyed; two compiled models freed in the order they
    were made (an int8 export times fp32 and int8 side by side) leave the thread on the first one's
    freed stack, and the next signal taken there (SIGCHLD from a DataLoader worker) killed the test
    suite. The runner keeps the thread's stack. Fresh interpreter with faulthandler on, as under pytest."""
    import subprocess
    from pathlib import Path

    from edge_compress.train import load_detector

    assets = Path(__file__).resolve().parents[1] / "assets" / "conformance"
    art = export_model(load_detector(assets / "yolo_tiny.pt"), "openvino", tmp_path / "art")
    script = (
        "import faulthandler, gc, sys\n"
        "faulthandler.enable()\n"
        "from edge_compress.sigstack import current_signal_stack\n"
        "from edge_compress.backends import get_backend\n"
        "before = current_signal_stack()\n"
        "a = get_backend('openvino').load(sys.argv[1])\n"
        "b = get_backend('openvino').load(sys.argv[1])\n"
        "del a; gc.collect()\n"
        "del b; gc.collect()\n"
        "print('same' if current_signal_stack() == before else f'changed {before} -> {current_signal_stack()}')\n")
    done = subprocess.run([sys.executable, "-c", script, str(art.path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if "None" in done.stdout:
        pytest.skip("sigaltstack is not readable on this platform")
    assert done.stdout.strip() == "same"


def test_perf_counts_skipped_in_some_runs_count_zero():
    """Fused nodes (NOT_RUN in every run) are left out; a reorder the plugin skips in some runs counts
    0 us there (seen here: a head Reorder ran in 2 of 5 runs), duplicates in one run add up."""
    from datetime import timedelta
    from types import SimpleNamespace

    from edge_compress.backends.ov import perf_counts_to_timings

    def info(name, op, us, status="Status.EXECUTED"):
        return SimpleNamespace(node_name=name, node_type=op, real_time=timedelta(microseconds=us), status=status)

    runs = [[info("conv", "Convolution", 10), info("reorder", "Reorder", 4), info("relu", "Relu", 0, "Status.NOT_RUN")],
            [info("conv", "Convolution", 12), info("relu", "Relu", 0, "Status.NOT_RUN")],
            [info("conv", "Convolution", 5), info("conv", "Convolution", 6), info("reorder", "Reorder", 6)]]
    got = [(t.name, t.op_type, t.median_us, t.samples) for t in perf_counts_to_timings(runs)]
    assert got == [("conv", "Convolution", 11.0, 3), ("reorder", "Reorder", 4.0, 3)]
