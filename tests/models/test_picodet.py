"""PP-PicoDet family: shapes, decode parity with the NumPy post-process, assigners,
GFL losses, and an overfit run whose predictions go through the shared post-process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edge_compress.errors import ConfigError, DataError
from edge_compress.models import postprocess as pp
from edge_compress.models.boxes import box_iou
from edge_compress.models.picodet import (PicoDet, assign_atss, assign_tal, build_picodet, candidate_mask,
                                          dfl_targets, distribution_focal_loss, pad_targets,
                                          quality_focal_loss)


def _targets():
    return [torch.tensor([[0.0, 10, 12, 50, 60], [2.0, 70, 20, 120, 100]]),
            torch.tensor([[1.0, 30, 40, 90, 80]])]


def _priors(size: int, strides=(8, 16, 32)) -> torch.Tensor:
    cfg = pp.PostProcessConfig("gfl", 1, strides, tuple(((s, s),) for s in strides))
    return torch.from_numpy(pp.make_priors(cfg, size, size))


@pytest.mark.parametrize("size,width,extra", [(64, 0.5, False), (96, 0.75, True), (128, 1.0, False),
                                              (320, 0.5, False), ((64, 128), 0.5, True)])
def test_forward_shape_and_feature_sizes(size, width, extra):
    torch.manual_seed(0)
    m = build_picodet(num_classes=3, input_size=size, width_mult=width, extra_level=extra)
    h, w = (size, size) if isinstance(size, int) else size
    seen = []
    hooks = [p.register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape[-2:]))) for p in m.head.pred]
    raw = m(torch.rand(2, 3, h, w))
    for hk in hooks:
        hk.remove()
    assert m.strides == ((8, 16, 32, 64) if extra else (8, 16, 32))
    assert seen == [(pp.feature_size(h, s), pp.feature_size(w, s)) for s in m.strides]
    assert raw.shape == (2, len(m.priors()), m.post.channels) == (2, len(m.priors()), 3 + 32)


def test_registered_names_budget_and_module_names():
    from edge_compress.models.registry import create_detector, list_detectors
    from edge_compress.models.summary import summarize

    assert {"picodet_s", "picodet_xs"} <= set(list_detectors("picodet*"))
    s = create_detector("picodet_s", num_classes=8)
    xs = create_detector("picodet_xs", num_classes=8)
    assert isinstance(s, PicoDet) and s.family == "picodet" and s.post.head == "gfl"
    gs, gxs = summarize(s).gflops, summarize(xs).gflops
    assert 0.3 <= gs <= 1.0 and gxs < gs
    names = dict(s.named_modules())
    for n in ("backbone.stem.conv", "backbone.stage2.0.branch1.dw.conv", "backbone.stage2.0.branch2.pw1.conv",
              "backbone.stage3.1.branch2.se.fc1", "neck.reduce.0.conv", "neck.top_down.0.blocks.0.dwsep.dw.conv",
              "neck.downsample.1.pw.conv", "neck.bottom_up.1.fuse.conv", "head.tower.2.1.pw.conv", "head.pred.0"):
        assert n in names, n
    bias = s.head.pred[0].bias.detach()
    np.testing.assert_allclose(torch.sigmoid(bias[:8]).numpy(), 0.01, rtol=1e-4)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown option"):
        build_picodet(num_classes=2, input_size=64, depth=3)
    with pytest.raises(ConfigError, match="width_mult"):
        build_picodet(num_classes=2, input_size=64, width_mult=0)
    with pytest.raises(ConfigError, match="act='gelu'"):
        build_picodet(num_classes=2, input_size=64, act="gelu")
    m = build_picodet(num_classes=2, input_size=64, width_mult=0.5)
    with pytest.raises(DataError, match="class ids"):
        m.loss(m(torch.rand(1, 3, 64, 64)), [torch.tensor([[5.0, 1, 1, 20, 20]])])


def test_torch_decode_equals_numpy_postprocess():
    m = build_picodet(num_classes=4, input_size=96, width_mult=0.5, extra_level=True)
    raw = torch.randn(2, len(m.priors()), m.post.channels, generator=torch.Generator().manual_seed(1)) * 3
    boxes, scores = m.decode(raw)
    ref_boxes, ref_scores = pp.decode(raw.numpy(), m.post, m.priors())
    np.testing.assert_allclose(boxes.numpy(), ref_boxes, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-6)


def test_dfl_targets_and_loss_on_hand_values():
    centre, stride = torch.tensor([[12.0, 20.0]]), torch.tensor([8.0])
    d = dfl_targets(centre, stride, torch.tensor([[4.0, 4.0, 36.0, 100.0]]), reg_max=7)
    torch.testing.assert_close(d, torch.tensor([[1.0, 2.0, 3.0, 6.99]]))     # b = 10 is clamped
    d = dfl_targets(centre, stride, torch.tensor([[14.0, 4.0, 36.0, 22.0]]), reg_max=7)
    assert d[0, 0] == 0.0                                                    # centre outside: l >= 0
    logits = torch.tensor([0.1, -0.3, 0.7, 0.2, 0.0, 0.0, 0.0, 0.0])
    logp = logits.log_softmax(-1)
    expect = -(0.7 * logp[2] + 0.3 * logp[3])
    torch.testing.assert_close(distribution_focal_loss(logits[None], torch.tensor([2.3]))[0], expect)
    # a one-hot-ish distribution on an integer target costs ~0
    assert distribution_focal_loss(torch.tensor([[0, 0, 0, 50.0, 0, 0, 0, 0]]), torch.tensor([3.0])) < 1e-6


def test_quality_focal_loss_on_hand_values():
    logit, target = torch.tensor([0.4, -2.0]), torch.tensor([0.6, 0.0])
    p = torch.sigmoid(logit)
    bce = -(target * p.log() + (1 - target) * (1 - p).log())
    torch.testing.assert_close(quality_focal_loss(logit, target), bce * (p - target).abs() ** 2)


def test_tal_picks_candidates_inside_the_gt():
    priors = _priors(32)                       # stride 8: 4x4, stride 16: 2x2, stride 32: 1x1
    gt = torch.tensor([[[0.0, 0.0, 16.0, 16.0]]])
    valid = torch.tensor([[True]])
    scores = torch.full((1, len(priors), 2), 0.5)
    pred = torch.cat([priors[:, :2] - 4, priors[:, :2] + 4], -1)[None]
    fg, gt_idx = assign_tal(scores, pred, priors, torch.tensor([[1]]), gt, valid)
    inside = [0, 1, 4, 5, 16]                  # 4 stride-8 centres + the stride-16 centre (8, 8)
    assert fg[0].nonzero().flatten().tolist() == inside and (gt_idx[0, inside] == 0).all()
    # with topk=2 the two of best score * IoU^6 win: make priors 5 and 16 predict the GT exactly
    pred[0, 5] = pred[0, 16] = gt[0, 0]
    fg, _ = assign_tal(scores, pred, priors, torch.tensor([[1]]), gt, valid, topk=2)
    assert fg[0].nonzero().flatten().tolist() == [5, 16]


def test_candidates_fall_back_to_the_centre_cell_for_tiny_gts():
    priors = _priors(32)
    tiny = torch.tensor([[[5.0, 5.0, 7.0, 7.0]]])     # holds no prior centre
    cand = candidate_mask(priors, tiny, torch.tensor([[True]]))[0, 0]
    assert cand.nonzero().flatten().tolist() == [0, 16, 20]   # (4,4) s8, (8,8) s16, (16,16) s32


def test_atss_and_tal_batched_with_padding_and_conflicts():
    priors = _priors(64)
    targets = [torch.tensor([[0.0, 2, 2, 30, 30], [1.0, 20, 20, 60, 62]]), torch.zeros(0, 5)]
    gt_cls, gt_boxes, valid = pad_targets(targets, 2, torch.device("cpu"))
    assert gt_boxes.shape == (2, 2, 4) and valid.tolist() == [[True, True], [False, False]]
    sizes = [64, 16, 4]
    fg, gt_idx = assign_atss(priors, sizes, gt_boxes, valid)
    assert fg[0].any() and not fg[1].any()
    for j in fg[0].nonzero().flatten().tolist():        # every positive's centre lies in its GT
        x1, y1, x2, y2 = gt_boxes[0, gt_idx[0, j]].tolist()
        assert x1 < priors[j, 0] < x2 and y1 < priors[j, 1] < y2
    assert set(gt_idx[0, fg[0]].tolist()) == {0, 1}
    scores = torch.rand(2, len(priors), 2)
    pred = torch.cat([priors[:, :2] - 12, priors[:, :2] + 12], -1)[None].repeat(2, 1, 1)
    fg, gt_idx = assign_tal(scores, pred, priors, gt_cls, gt_boxes, valid)
    assert fg[0].sum() <= 26 and not fg[1].any()
    assert set(gt_idx[0, fg[0]].tolist()) == {0, 1}


def test_loss_finite_grads_empty_images_and_assigner_switch():
    torch.manual_seed(0)
    m = build_picodet(num_classes=3, input_size=96, width_mult=0.5, assigner_warmup_steps=1)
    x = torch.rand(3, 3, 96, 96)
    assert m.assigner() == "atss"
    loss, parts = m.loss(m(x), _targets() + [torch.zeros(0, 5)])
    assert torch.isfinite(loss) and set(parts) >= {"qfl", "giou", "dfl"} and parts["num_pos"] > 0
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert m.assigner() == "tal" and int(m.state_dict()["assign_steps"]) == 1
    loss, parts = m.loss(m(x), [torch.zeros(0, 5)] * 3)             # no GT at all
    assert torch.isfinite(loss) and parts["num_pos"] == 0 and parts["giou"] == 0.0
    loss.backward()
    with torch.no_grad():                                           # eval losses do not count
        m.loss(m(x), _targets() + [torch.zeros(0, 5)])
    assert int(m.assign_steps) == 2


def _recalibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Set BN running stats to the statistics of ``x`` ("precise BN"): after a few
    dozen high-lr steps the running averages still lag the fast-moving weights."""
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    model.train()
    with torch.no_grad():
        model(x)


def test_overfit_recovers_boxes_through_numpy_postprocess():
    torch.manual_seed(0)
    m = build_picodet(num_classes=3, input_size=128, width_mult=0.5, assigner_warmup_steps=10)
    targets = _targets()
    x = torch.rand(2, 3, 128, 128) * 0.3
    for i, t in enumerate(targets):
        for c, x1, y1, x2, y2 in t.tolist():
            x[i, int(c), int(y1):int(y2), int(x1):int(x2)] = 0.9    # a class is a colour channel
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    losses = []
    for _ in range(60):
        loss, _ = m.loss(m(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.4 * np.mean(losses[:3])
    _recalibrate_bn(m, x)
    for det, t in zip(m.predict(x, score_thresh=0.3), targets):
        iou = box_iou(torch.from_numpy(det.boxes), t[:, 1:])
        best = iou.argmax(0)
        assert (iou.max(0).values > 0.5).all()
        assert det.labels[best.numpy()].tolist() == t[:, 0].long().tolist()
