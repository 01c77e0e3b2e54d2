"""`edge-compress compress` and `edge-compress sensitivity`: a recipe run end to end from a trained
checkpoint (table, checkpoint that eval reads), one-line errors with nothing written."""

import json

import pytest

from edge_compress.cli.main import main

RECIPE = """
name: cli
steps:
  - method: lowrank
    config: {energy: 0.7, min_channels: 4}
  - method: magnitude
    config: {sparsity: 0.5}
    finetune: {epochs: 1, batch_size: 12, warmup_iters: 1, ema: false}
    distill: {temperature: 2.0}
"""


def test_compress_runs_a_recipe_and_eval_reads_the_result(tiny_checkpoint, tiny_synth, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    assert main(["compress", "--model", str(tiny_checkpoint), "--data", str(tiny_synth), "--recipe", str(recipe),
                 "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    for stage in ("baseline", "0: lowrank", "1: magnitude", "1: finetune + distill", "GFLOPs", "AP50"):
        assert stage in text
    report = json.loads((out / "report.json").read_text())
    assert len(report["rows"]) == 4 and report["rows"][1]["params"] < report["rows"][0]["params"]
    assert main(["eval", str(out / "model.pt"), "--data", str(tiny_synth)]) == 0
    assert "AP" in capsys.readouterr().out


@pytest.mark.parametrize("text, match", [
    ("steps:\n  - {method: lowrank, confg: {}}", "step 0: unknown step key(s) ['confg']"),
    ("steps:\n  - {method: magnitude, config: {sparsity: 0.5}}\n  - {method: lowrank}",
     "put structural steps before masks"),
])
def test_bad_recipes_are_one_line_errors_and_write_nothing(tiny_checkpoint, tiny_synth, tmp_path, capsys, text,
                                                           match):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    code = main(["compress", "--model", str(tiny_checkpoint), "--data", str(tiny_synth), "--recipe", str(recipe),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and match in err and str(recipe) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_compress_refuses_an_existing_out(tiny_checkpoint, tiny_synth, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    (tmp_path / "out").mkdir()
    assert main(["compress", "--model", str(tiny_checkpoint), "--data", str(tiny_synth), "--recipe", str(recipe),
                 "--out", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_sensitivity_writes_json(tiny_checkpoint, tiny_synth, tmp_path, capsys):
    out = tmp_path / "sens.json"
    assert main(["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_synth), "--out", str(out),
                 "--prune-ratios", "--bits", "8", "4", "--layers", "backbone.stem.1.conv", "neck.p4.conv",
                 "--max-images", "4"]) == 0
    d = json.loads(out.read_text())
    assert set(d["layers"]) == {"backbone.stem.1.conv", "neck.p4.conv"}
    assert set(d["layers"]["neck.p4.conv"]) == {"bits:8", "bits:4"}
    assert "dAP bits:4" in capsys.readouterr().out
    assert main(["sensitivity", "--model", str(tiny_checkpoint), "--data", str(tiny_synth), "--out", str(out),
                 "--bits", "8"]) == 2
    assert "already exists" in capsys.readouterr().err
