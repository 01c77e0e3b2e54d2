"""Recipes: YAML loading with unknown keys rejected at every level (errors name file, step, key),
impossible orders rejected before anything runs, compress() end to end (rows, checkpoint, report),
nothing written on failure."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from edge_compress.compress import recipe as R
from edge_compress.compress.checkpoint import load_compressed
from edge_compress.compress.sparsity import masks
from edge_compress.errors import ArtifactError, ConfigError, UnknownNameError
from edge_compress.models import create_detector

BENCHMARK_NAMES = ["channel_pruning", "layer_pruning", "magnitude", "lamp", "nm_2_4", "qat_int8", "binary",
                   "ternary", "kmeans", "lowrank"]
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_registry_has_the_benchmark_names_and_resolves_the_landed_modules():
    assert list(R.METHODS) == BENCHMARK_NAMES
    for name in ("magnitude", "lamp", "nm_2_4", "lowrank"):
        e = R.method_entry(name)
        assert callable(e.verb_fn()) and callable(e.restructure()) and isinstance(e.config_class(), type)
    with pytest.raises(UnknownNameError, match="unknown compression method 'prune'.*channel_pruning"):
        R.method_entry("prune")


def test_yaml_recipe_loads_with_method_defaults(tmp_path):
    path = write(tmp_path, """
name: mix
steps:
  - method: lowrank
    config: {energy: 0.8}
  - method: lamp
    config: {sparsity: 0.4}
    finetune: {epochs: 2, lr: 0.001}
    distill: {temperature: 3.0}
