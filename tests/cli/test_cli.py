"""The command line: clear one-line errors with exit status 2, nothing half-written."""

import json
import shutil

import pytest
from PIL import Image

from edge_compress.cli.main import main


def _err(capsys):
    return capsys.readouterr().err


def test_help_of_every_verb(capsys):
    for argv in (["--help"], ["data", "synth", "--help"], ["zoo", "summary", "--help"], ["train", "--help"],
                 ["eval", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "usage: edge-compress" in capsys.readouterr().out


def test_zoo_summary_prints_totals(capsys):
    assert main(["zoo", "summary", "yolo_tiny", "--num-classes", "8", "--json"]) == 0
    out = capsys.readouterr().out
    assert "GFLOPs at 320x320" in out
    row = json.loads(out.strip().splitlines()[-1])
    assert row["flops"] == 2 * row["macs"] and row["strides"] == [16, 32]


def test_unknown_model_lists_choices(capsys, tiny_synth, tmp_path):
    assert main(["train", "--model", "yolo_big", "--data", str(tiny_synth), "--out", str(tmp_path / "r")]) == 2
    err = _err(capsys)
    assert "unknown model 'yolo_big'" in err and "picodet_s" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_image_is_named(capsys, tiny_synth, tmp_path):
    data = _copy(tiny_synth, tmp_path / "d")
    victim = sorted((data / "images" / "train").iterdir())[0]
    victim.unlink()
    assert main(["train", "--model", "yolo_tiny", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--input-size", "64"]) == 2
    assert victim.name in _err(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("breakage,expect", [("category", "category_id"), ("box", "bbox")])
def test_unknown_category_and_negative_box_are_named(capsys, tiny_synth, tmp_path, breakage, expect):
    data = _copy(tiny_synth, tmp_path / breakage)
    ann = data / "annotations" / "instances_val.json"
    doc = json.loads(ann.read_text())
    if breakage == "category":
        doc["annotations"][0]["category_id"] = 999
    else:
        doc["annotations"][0]["bbox"][2] = -4.0
    ann.write_text(json.dumps(doc))
    assert main(["train", "--model", "yolo_tiny", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--input-size", "64"]) == 2
    err = _err(capsys)
    assert "instances_val.json" in err and expect in err
    assert not (tmp_path / "r").exists()


def test_wrong_channel_count_is_named(capsys, tiny_synth, tmp_path):
    data = _copy(tiny_synth, tmp_path / "gray")
    victim = sorted((data / "images" / "train").iterdir())[0]
    Image.open(victim).convert("L").save(victim)
    assert main(["train", "--model", "yolo_tiny", "--data", str(data), "--out", str(tmp_path / "r"),
                 "--input-size", "64", "--epochs", "1", "--batch-size", "8"]) == 2
    err = _err(capsys)
    assert victim.name in err and "RGB" in err


def test_synth_refuses_to_overwrite(capsys, tiny_synth):
    before = (tiny_synth / "annotations" / "instances_train.json").read_bytes()
    assert main(["data", "synth", "--out", str(tiny_synth), "--train", "2", "--val", "1", "--size", "64"]) == 2
    assert "overwrite" in _err(capsys)
    assert (tiny_synth / "annotations" / "instances_train.json").read_bytes() == before


def test_missing_checkpoint_and_bad_config(capsys, tiny_synth, tmp_path):
    assert main(["eval", str(tmp_path / "nope.pt"), "--data", str(tiny_synth)]) == 2
    assert "does not exist" in _err(capsys)
    cfg = tmp_path / "train.yaml"
    cfg.write_text("epochz: 3\n")
    assert main(["train", "--model", "yolo_tiny", "--data", str(tiny_synth), "--config", str(cfg),
                 "--out", str(tmp_path / "r"), "--input-size", "64"]) == 2
    assert "epochz" in _err(capsys)


def test_train_then_eval_round_trip(capsys, tiny_synth, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--model", "yolo_tiny", "--data", str(tiny_synth), "--out", str(out), "--input-size",
                 "64", "--width-mult", "0.25", "--epochs", "1", "--batch-size", "8", "--no-progress"]) == 0
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    capsys.readouterr()
    assert main(["eval", str(out / "best.pt"), "--data", str(tiny_synth), "--json", str(tmp_path / "m.json")]) == 0
    assert "AP50" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 8 and 0.0 <= metrics["ap50"] <= 1.0
