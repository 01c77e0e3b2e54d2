"""Detector distillation: KL terms against torch references, zero for identical models, gradients
reach the student and the adaptation convs only, a few steps reduce the loss, trainer plumbing."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from edge_compress.compress.distill import (DistillConfig, bernoulli_kl, box_distill, categorical_kl, class_distill,
                                            distillation_loss)
from edge_compress.errors import ConfigError
from edge_compress.models import create_detector

FAMILIES = ["picodet_xs", "yolo_tiny", "ssdlite_mbv2"]


def detector(name, seed=0):
    torch.manual_seed(seed)
    return create_detector(name, num_classes=3, input_size=64, width_mult=0.25)


def images(n=2, seed=1):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def perturb(model, scale=0.05, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def test_kl_terms_match_torch_kl_div():
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    ref = F.kl_div((s / 2).log_softmax(-1), (t / 2).log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(categorical_kl(s, t, 2.0), ref, atol=1e-12)
    two = lambda z: torch.stack([F.logsigmoid(z), F.logsigmoid(-z)], -1)   # Bernoulli as 2 classes
    ref_b = F.kl_div(two(s / 3), two(t / 3), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(bernoulli_kl(s, t, 3.0), ref_b, atol=1e-12)


def test_gfl_terms_by_hand():
    """One image, two priors, two classes, reg_max 1: class KL weighted by the larger top score of
    the two models, LD weighted by the teacher's top score; float64 references written out."""
    t = torch.tensor([[[2.0, -1.0, 0.5, 0.0, 0.1, 0.2, 0.3, 0.4, 0.0, 1.0],
                       [-3.0, 1.0, 0.0, 0.5, 0.4, 0.3, 0.2, 0.1, 1.0, 0.0]]], dtype=torch.float64)
    s = t + torch.linspace(-0.5, 0.5, 10, dtype=torch.float64)
    T = 2.0
    p, q = torch.sigmoid(t[..., :2] / T), torch.sigmoid(s[..., :2] / T)
    kl = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(-1)
    fg = torch.sigmoid(t[..., :2]).amax(-1)
    w = torch.maximum(fg, torch.sigmoid(s[..., :2]).amax(-1))
    assert class_distill("gfl", s, t, 2, T).item() == pytest.approx(((kl * w).sum() / w.sum() * T * T).item())
    pt, ps = (t[..., 2:] / T).view(1, 2, 4, 2).softmax(-1), (s[..., 2:] / T).view(1, 2, 4, 2).softmax(-1)
    ld = (pt * (pt / ps).log()).sum(-1).mean(-1)
    assert box_distill("gfl", s, t, 2, 1, T).item() == pytest.approx(((ld * fg).sum() / fg.sum() * T * T).item())


@pytest.mark.parametrize("name", FAMILIES)
def test_output_terms_are_zero_for_identical_models_and_positive_otherwise(name):
    student = detector(name)
    x = images()
    cfg = DistillConfig(output_weight=1.0, box_weight=1.0, temperature=2.0)
    same = distillation_loss(student, copy.deepcopy(student), cfg)
    student.eval()              # BN on running statistics, as the teacher runs: identical outputs
    loss, parts = same(student, x, student(x), [])
    assert abs(loss.item()) < 1e-6 and abs(parts["kd_cls"]) < 1e-6 and abs(parts["kd_box"]) < 1e-6
    other = distillation_loss(student, perturb(copy.deepcopy(student)), cfg)
    loss, parts = other(student, x, student(x), [])
    assert parts["kd_cls"] > 1e-4 and parts["kd_box"] > 1e-6 and loss.item() > 0


def feature_cfg():
    return DistillConfig(output_weight=1.0, box_weight=1.0, feature_weight=1.0,
                         feature_pairs=(("neck.bottom_up.0", "neck.bottom_up.0"),))


def test_gradients_reach_student_and_adapter_only():
    student = detector("picodet_xs")
    teacher = create_detector("picodet_s", num_classes=3, input_size=64, width_mult=0.5)   # wider teacher
    loss_fn = distillation_loss(student, teacher, feature_cfg())
    adapter = loss_fn.adapters[0]
    assert (adapter.in_channels, adapter.out_channels) == (
        student.neck.bottom_up[0].fuse.conv.out_channels, teacher.neck.bottom_up[0].fuse.conv.out_channels)
    assert {id(p) for p in loss_fn.parameters()} == {id(p) for p in adapter.parameters()}
    student.train()
    x = images()
    loss, parts = loss_fn(student, x, student(x), [])
    loss.backward()
    assert parts["kd_feat"] > 0
    assert all(p.grad is not None for p in adapter.parameters())
    assert student.head.pred[0].weight.grad.abs().sum() > 0
    assert student.backbone.stem.conv.weight.grad.abs().sum() > 0      # through the feature term too
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert all(p.requires_grad for p in teacher.parameters())    # the caller's flags are left alone


def test_a_few_steps_reduce_the_distillation_loss():
    student = detector("picodet_xs", seed=0)
    teacher = detector("picodet_xs", seed=5)
    loss_fn = distillation_loss(student, teacher, feature_cfg())
    opt = torch.optim.Adam([*student.parameters(), *loss_fn.parameters()], lr=3e-3)
    x = images(4)
    student.train()
    values = []
    for _ in range(8):
        loss, _ = loss_fn(student, x, student(x), [])
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(loss.item())
    assert values[-1] < 0.7 * values[0], values


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="unknown distill setting"):
        DistillConfig.from_dict({"temprature": 2.0})
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=0)
    with pytest.raises(ConfigError, match="feature_pairs is empty"):
        DistillConfig(feature_weight=1.0)
    with pytest.raises(ConfigError, match="every weight is 0"):
        DistillConfig(output_weight=0, box_weight=0)
    student = detector("picodet_xs")
    with pytest.raises(ConfigError, match="student layer 'neck.nope'"):
        distillation_loss(student, copy.deepcopy(student),
                          DistillConfig(feature_weight=1, feature_pairs=(("neck.nope", "neck"),)))
    with pytest.raises(ConfigError, match="same head"):
        distillation_loss(student, detector("yolo_tiny"), DistillConfig())
    with pytest.raises(ConfigError, match="neither a checkpoint"):
        distillation_loss(student, None, DistillConfig(teacher="no/such/file.pt"))


def test_trainer_optimises_the_adapters_and_logs_the_terms(tiny_synth, tmp_path):
    from edge_compress.pipeline import open_split
    from edge_compress.train import TrainConfig, train

    ds = open_split(tiny_synth, "train", (64, 64))
    torch.manual_seed(0)
    student = create_detector("picodet_xs", class_names=ds.class_names, input_size=64, width_mult=0.25)
    teacher = perturb(copy.deepcopy(student))
    loss_fn = distillation_loss(student, teacher, feature_cfg())
    before = loss_fn.adapters[0].weight.detach().clone()
    teacher_before = copy.deepcopy(teacher.state_dict())
    train(student, ds, TrainConfig(epochs=1, batch_size=12, warmup_iters=1, ema=False), tmp_path / "run",
          progress=False, extra_loss=loss_fn)
    assert not torch.equal(before, loss_fn.adapters[0].weight)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert {"kd_cls", "kd_box", "kd_feat", "qfl"} <= set(history[0])
