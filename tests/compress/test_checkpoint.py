"""Compressed checkpoints: restructure + strict load gives the identical model for every method
that has landed, steps replay in order, files are atomic and never overwritten, load_detector
(and so eval/export) reads them."""

import copy

import pytest
import torch

from edge_compress.compress.checkpoint import (AppliedStep, compressed_steps, load_compressed, restructure_steps,
                                               save_compressed)
from edge_compress.compress.lowrank import LowRankConfig, decompose
from edge_compress.compress.sparsity import SparsityConfig, masks, prune_unstructured
from edge_compress.errors import ArtifactError, ConfigError
from edge_compress.models import create_detector
from edge_compress.train import load_detector


def detector(name="picodet_xs", class_names=None):
    torch.manual_seed(0)
    kw = {"class_names": class_names} if class_names else {"num_classes": 3}
    return create_detector(name, input_size=64, width_mult=0.25, **kw)


def x():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))


def train_a_little(model):
    """Move every weight off its fresh-init value (masked ones stay zero) so a wrong load shows."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(x()).square().mean().backward()
        opt.step()
    return model.eval()


def step(method, config, report):
    return AppliedStep(method, config.to_dict(), report.to_dict()["plan"])


@pytest.mark.parametrize("name", ["picodet_xs", "yolo_tiny", "ssdlite_mbv2"])
def test_lowrank_then_masks_round_trip(name, tmp_path):
    model = detector(name)
    lr_cfg, sp_cfg = LowRankConfig(energy=0.7, min_channels=4), SparsityConfig("magnitude", 0.5)
    steps = [step("lowrank", lr_cfg, decompose(model, lr_cfg))]
    assert steps[0].plan["layers"], "nothing was decomposed: the test would not test restructure"
    steps.append(step("magnitude", sp_cfg, prune_unstructured(model, sp_cfg)))
    train_a_little(model)
    path = save_compressed(tmp_path / "m.pt", model, steps)
    loaded = load_compressed(path)
    assert torch.equal(loaded(x()), model(x()))
    assert set(masks(loaded)) == set(masks(model))
    assert all(torch.equal(masks(loaded)[k], v) for k, v in masks(model).items())
    assert [s.method for s in compressed_steps(path)] == ["lowrank", "magnitude"]


def test_masks_survive_fine_tuning_after_reload(tmp_path):
    model = detector()
    cfg = SparsityConfig("nm", 0.5, n=2, m=4)
    path = save_compressed(tmp_path / "m.pt", model, [step("nm_2_4", cfg, prune_unstructured(model, cfg))])
    loaded = train_a_little(load_compressed(path))
    for name, keep in masks(loaded).items():
        assert (loaded.get_submodule(name).weight[~keep] == 0).all()


def test_binary_round_trip_when_available(tmp_path):
    binary = pytest.importorskip("edge_compress.compress.binary")
    model = detector("yolo_tiny")
    cfg = binary.BinaryConfig()
    report = binary.binarize(model, cfg)
    train_a_little(model)
    path = save_compressed(tmp_path / "m.pt", model, [step("binary", cfg, report)])
    assert torch.equal(load_compressed(path)(x()), model(x()))


def test_never_overwrites_and_leaves_no_temp_file(tmp_path):
    model = detector()
    path = save_compressed(tmp_path / "m.pt", model, [])
    before = path.read_bytes()
    with pytest.raises(ArtifactError, match="already exists"):
        save_compressed(path, model, [])
    assert path.read_bytes() == before
    save_compressed(path, model, [], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_plan_that_does_not_fit_the_weights_is_an_error(tmp_path):
    model = detector()
    cfg = LowRankConfig(energy=0.7, min_channels=4)
    applied = step("lowrank", cfg, decompose(model, cfg))
    name, entry = next(iter(applied.plan["layers"].items()))
    bad = copy.deepcopy(applied.plan)
    bad["layers"][name]["ranks"] = [r + 1 for r in entry["ranks"]]
    path = save_compressed(tmp_path / "m.pt", model, [AppliedStep("lowrank", applied.config, bad)])
    with pytest.raises(ArtifactError, match="do not fit the structure"):
        load_compressed(path)
    with pytest.raises(ConfigError, match="step 0 \\(lowrank\\).*no\\.such"):
        restructure_steps(detector(), [AppliedStep("lowrank", {}, {"layers": {"no.such": entry}})])


def test_load_detector_and_eval_read_compressed_checkpoints(tiny_synth, tmp_path):
    from edge_compress.pipeline import evaluate_checkpoint, open_split

    names = open_split(tiny_synth, "val", (64, 64)).class_names
    model = detector("yolo_tiny", class_names=names)
    cfg = SparsityConfig("magnitude", 0.3)
    path = save_compressed(tmp_path / "m.pt", model, [step("magnitude", cfg, prune_unstructured(model, cfg))])
    assert torch.equal(load_detector(path)(x()), model.eval()(x()))
    r = evaluate_checkpoint(path, tiny_synth)
    assert r.num_images == 8 and 0.0 <= r.ap <= 1.0


def test_training_checkpoints_of_a_compressed_model_rebuild_its_structure(tiny_synth, tmp_path):
    from edge_compress.pipeline import open_split
    from edge_compress.train import TrainConfig, train

    ds = open_split(tiny_synth, "train", (64, 64))
    model = detector("yolo_tiny", class_names=ds.class_names)
    lr_cfg, sp_cfg = LowRankConfig(energy=0.7, min_channels=4), SparsityConfig("magnitude", 0.5)
    steps = [step("lowrank", lr_cfg, decompose(model, lr_cfg)), step("magnitude", sp_cfg,
                                                                     prune_unstructured(model, sp_cfg))]
    model = load_compressed(save_compressed(tmp_path / "m.pt", model, steps))    # records its own steps
    assert [s["method"] for s in model.compression_steps] == ["lowrank", "magnitude"]
    train(model, ds, TrainConfig(epochs=1, batch_size=12, warmup_iters=1, ema=False), tmp_path / "run",
          progress=False)
    again = load_detector(tmp_path / "run" / "last.pt")
    assert torch.equal(again(x()), model.eval()(x())) and set(masks(again)) == set(masks(model))


def test_a_compressed_checkpoint_exports_to_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from edge_compress.export import export_checkpoint

    model = detector()
    lr_cfg, sp_cfg = LowRankConfig(energy=0.7, min_channels=4), SparsityConfig("magnitude", 0.5)
    steps = [step("lowrank", lr_cfg, decompose(model, lr_cfg)), step("magnitude", sp_cfg,
                                                                     prune_unstructured(model, sp_cfg))]
    path = save_compressed(tmp_path / "m.pt", train_a_little(model), steps)
    art = export_checkpoint(path, "onnxruntime", tmp_path / "art")
    assert art.manifest["validation"]["rel_error"] <= art.manifest["validation"]["tolerance"]
