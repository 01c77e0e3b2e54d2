"""External ONNX detectors: a decoded-in-graph model (Ultralytics layout) scores exactly like the zoo
model it was made from; mismatched files are refused with the reason."""

import numpy as np
import pytest
import torch

from edge_compress.artifact import load_artifact
from edge_compress.cli.main import main
from edge_compress.data.synth import CLASS_NAMES
from edge_compress.errors import ArtifactError, ConfigError
from edge_compress.export import export_model
from edge_compress.external import load_external
from edge_compress.models import create_detector
from edge_compress.models.postprocess import postprocess
from edge_compress.quant import QuantConfig
from edge_compress.runtime import artifact_predictor, open_runner
from edge_compress.train import load_detector


class DecodedYolo(torch.nn.Module):
    """A zoo yolo_tiny with the decode moved into the graph: ``(N, 4 + C, P)``, boxes x1, y1, x2, y2 in
    input pixels and class probabilities (the ``raw`` decoder, channels first)."""

    def __init__(self, det):
        super().__init__()
        self.det = det
        self.register_buffer("priors", torch.from_numpy(det._priors_np))

    def forward(self, x):
        raw, p = self.det(x), self.priors[None]
        cxy = p[..., :2] + (2 * raw[..., :2].sigmoid() - 1) * p[..., 4:5]
        wh = p[..., 2:4] * (2 * raw[..., 2:4].sigmoid()) ** 2
        scores = raw[..., 4:5].sigmoid() * raw[..., 5:].sigmoid()
        return torch.cat([cxy - wh / 2, cxy + wh / 2, scores], -1).transpose(1, 2)


class DecodedGfl(torch.nn.Module):
    """A zoo picodet with the DFL decode in the graph, Ultralytics YOLOv8 layout: ``(N, 4 + C, P)``,
    boxes cx, cy, w, h in input pixels, class probabilities (the ``yolo_af`` decoder)."""

    def __init__(self, det):
        super().__init__()
        self.det = det
        self.register_buffer("priors", torch.from_numpy(det._priors_np))

    def forward(self, x):
        raw, p, c, r = self.det(x), self.priors[None], self.det.post.num_classes, self.det.post.reg_max
        prob = raw[..., c:].reshape(*raw.shape[:2], 4, r + 1).softmax(-1)
        d = (prob * torch.arange(r + 1, dtype=torch.float32)).sum(-1) * p[..., 4:5]
        lt, rb = p[..., :2] - d[..., :2], p[..., :2] + d[..., 2:]
        return torch.cat([(lt + rb) / 2, rb - lt, raw[..., :c].sigmoid()], -1).transpose(1, 2)


def _export(module, path, size, dynamic=True):
    torch.onnx.export(module.eval(), (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}} if dynamic else None)
    return path


@pytest.fixture(scope="module")
def decoded(tiny_checkpoint, tmp_path_factory):
    det = load_detector(tiny_checkpoint)
    return det, _export(DecodedYolo(det), tmp_path_factory.mktemp("ext") / "yolov8like.onnx", 64)


def test_decoded_model_detects_exactly_like_the_zoo_model(decoded, tiny_synth, tmp_path):
    det, path = decoded
    ext = load_external(path, "raw", CLASS_NAMES, 64)
    assert ext.post.channels_first                       # inferred from the (1, 4 + C, P) output
    art = export_model(ext, "onnxruntime", tmp_path / "art", data=tiny_synth)
    m = art.manifest
    assert m["model"]["family"] == "external" and m["validation"]["rel_error"] <= 1e-5
    assert m["metrics"]["map"]["num_images"] == 8
    from edge_compress.models import summarize
    assert m["metrics"]["macs"] == summarize(det).macs   # the ONNX count agrees with the torch one
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 3, 64, 64), dtype=np.uint8)
    got = artifact_predictor(art, open_runner(art), 0.05)(images)
    with torch.no_grad():
        raw = det(torch.from_numpy(images.astype(np.float32) / 255)).numpy()
    want = postprocess(raw, det.post, det._priors_np, score_thresh=0.05)
    for g, w in zip(got, want):
        assert len(g) == len(w)
        np.testing.assert_allclose(g.boxes, w.boxes, atol=1e-3)
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-5)
        np.testing.assert_array_equal(g.labels, w.labels)


