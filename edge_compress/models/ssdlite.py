"""SSDLite on MobileNetV2 / MobileNetV3-Small (Sandler et al. 2018; Howard et al. 2019).

Architecture:

* ``backbone``: MobileNet inverted residuals (``expand`` 1x1 -> ``dw`` kxk ->
  optional ``se`` -> linear ``project`` 1x1), grouped so that ``backbone.stage{k}``
  outputs stride ``2**k``; ``backbone.last_conv`` is the final 1x1 conv.
  SSDLite taps the stride-16 level at the *expansion* output of the first
  stride-32 block (``stage5.0.expand``), the stride-32 level after ``last_conv``.
* ``extras.{i}``: SSDLite extra blocks (1x1 reduce -> depthwise 3x3 stride 2 ->
  1x1), one per further level (strides 64, 128). All stride-2 convs are
  k3/s2/p1 (or k5/s2/p2), so a level's map is ``ceil(H / stride)``, which is
  what ``postprocess.feature_size`` assumes.
* ``head.{i}``: per level a depthwise 3x3 + BN + ReLU6 (``dw``) and one 1x1 conv
  (``pred``) to ``A * (4 + 1 + C)``: SSD offsets ``dx, dy, dw, dh``, a background
  logit and C class logits, decoded by ``postprocess._decode_ssd``.

Default boxes follow the SSD scale rule (Liu et al. 2016, eq. 4): 4 per location
(aspect 1 at ``s_k`` and at ``sqrt(s_k s_{k+1})``, aspects 2 and 1/2 at ``s_k``), with
``s_k`` linear from 0.06 to 0.7 instead of SSD's 0.2 to 0.95: our objects run from
~8 px to about half of a 320-px image, so the first level starts at 19 px (its
smallest side is 13.6 px) and no level is spent on boxes larger than the image.
With a stride-16 first level, objects under ~16 px mostly get only their forced
best prior; a simulated 8-160 px log-uniform object set gets a median best IoU of
0.53 (0.30 with SSD's 0.2-0.95 scales).

The loss is the SSD MultiBox loss: each prior takes its highest-IoU GT when that
IoU >= 0.5 and each GT is forced onto its best prior; smooth-L1 on the encoded
offsets (variances 0.1, 0.2) of positives; softmax cross-entropy over background +
C classes with 3:1 hard negative mining (at least 16 negatives per image, so images
without objects still teach background); both normalised by the number of
positives. Softmax CE rather than focal loss because the shared decode scores
with a softmax over ``1 + C``, which is what CE + mining calibrates.
The prediction bias starts at background probability 0.99 (the prior-probability
init of Lin et al. 2017, for a softmax).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_compress.errors import ConfigError
from edge_compress.models import postprocess as pp
from edge_compress.models.base import Detector, InputSpec, resolve_common
from edge_compress.models.boxes import box_area
from edge_compress.models.layers import ConvBNAct, SqueezeExcite, flatten_head, make_divisible
from edge_compress.models.registry import register_detector

STRIDES = (16, 32, 64, 128)

# Block specs: (kernel, expansion channels, out channels, SE, activation, stride),
# channels at width 1.0; expansion == input channels means "no expansion conv".


def _mobilenet_v2_blocks() -> tuple[tuple, ...]:
    """Sandler et al. 2018, Table 2: (t, c, n, s) rows unrolled into blocks."""
    blocks, c_in = [], 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            blocks.append((3, t * c_in, c, False, "relu6", s if i == 0 else 1))
            c_in = c
    return tuple(blocks)


MOBILENET_V2 = {"stem": (32, "relu6"), "blocks": _mobilenet_v2_blocks(), "last": 1280}
MOBILENET_V3_SMALL = {  # Howard et al. 2019, Table 2
    "stem": (16, "hswish"),
    "blocks": (
        (3, 16, 16, True, "relu", 2),
        (3, 72, 24, False, "relu", 2), (3, 88, 24, False, "relu", 1),
        (5, 96, 40, True, "hswish", 2), (5, 240, 40, True, "hswish", 1), (5, 240, 40, True, "hswish", 1),
        (5, 120, 48, True, "hswish", 1), (5, 144, 48, True, "hswish", 1),
        (5, 288, 96, True, "hswish", 2), (5, 576, 96, True, "hswish", 1), (5, 576, 96, True, "hswish", 1),
    ),
    "last": 576,
}
BACKBONES = {"mobilenet_v2": MOBILENET_V2, "mobilenet_v3_small": MOBILENET_V3_SMALL}


def ssd_default_boxes(height: int, width: int, num_levels: int = len(STRIDES), min_scale: float = 0.06,
                      max_scale: float = 0.7) -> tuple[tuple[tuple[float, float], ...], ...]:
    """Per level the default box (w, h) in input pixels: SSD scales
    ``s_k = min + (max - min) k / (L - 1)``, boxes of aspect 1 at ``s_k`` and at
    ``sqrt(s_k s_{k+1})`` (``s_L = 1``), and aspects 2 and 1/2 at ``s_k``."""
    scales = [min_scale + (max_scale - min_scale) * k / max(num_levels - 1, 1) for k in range(num_levels)] + [1.0]
    levels = []
    for k in range(num_levels):
        s, s_extra = scales[k], math.sqrt(scales[k] * scales[k + 1])
        r = math.sqrt(2.0)
        boxes = ((s, s), (s_extra, s_extra), (s * r, s / r), (s / r, s * r))
        levels.append(tuple((round(bw * width, 4), round(bh * height, 4)) for bw, bh in boxes))
    return tuple(levels)


def decode_ssd(raw: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float] = (0.1, 0.2)
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``postprocess._decode_ssd``: xyxy boxes and softmax class scores."""
    v0, v1 = variances
    cxy = priors[..., 0:2] + raw[..., 0:2] * v0 * priors[..., 2:4]
    wh = priors[..., 2:4] * torch.exp((raw[..., 2:4] * v1).clamp(-10.0, 10.0))
    return torch.cat([cxy - wh / 2, cxy + wh / 2], -1), raw[..., 4:].softmax(-1)[..., 1:]


