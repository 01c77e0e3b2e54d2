"""Training end to end on tiny data: checkpoints, exact resume, refusal to overwrite."""

import pytest
import torch

from edge_compress.errors import ConfigError
from edge_compress.models import create_detector
from edge_compress.pipeline import open_split
from edge_compress.train import TrainConfig, load_detector, train

CFG = TrainConfig(epochs=2, batch_size=8, lr=2e-3, warmup_iters=2, seed=5)


def _model_and_data(data):
    ds = open_split(data, "train", (64, 64), augment=True, seed=CFG.seed)
    torch.manual_seed(0)
    model = create_detector("yolo_tiny", class_names=ds.class_names, input_size=64, width_mult=0.25)
    return model, ds


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resumed_run_matches_uninterrupted(tiny_synth, tmp_path):
    full, ds = _model_and_data(tiny_synth)
    train(full, ds, CFG, tmp_path / "full", progress=False)

    part, ds2 = _model_and_data(tiny_synth)
    r1 = train(part, ds2, CFG, tmp_path / "part", progress=False, stop_after_epochs=1)
    assert r1.epochs_run == 1
    resumed, ds3 = _model_and_data(tiny_synth)  # a fresh process would start from scratch weights
    r2 = train(resumed, ds3, CFG, tmp_path / "part", progress=False, resume=True)
    assert r2.epochs_run == 1 and len(r2.history) == 2
    assert _same_weights(full, resumed)
    assert not _same_weights(full, _model_and_data(tiny_synth)[0])  # training changed the weights
    # the EMA weights written to disk agree too
    assert _same_weights(load_detector(tmp_path / "full" / "last.pt"), load_detector(tmp_path / "part" / "last.pt"))


def test_existing_run_is_never_overwritten(tiny_synth, tmp_path):
    model, ds = _model_and_data(tiny_synth)
    train(model, ds, TrainConfig(**{**CFG.to_dict(), "epochs": 1}), tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(model, ds, CFG, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="training options differ"):
        train(model, ds, CFG, tmp_path / "run", progress=False, resume=True)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_training_on_tiny_data_lowers_the_loss(tiny_synth, tmp_path):
    model, ds = _model_and_data(tiny_synth)
    cfg = TrainConfig(epochs=6, batch_size=8, lr=3e-3, warmup_iters=3, seed=1, ema=False)
    r = train(model, ds, cfg, tmp_path / "run", progress=False)
    losses = [h["loss"] for h in r.history]
    # 18 steps on 24 augmented images: a steady fall, not convergence (the per-family
    # overfit tests in tests/models check that a model really fits its targets).
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