def test_anchor_free_decoder_decodes_like_the_zoo_gfl_head(tmp_path):
    from edge_compress.models.postprocess import decode
    torch.manual_seed(0)
    det = create_detector("picodet_xs", num_classes=4, input_size=64).eval()
    ext = load_external(_export(DecodedGfl(det), tmp_path / "v8.onnx", 64), "yolo_af", list("abcd"), 64)
    art = export_model(ext, "openvino", tmp_path / "art")
    x = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    got_boxes, got_scores = decode(open_runner(art)(x), art.post, np.zeros((84, 5)))
    with torch.no_grad():
        want_boxes, want_scores = decode(det(torch.from_numpy(x)).numpy(), det.post, det._priors_np)
    np.testing.assert_allclose(got_boxes, want_boxes, atol=1e-3)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)


def test_external_int8_on_openvino(decoded, tiny_synth, tmp_path):
    _, path = decoded
    ext = load_external(path, "raw", CLASS_NAMES, 64)
    art = export_model(ext, "openvino", tmp_path / "art", data=tiny_synth, quant=QuantConfig(num_images=8),
                       min_sqnr_db=0)
    m = art.manifest
    assert m["quantization"]["calibration_images"] == 8 and "int8" in set(m["precision"].values())
    assert np.isfinite(m["validation"]["sqnr_db"]) and "map" in m["metrics"] and "map_fp32" in m["metrics"]


def test_mismatched_files_are_refused(decoded, tmp_path):
    det, path = decoded
    with pytest.raises(ArtifactError, match=r"input 'images' has shape \('batch', 3, 64, 64\).*\(1, 3, 96, 96\)"):
        load_external(path, "raw", CLASS_NAMES, 96)
    with pytest.raises(ArtifactError, match="outputs 14 channels per box; decoder 'raw' with 3 classes needs 7"):
        load_external(path, "raw", CLASS_NAMES[:3], 64)
    with pytest.raises(ArtifactError, match="outputs 60 boxes; strides .8, 16, 32. at 64x64 give 84"):
        load_external(path, "yolo_af", CLASS_NAMES, 64)
    with pytest.raises(ConfigError, match="unknown decoder 'v8'"):
        load_external(path, "v8", CLASS_NAMES, 64)
    two = torch.nn.Conv2d(3, 4, 3)
    bad = _export(torch.nn.Sequential(two), tmp_path / "rank4.onnx", 64, dynamic=False)
    with pytest.raises(ArtifactError, match="outputs rank 4"):
        load_external(bad, "raw", ["a"], 64)
    (tmp_path / "cut.onnx").write_bytes(path.read_bytes()[:500])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        load_external(tmp_path / "cut.onnx", "yolo_af", CLASS_NAMES, 64)


def test_cli_exports_an_onnx_file(decoded, tmp_path, capsys):
    _, path = decoded
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASS_NAMES) + "\n")
    assert main(["export", str(path), "--backend", "onnxruntime", "--out", str(tmp_path / "a"),
                 "--decoder", "raw", "--classes", str(classes), "--input-size", "64"]) == 0
    assert load_artifact(tmp_path / "a").manifest["postprocess"]["head"] == "raw"
    assert main(["export", str(path), "--backend", "onnxruntime", "--out", str(tmp_path / "b")]) == 2
    assert "needs --decoder" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_zoo_model_is_unaffected_by_decoded_heads():
    m = create_detector("yolo_tiny", num_classes=3, input_size=64, width_mult=0.25)
    assert m.post.head == "yolo" and not m.post.channels_first