def encode_ssd(boxes: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float] = (0.1, 0.2)
               ) -> torch.Tensor:
    """Inverse of :func:`decode_ssd` for xyxy ``boxes`` (..., 4) against ``priors`` (..., 5)."""
    v0, v1 = variances
    cxy, wh = (boxes[..., :2] + boxes[..., 2:]) / 2, (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-3)
    return torch.cat([(cxy - priors[..., :2]) / (v0 * priors[..., 2:4]),
                      torch.log(wh / priors[..., 2:4]) / v1], -1)


# ----------------------------------------------------------------------------- network

class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: ``expand`` 1x1 (absent when exp == in) -> ``dw`` kxk ->
    ``se`` (optional) -> linear ``project`` 1x1, with a residual when shapes allow."""

    def __init__(self, c_in: int, c_exp: int, c_out: int, k: int, s: int, se: bool, act: str):
        super().__init__()
        self.expand = ConvBNAct(c_in, c_exp, 1, act=act) if c_exp != c_in else None
        self.dw = ConvBNAct(c_exp, c_exp, k, s, groups=c_exp, act=act)
        self.se = SqueezeExcite(c_exp) if se else None
        self.project = ConvBNAct(c_exp, c_out, 1, act="none")
        self.residual = s == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_expanded(self.expand(x) if self.expand is not None else x, x)

    def forward_expanded(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block after its expansion conv (``h``), given the block input ``x``."""
        h = self.dw(h)
        if self.se is not None:
            h = self.se(h)
        h = self.project(h)
        return x + h if self.residual else h


