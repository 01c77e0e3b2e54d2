"""The FLOPs/params counter against hand counts on small nets."""

import torch
from torch import nn

from edge_compress.models.summary import summarize


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)      # 16x16 -> 8x8
        self.dw = nn.Conv2d(8, 8, 3, 1, 1, groups=8)          # depthwise
        self.g = nn.Conv2d(8, 4, 1, 1, 0, groups=2)           # grouped 1x1
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.bn(self.g(self.dw(self.c1(x))))
        return self.fc(x.mean((2, 3)))


def test_counts_match_hand_computation():
    s = summarize(Tiny(), (1, 3, 16, 16))
    by = {r.name: r for r in s.layers}
    assert by["c1"].macs == 8 * 8 * 8 * 3 * 3 * 3          # OC*OH*OW*KH*KW*IC
    assert by["dw"].macs == 8 * 8 * 8 * 3 * 3 * 8 // 8     # / groups
    assert by["g"].macs == 4 * 8 * 8 * 1 * 1 * 8 // 2
    assert by["fc"].macs == 4 * 5
    assert s.macs == 13824 + 4608 + 1024 + 20
    assert s.flops == 2 * s.macs
    assert by["c1"].params == 8 * 3 * 9 and by["dw"].params == 8 * 9 + 8
    assert s.params == 216 + 80 + 20 + 8 + 25          # bn weight+bias counted in the total
    assert by["c1"].out_shape == (1, 8, 8, 8)


def test_batch_size_does_not_change_per_image_counts():
    one, four = summarize(Tiny(), (1, 3, 16, 16)), summarize(Tiny(), (4, 3, 16, 16))
    assert one.macs == four.macs


def test_summary_leaves_training_mode_and_hooks_alone():
    m = Tiny().train()
    summarize(m, (1, 3, 16, 16))
    assert m.training
    assert all(not mod._forward_hooks for mod in m.modules())
    assert torch.isfinite(m(torch.zeros(1, 3, 16, 16))).all()
