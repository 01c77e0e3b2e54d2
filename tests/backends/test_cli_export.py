"""CLI round trip: train -> export (with mAP) -> run -> eval through the artifact; bad input exits 2."""

import json
import shutil

import pytest

from edge_compress.artifact import MANIFEST, sha256_file
from edge_compress.cli.main import main
from edge_compress.pipeline import open_split

LOW = 1e-4  # one epoch of training leaves every score near 1e-3


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tiny_synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "art"
    assert main(["export", str(tiny_checkpoint), "--backend", "onnxruntime", "--out", str(out),
                 "--data", str(tiny_synth)]) == 0
    return out


def test_export_records_source_hash_and_map(exported, tiny_checkpoint):
    m = json.loads((exported / MANIFEST).read_text())
    assert m["source_model_sha256"] == sha256_file(tiny_checkpoint)
    assert m["metrics"]["map"]["num_images"] == 8 and 0.0 <= m["metrics"]["map"]["ap"] <= 1.0


def test_eval_artifact_matches_checkpoint(exported, tiny_checkpoint, tiny_synth, tmp_path, capsys):
    assert main(["eval", str(tiny_checkpoint), "--data", str(tiny_synth), "--json", str(tmp_path / "t.json")]) == 0
    assert main(["eval", str(exported), "--data", str(tiny_synth), "--json", str(tmp_path / "o.json")]) == 0
    via_torch = json.loads((tmp_path / "t.json").read_text())
    via_ort = json.loads((tmp_path / "o.json").read_text())
    assert via_ort["num_images"] == via_torch["num_images"] == 8
    assert via_ort["num_detections"] == via_torch["num_detections"]
    for key in ("ap", "ap50", "ar100"):
        assert via_ort[key] == pytest.approx(via_torch[key], abs=1e-3)
    manifest_map = json.loads((exported / MANIFEST).read_text())["metrics"]["map"]
    assert via_ort["ap"] == pytest.approx(manifest_map["ap"], abs=1e-9)
    assert via_ort["num_detections"] == manifest_map["num_detections"]


def test_runtime_detections_match_torch(exported, tiny_checkpoint, tiny_synth):
    """Beyond mAP (zero after one epoch, scores ~1e-3): the same boxes and scores image by image,
    at a threshold low enough to keep hundreds of detections."""
    import numpy as np

    from edge_compress.artifact import load_artifact
    from edge_compress.eval.runner import predict_dataset, torch_predictor
    from edge_compress.runtime import artifact_predictor, open_runner
    from edge_compress.train import load_detector

    ds = open_split(tiny_synth, "val", (64, 64))
    art = load_artifact(exported)
    a = predict_dataset(torch_predictor(load_detector(tiny_checkpoint), score_thresh=LOW), ds)
    b = predict_dataset(artifact_predictor(art, open_runner(art), score_thresh=LOW), ds)
    assert a.keys() == b.keys() and sum(len(d) for d in a.values()) > 0
    for k in a:
        assert len(a[k]) == len(b[k])
        # Scores this low tie to within float noise, so the two runtimes may list tied detections in
        # another order: pair each torch detection with the same-label runtime detection nearest to it.
        cost = np.abs(a[k].boxes[:, None, :] - b[k].boxes[None, :, :]).max(-1)
        cost += np.abs(a[k].scores[:, None] - b[k].scores[None, :]) * 100
        cost[a[k].labels[:, None] != b[k].labels[None, :]] = np.inf
        match = cost.argmin(1)
        assert len(set(match.tolist())) == len(match), "two torch detections paired with one runtime detection"
        np.testing.assert_allclose(a[k].boxes, b[k].boxes[match], atol=1e-2)
        np.testing.assert_allclose(a[k].scores, b[k].scores[match], atol=1e-4)
        np.testing.assert_array_equal(a[k].labels, b[k].labels[match])


def test_run_writes_json_and_drawn_image(exported, tiny_synth, tmp_path, capsys):
    images = sorted((tiny_synth / "images" / "val").iterdir())[:2]
    out = tmp_path / "det"
    assert main(["run", str(exported), *map(str, images), "--out-dir", str(out), "--score-thresh", str(LOW)]) == 0
    from PIL import Image

    doc_labels = json.loads((exported / MANIFEST).read_text())["class_names"]
    n_dets = 0
    for img in images:
        doc = json.loads((out / f"{img.stem}.json").read_text())
        w, h = Image.open(img).size
        assert (doc["width"], doc["height"]) == (w, h)
        for d in doc["detections"]:
            x1, y1, x2, y2 = d["box_xyxy"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
            assert doc_labels[d["class_id"]] == d["label"]
        n_dets += len(doc["detections"])
        with Image.open(out / f"{img.stem}.png") as drawn:
            assert drawn.size == (w, h)
    assert n_dets > 0


def test_unknown_backend_lists_choices(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", str(tiny_checkpoint), "--backend", "tensorrtx", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'tensorrtx'" in err and "onnxruntime" in err
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_existing_target(exported, tiny_checkpoint, capsys):
    before = sha256_file(exported / MANIFEST)
    assert main(["export", str(tiny_checkpoint), "--backend", "onnxruntime", "--out", str(exported)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sha256_file(exported / MANIFEST) == before


def test_tampered_and_truncated_artifacts_exit_2(exported, tiny_synth, tmp_path, capsys):
    image = sorted((tiny_synth / "images" / "val").iterdir())[0]
    bad = shutil.copytree(exported, tmp_path / "bad")
    onnx_file = bad / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])  # truncated, manifest hash now stale
    assert main(["run", str(bad), str(image), "--out-dir", str(tmp_path / "o1")]) == 2
    assert "sha256 of 'model.onnx' no longer matches" in capsys.readouterr().err
    assert main(["eval", str(bad), "--data", str(tiny_synth)]) == 2
    assert "no longer matches" in capsys.readouterr().err

    # the same truncated file with its hash "fixed up": the runtime refuses it clearly
    m = json.loads((bad / MANIFEST).read_text())
    m["files"]["model.onnx"] = sha256_file(onnx_file)
    (bad / MANIFEST).write_text(json.dumps(m))
    assert main(["run", str(bad), str(image), "--out-dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "Traceback" not in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_bad_image_writes_nothing(exported, tmp_path, capsys):
    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image")
    assert main(["run", str(exported), str(fake), "--out-dir", str(tmp_path / "o")]) == 2
    assert "cannot be decoded" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_of_export_and_run(capsys):
    for argv in (["export", "--help"], ["run", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: edge-compress" in out
    assert "ARTIFACT" in out  # eval takes a checkpoint or an artifact
