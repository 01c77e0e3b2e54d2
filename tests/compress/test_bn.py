"""BatchNorm recalibration after structural pruning: exact running statistics, nothing else touched,
failure-safe, and wired into channel/layer pruning through recipes."""

import json

import pytest
import torch
from torch import nn

from edge_compress.compress.bn import recalibrate_bn
from edge_compress.compress.layerdrop import LayerDropConfig
from edge_compress.compress.structured import ChannelPruneConfig, prune_channels
from edge_compress.errors import ConfigError
from edge_compress.models import create_detector


def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.BatchNorm2d(4))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(5.0)       # stale statistics, far from the data's
                m.running_var.fill_(9.0)
    return model.eval()


def batches(n=3, size=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(size, 3, 6, 6, generator=g) * 2 - 0.5, []) for _ in range(n)]


def test_statistics_are_the_average_over_the_batches_in_fp64():
    model, data = net(), batches()
    conv, bn = model[0], model[1]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert recalibrate_bn(model, data) == 12
    # Independent reference: the first BN sees the conv's output; with equal batch sizes the cumulative
    # average is the mean of per-batch means and of per-batch unbiased variances.
    outs = [torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            for x, _ in data]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).reshape(8, -1).var(1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
    assert not model.training and bn.momentum == 0.1                  # eval mode and momentum put back
    for k, v in model.state_dict().items():                           # weights untouched
        if k in weights:
            assert torch.equal(v, weights[k]), k


def test_no_data_keeps_the_old_statistics_and_a_failure_restores_them():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_bn(model, []) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    def broken():
        yield batches(1)[0]
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        recalibrate_bn(model, broken())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training and all(m.momentum == 0.1 for m in model if isinstance(m, nn.BatchNorm2d))


def test_channel_pruning_recalibrates_when_given_batches():
    def pruned(bn_batches):
        torch.manual_seed(0)
        model = create_detector("yolo_tiny", num_classes=3, input_size=64).eval()
        report = prune_channels(model, ChannelPruneConfig("l1", 0.5), bn_batches=bn_batches)
        return model, report

    data = [(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)), []) for i in range(2)]
    plain, r0 = pruned(None)
    recal, r1 = pruned(data)
    assert r0.bn_recalibrated_images == 0 and r1.to_dict()["bn_recalibrated_images"] == 8
    bns = [n for n, m in recal.named_modules() if isinstance(m, nn.BatchNorm2d)]
    changed = [n for n in bns if not torch.equal(recal.get_submodule(n).running_mean,
                                                 plain.get_submodule(n).running_mean)]
    assert changed == bns                             # every BN re-estimated, none left as sliced
    torch.manual_seed(0)
    off = create_detector("yolo_tiny", num_classes=3, input_size=64).eval()
    r2 = prune_channels(off, ChannelPruneConfig("l1", 0.5, recalibrate_bn=0), bn_batches=data)
    assert r2.bn_recalibrated_images == 0
    assert all(torch.equal(off.get_submodule(n).running_mean, plain.get_submodule(n).running_mean) for n in bns)


@pytest.mark.parametrize("cls,kw", [(ChannelPruneConfig, {}), (LayerDropConfig, {"num_blocks": 1})])
@pytest.mark.parametrize("bad", [-1, 2.5, True, "16"])
def test_bad_recalibrate_bn_is_a_clear_error(cls, kw, bad):
    with pytest.raises(ConfigError, match="recalibrate_bn.*integer >= 0"):
        cls(recalibrate_bn=bad, **kw)


def test_recipe_step_recalibrates_on_training_batches(tiny_synth, tmp_path):
    from edge_compress.compress import recipe as R
    from edge_compress.pipeline import open_split

    torch.manual_seed(0)
    model = create_detector("picodet_xs", class_names=open_split(tiny_synth, "val", (64, 64)).class_names,
                            input_size=64, width_mult=0.25)
    recipe = R.Recipe.from_dict({"steps": [{"method": "channel_pruning",
                                            "config": {"ratio": 0.3, "recalibrate_bn": 2}}]})
    R.compress(model, recipe, tiny_synth, tmp_path / "out", progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["reports"][0]["bn_recalibrated_images"] == 24      # 16 + the 8 left of 24 images
    assert report["steps"][0]["config"]["recalibrate_bn"] == 2