""")
    recipe = R.load_recipe(path)
    assert recipe.name == "mix" and [s.method for s in recipe.steps] == ["lowrank", "lamp"]
    lamp = recipe.steps[1]
    assert (lamp.config.method, lamp.config.scope, lamp.config.sparsity) == ("lamp", "global", 0.4)
    assert lamp.finetune.epochs == 2 and lamp.distill.temperature == 3.0 and lamp.distill.teacher is None
    assert R.Recipe.from_dict(recipe.to_dict()) == R.Recipe(recipe.steps, "mix")


@pytest.mark.parametrize("text, match", [
    ("stepz: []", r"unknown recipe key\(s\) \['stepz'\]"),
    ("steps:\n  - {method: lowrank, confg: {}}", r"step 0: unknown step key\(s\) \['confg'\]"),
    ("steps:\n  - {method: lowrank}\n  - {method: magnitude, config: {sparsity: 0.5, sparsty: 1}}",
     r"step 1 \(magnitude\): config: .*\['sparsty'\]"),
    ("steps:\n  - {method: lowrank, finetune: {epochz: 1}}", r"step 0 \(lowrank\): finetune: .*\['epochz'\]"),
    ("steps:\n  - {method: lowrank, finetune: {epochs: 1}, distill: {temp: 1}}",
     r"step 0 \(lowrank\): distill: .*\['temp'\]"),
    ("steps:\n  - {method: lowrank, distill: {temperature: 1}}", r"step 0 \(lowrank\): 'distill' needs a 'finetune'"),
    ("steps:\n  - {method: lamp, config: {sparsity: 0.5, method: magnitude}}",
     r"step 0 \(lamp\): config: method='magnitude' contradicts method 'lamp'"),
    ("steps:\n  - {method: magnitude, config: {sparsity: 1.5}}", r"step 0 \(magnitude\): config: .*outside \[0, 1\)"),
    ("steps: []", "no steps"),
    ("steps:\n  - lowrank", "step 0: a step is a mapping"),
])
def test_bad_recipes_name_the_file_step_and_key(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as e:
        R.load_recipe(path)
    assert str(path) in str(e.value)


def fake(method, layers=()):
    return R.RecipeStep(method, SimpleNamespace(layers=tuple(layers)))


@pytest.mark.parametrize("methods, match", [
    (["qat_int8", "channel_pruning"], r"step 1 \(channel_pruning\) comes after step 0 \(qat_int8\)"),
    (["binary", "lowrank"], r"step 1 \(lowrank\) comes after step 0 \(binary\)"),
    (["kmeans", "magnitude"], r"step 1 \(magnitude\) comes after step 0 \(kmeans\)"),
    (["magnitude", "layer_pruning"], "put structural steps before masks"),
    (["qat_int8", "kmeans"], "both quantize the same layers"),
])
def test_impossible_orders_are_rejected(methods, match):
    with pytest.raises(ConfigError, match=match):
        R.check_order(tuple(fake(m) for m in methods), "r.yaml")


def test_possible_orders_pass():
    for methods in (["channel_pruning", "lowrank", "magnitude", "qat_int8"], ["layer_pruning", "nm_2_4", "kmeans"]):
        R.check_order(tuple(fake(m) for m in methods), "r.yaml")
    R.check_order((fake("binary", ["a", "b"]), fake("qat_int8", ["c"])), "r.yaml")        # disjoint layers
    with pytest.raises(ConfigError, match=r"\['b'\]"):
        R.check_order((fake("binary", ["a", "b"]), fake("ternary", ["b"])), "r.yaml")


def test_a_missing_method_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(R.METHODS, "kmeans", R.MethodEntry("kmeans", "quantization", R.QUANT, "no_such_module",
                                                           "KMeansConfig", "cluster_weights"))
    with pytest.raises(ConfigError, match="kmeans.*edge_compress.compress.no_such_module"):
        R.Recipe.from_dict({"steps": [{"method": "kmeans", "config": {}}]})


def tiny_model(data):
    from edge_compress.pipeline import open_split

    names = open_split(data, "val", (64, 64)).class_names
    torch.manual_seed(0)
    return create_detector("picodet_xs", class_names=names, input_size=64, width_mult=0.25)


def test_compress_end_to_end(tiny_synth, tmp_path):
    recipe = R.Recipe.from_dict({"name": "t", "steps": [
        {"method": "lowrank", "config": {"energy": 0.7, "min_channels": 4}},
        {"method": "magnitude", "config": {"sparsity": 0.5},
         "finetune": {"epochs": 1, "batch_size": 12, "warmup_iters": 1, "ema": False},
         "distill": {"temperature": 2.0}}]})
    model = tiny_model(tiny_synth)
    lines = []
    result = R.compress(model, recipe, tiny_synth, tmp_path / "out", progress=False, log=lines.append)
    stages = [r.stage for r in result.rows]
    assert stages == ["baseline", "0: lowrank", "1: magnitude", "1: finetune + distill"]
    base, low, pruned, tuned = result.rows
    assert low.params < base.params and low.macs < base.macs
    assert pruned.params == low.params and pruned.params_nonzero < 0.7 * low.params_nonzero
    for name, keep in masks(model).items():                        # masks held through the fine-tune
        assert (model.get_submodule(name).weight[~keep] == 0).all()
    assert len(lines) == 7 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.pt", "report.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]          # no staging left behind
    loaded = load_compressed(tmp_path / "out" / "model.pt")
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(loaded(x), model.eval()(x)) and set(masks(loaded)) == set(masks(model))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["stage"] for r in report["rows"]] == stages and report["recipe"]["name"] == "t"
    assert [s["method"] for s in report["steps"]] == ["lowrank", "magnitude"]


def test_compress_refuses_an_existing_out_and_leaves_nothing_on_failure(tiny_synth, tmp_path):
    recipe = R.Recipe.from_dict({"steps": [{"method": "magnitude", "config": {"sparsity": 0.5}}]})
    (tmp_path / "exists").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        R.compress(tiny_model(tiny_synth), recipe, tiny_synth, tmp_path / "exists", progress=False)
    bad = R.Recipe.from_dict({"steps": [{"method": "lowrank", "config": {"ranks": {"no.such.layer": 2}}}]})
    with pytest.raises(ConfigError, match="no.such.layer"):
        R.compress(tiny_model(tiny_synth), bad, tiny_synth, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_shipped_recipes_load():
    paths = sorted(RECIPES.glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        try:
            recipe = R.load_recipe(path)
        except ConfigError as e:
            if "not available in this installation" in str(e):
                pytest.skip(f"{path.name}: {e}")
            raise
        assert recipe.steps


def test_a_compressed_checkpoint_compresses_further_with_its_history(tiny_synth, tmp_path):
    first = R.Recipe.from_dict({"steps": [{"method": "lowrank", "config": {"energy": 0.7, "min_channels": 4}}]})
    R.compress(tiny_model(tiny_synth), first, tiny_synth, tmp_path / "a", progress=False)
    model = load_compressed(tmp_path / "a" / "model.pt")
    second = R.Recipe.from_dict({"steps": [{"method": "nm_2_4"}]})
    R.compress(model, second, tiny_synth, tmp_path / "b", progress=False)
    final = load_compressed(tmp_path / "b" / "model.pt")
    assert [s["method"] for s in final.compression_steps] == ["lowrank", "nm_2_4"]
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(final(x), model.eval()(x))
    with pytest.raises(ConfigError, match=r"earlier steps \['lowrank', 'nm_2_4'\].*put structural steps before"):
        R.compress(final, first, tiny_synth, tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


METHOD_CONFIGS = {"channel_pruning": {"ratio": 0.3}, "layer_pruning": {"num_blocks": 1},
                  "magnitude": {"sparsity": 0.5},
                  "lamp": {"sparsity": 0.5}, "nm_2_4": {}, "qat_int8": {}, "binary": {}, "ternary": {}, "kmeans": {},
                  "lowrank": {"energy": 0.7, "min_channels": 4}}


@pytest.mark.parametrize("method", BENCHMARK_NAMES)
def test_every_landed_method_compresses_and_reloads_identically(method, tiny_synth, tmp_path):
    try:
        recipe = R.Recipe.from_dict({"steps": [{"method": method, "config": METHOD_CONFIGS[method]}]})
    except ConfigError as e:
        if "not available in this installation" in str(e):
            pytest.skip(str(e))
        raise
    model = tiny_model(tiny_synth)
    result = R.compress(model, recipe, tiny_synth, tmp_path / "out", progress=False)
    assert [r.stage for r in result.rows] == ["baseline", f"0: {method}"]
    loaded = load_compressed(tmp_path / "out" / "model.pt")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = R.load_recipe(path)
    assert recipe.steps and all(step.method in R.METHODS for step in recipe.steps)