class MobileNetBackbone(nn.Module):
    """MobileNet trunk returning the SSDLite taps: the stride-16 expansion output of
    the first stride-32 block and the stride-32 ``last_conv`` output."""

    def __init__(self, spec: dict, width_mult: float = 1.0):
        super().__init__()
        ch = lambda c: make_divisible(c * width_mult)  # noqa: E731
        c_stem, act_stem = spec["stem"]
        self.stem = ConvBNAct(3, ch(c_stem), 3, 2, act=act_stem)
        stages: dict[int, list[nn.Module]] = {}
        c_in, stride = ch(c_stem), 2
        for k, c_exp, c_out, se, act, s in spec["blocks"]:
            stride *= s
            stages.setdefault(stride, []).append(InvertedResidual(c_in, ch(c_exp), ch(c_out), k, s, se, act))
            c_in = ch(c_out)
        if max(stages) != 32:
            raise ConfigError(f"backbone spec ends at stride {max(stages)}; SSDLite needs stride 32")
        for st, blocks in stages.items():
            self.add_module(f"stage{int(math.log2(st))}", nn.Sequential(*blocks))
        self.stage_names = [f"stage{int(math.log2(st))}" for st in stages]
        self.last_conv = ConvBNAct(c_in, ch(spec["last"]), 1, act=spec["blocks"][-1][4])
        tap_block = self.stage5[0]
        if tap_block.expand is None:
            raise ConfigError("the first stride-32 block has no expansion conv to tap for SSDLite")
        self.out_channels = (tap_block.expand.conv.out_channels, ch(spec["last"]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        for name in self.stage_names[:-1]:
            x = getattr(self, name)(x)
        first, *rest = self.stage5
        c4 = first.expand(x)
        x = first.forward_expanded(c4, x)
        for block in rest:
            x = block(x)
        return c4, self.last_conv(x)


class ExtraBlock(nn.Sequential):
    """SSDLite extra level: 1x1 reduce -> depthwise 3x3 stride 2 -> 1x1 (ReLU6)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = make_divisible(c_out / 2)
        self.reduce = ConvBNAct(c_in, mid, 1, act="relu6")
        self.dw = ConvBNAct(mid, mid, 3, 2, groups=mid, act="relu6")
        self.expand = ConvBNAct(mid, c_out, 1, act="relu6")


class SSDLiteHeadLevel(nn.Module):
    """Depthwise 3x3 + BN + ReLU6, then one 1x1 conv to ``A * (4 + 1 + C)``."""

    def __init__(self, c_in: int, num_anchors: int, channels: int):
        super().__init__()
        self.num_anchors = num_anchors
        self.dw = ConvBNAct(c_in, c_in, 3, groups=c_in, act="relu6")
        self.pred = nn.Conv2d(c_in, num_anchors * channels, 1)

    def init_biases(self, num_classes: int, prior_prob: float = 0.01) -> None:
        """Start with background probability ~0.99 (Lin et al. 2017 prior init, for
        softmax): keeps the first steps' loss from being swamped by easy negatives."""
        nn.init.normal_(self.pred.weight, std=0.01)
        b = self.pred.bias.detach().view(self.num_anchors, -1)
        b.zero_()
        b[:, 4] = math.log(num_classes * (1 - prior_prob) / prior_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flatten_head(self.pred(self.dw(x)), self.num_anchors)


# ----------------------------------------------------------------------------- detector

class SSDLiteDetector(Detector):
    family = "ssdlite"

    iou_thresh = 0.5     # prior <-> GT match threshold (SSD)
    neg_pos_ratio = 3    # hard negative mining ratio (SSD)
    min_negatives = 16   # negatives kept per image even with no positive (images without objects)

    def __init__(self, name: str, input_spec: InputSpec, class_names: tuple[str, ...],
                 backbone: str = "mobilenet_v2", width_mult: float = 1.0):
        anchors = ssd_default_boxes(input_spec.height, input_spec.width)
        post = pp.PostProcessConfig(head="ssd", num_classes=len(class_names), strides=STRIDES, anchors=anchors)
        super().__init__(name, input_spec, class_names, post)
        self.backbone = MobileNetBackbone(BACKBONES[backbone], width_mult)
        c16, c32 = self.backbone.out_channels
        extra_channels = [make_divisible(512 * width_mult), make_divisible(256 * width_mult)]
        self.extras = nn.ModuleList()
        c_prev = c32
        for c in extra_channels:
            self.extras.append(ExtraBlock(c_prev, c))
            c_prev = c
        self.head = nn.ModuleList(SSDLiteHeadLevel(c, len(a), post.channels)
                                  for c, a in zip([c16, c32, *extra_channels], anchors))
        _init_weights(self)
        for level in self.head:
            level.init_biases(self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = list(self.backbone(x))
        for extra in self.extras:
            feats.append(extra(feats[-1]))
        return torch.cat([head(f) for head, f in zip(self.head, feats)], 1)

    def decode(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable torch decode of a raw ``(N, P, K)`` output (same as the NumPy one)."""
        return decode_ssd(raw, self.priors_t, self.post.variances)

    def loss(self, raw: torch.Tensor, targets: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """SSD MultiBox loss ``(CE + smooth-L1) / num_positives`` over the batch."""
        labels, boxes = match_ssd(targets, self.priors_t, self.iou_thresh)  # (N, P), (N, P, 4)
        pos = labels > 0
        num_pos = int(pos.sum())
        loc_t = encode_ssd(boxes[pos], self.priors_t.expand(len(raw), -1, -1)[pos], self.post.variances)
        loc = F.smooth_l1_loss(raw[..., :4][pos].float(), loc_t, reduction="sum", beta=1.0)
        ce = F.cross_entropy(raw[..., 4:].flatten(0, 1).float(), labels.flatten(), reduction="none")
        ce = ce.view(labels.shape)
        neg = hard_negatives(ce.detach(), pos, self.neg_pos_ratio, self.min_negatives)
        conf = ce[pos | neg].sum()
        norm = max(num_pos, 1)
        loc, conf = loc / norm, conf / norm
        return loc + conf, {"box": loc.item(), "cls": conf.item(), "num_pos": float(num_pos)}


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def pad_targets(targets: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """List of (n_i, 5) ``[cls, x1, y1, x2, y2]`` -> classes (N, M) long, boxes (N, M, 4)
    and a validity mask (N, M); boxes with no area are marked invalid."""
    m = max([len(t) for t in targets] + [1])
    padded = torch.zeros(len(targets), m, 5, device=device)
    for i, t in enumerate(targets):  # one copy per image, not per box
        padded[i, :len(t)] = t.detach().to(device, torch.float32).reshape(-1, 5)
    valid = (padded[..., 3] > padded[..., 1]) & (padded[..., 4] > padded[..., 2])
    return padded[..., 0].long(), padded[..., 1:], valid


def batched_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of (N, M, 4) boxes with (P, 4) boxes -> (N, M, P)."""
    lt = torch.maximum(a[..., None, :2], b[:, :2])
    rb = torch.minimum(a[..., None, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (box_area(a)[..., None] + box_area(b) - inter + eps)


@torch.no_grad()
def match_ssd(targets: list[torch.Tensor], priors: torch.Tensor, iou_thresh: float = 0.5
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD matching for the whole batch: each prior takes the GT of highest IoU when
    that IoU >= ``iou_thresh``; each GT is also forced onto its best prior.
    Returns labels (N, P) (0 = background, else class + 1) and matched boxes (N, P, 4)."""
    cls, gt, valid = pad_targets(targets, priors.device)
    n, m = cls.shape
    pboxes = torch.cat([priors[:, :2] - priors[:, 2:4] / 2, priors[:, :2] + priors[:, 2:4] / 2], 1)
    iou = batched_box_iou(gt, pboxes).masked_fill(~valid[..., None], -1.0)  # (N, M, P)
    best_iou, best_gt = iou.max(1)                                         # (N, P)
    best_prior = iou.argmax(2)                                             # (N, M)
    img = torch.arange(n, device=priors.device)[:, None].expand(n, m)
    gt_idx = torch.arange(m, device=priors.device)[None].expand(n, m)
    best_gt[img[valid], best_prior[valid]] = gt_idx[valid]
    best_iou[img[valid], best_prior[valid]] = 2.0
    labels = torch.where(best_iou >= iou_thresh, cls.gather(1, best_gt) + 1, torch.zeros_like(best_gt))
    boxes = gt.gather(1, best_gt[..., None].expand(n, -1, 4))
    return labels, boxes


def hard_negatives(ce: torch.Tensor, pos: torch.Tensor, ratio: int, min_neg: int) -> torch.Tensor:
    """Per image, the ``ratio * num_pos`` (at least ``min_neg``) negatives of highest loss."""
    loss = ce.masked_fill(pos, -math.inf)
    num_neg = (pos.sum(1, keepdim=True) * ratio).clamp(min=min_neg)
    num_neg = torch.minimum(num_neg, (~pos).sum(1, keepdim=True))
    rank = loss.argsort(1, descending=True).argsort(1)
    return rank < num_neg


# ----------------------------------------------------------------------------- factory

def build_ssdlite(name: str = "ssdlite_mbv2", num_classes: int | None = None,
                  class_names: tuple[str, ...] | list[str] | None = None,
                  input_size: int | tuple[int, int] = 320, width_mult: float = 1.0,
                  backbone: str = "mobilenet_v2", **kw) -> SSDLiteDetector:
    """Build an SSDLite detector on a MobileNet backbone (``mobilenet_v2`` or
    ``mobilenet_v3_small``) at ``width_mult``."""
    if kw:
        raise ConfigError(f"ssdlite: unknown option(s) {sorted(kw)}; accepted: num_classes, class_names, "
                          "input_size, width_mult, backbone")
    if backbone not in BACKBONES:
        raise ConfigError(f"ssdlite: backbone '{backbone}' is unknown; choose one of {sorted(BACKBONES)}")
    if not 0 < width_mult <= 4:
        raise ConfigError(f"ssdlite: width_mult={width_mult} is out of range; use a value in (0, 4], e.g. 0.5")
    spec, names = resolve_common(num_classes, class_names, input_size)
    return SSDLiteDetector(name, spec, names, backbone=backbone, width_mult=width_mult)


# Defaults sized for training on a 2-core CPU (forward + backward of 16 images at 320 px,
# 2 threads): MobileNetV2 at width 0.5 (0.39 GFLOPs, ~0.86 s per step; width 1.0 is
# 3.7x the FLOPs) and MobileNetV3-Small at 1.0 (0.29 GFLOPs, ~0.47 s). Unlike
# torchvision, the 1280-channel last conv of MobileNetV2 is scaled with the width too.
register_detector("ssdlite_mbv2", "ssdlite", build_ssdlite,
                  "SSDLite on MobileNetV2 at width 0.5 (CPU-friendly), 4 levels (strides 16-128)",
                  backbone="mobilenet_v2", width_mult=0.5)
register_detector("ssdlite_mbv3", "ssdlite", build_ssdlite,
                  "SSDLite on MobileNetV3-Small at width 1.0, 4 levels (strides 16-128)",
                  backbone="mobilenet_v3_small", width_mult=1.0)
