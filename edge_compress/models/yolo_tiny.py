"""YOLOv4-tiny style detector: CSP-Darknet-tiny backbone, two-scale FPN, anchor head.

Architecture (Bochkovskiy et al. 2020, "YOLOv4", and the darknet yolov4-tiny.cfg),
widths scaled by ``width_mult`` (1.0 = the original 32..512 channels):

* ``backbone.stem``: two 3x3 stride-2 convs (stride 4);
* ``backbone.stage3/4/5``: CSP-tiny blocks (3x3 conv, channel-split route of its
  second half through two 3x3 convs, 1x1 fuse, concat with the block input)
  each followed by a 2x2 max-pool, so ``stage{k}`` outputs stride ``2**k``;
  ``stage5`` also hands its pre-pool fuse output (stride 16) to the neck;
* ``backbone.conv5``: 3x3 conv at stride 32;
* ``neck``: 1x1 reduce -> 3x3 (stride-32 branch); 1x1 lateral -> nearest x2
  upsample -> concat with the stride-16 route -> 3x3 (stride-16 branch);
* ``head.pred16`` / ``head.pred32``: 1x1 convs to ``A * (5 + C)`` channels.

Raw output per prior: ``tx, ty, tw, th, objectness, C class logits``, decoded by
``postprocess._decode_yolo`` (YOLOv5's bounded decode). The loss follows YOLOv5
(Jocher et al., ultralytics/yolov5 ``utils/loss.py``): shape-ratio anchor
matching at the GT cell plus its two nearest neighbour cells, CIoU box loss,
IoU-valued objectness targets, per-level objectness balance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_compress.errors import ConfigError
from edge_compress.models import postprocess as pp
from edge_compress.models.base import Detector, InputSpec, resolve_common
from edge_compress.models.boxes import aligned_iou
from edge_compress.models.layers import ConvBNAct, flatten_head, make_divisible
from edge_compress.models.registry import register_detector

STRIDES = (16, 32)
# YOLOv4-tiny COCO anchors (w, h) at 416x416 input, per stride (16, 32).
ANCHORS_416 = (((10, 14), (23, 27), (37, 58)), ((81, 82), (135, 169), (344, 319)))


def scaled_anchors(height: int, width: int) -> tuple[tuple[tuple[float, float], ...], ...]:
    """The 416-px anchors rescaled to a ``height x width`` input, in input pixels."""
    return tuple(tuple((w * width / 416.0, h * height / 416.0) for w, h in lvl) for lvl in ANCHORS_416)


def decode_yolo_boxes(t: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """``tx, ty, tw, th`` (..., 4) and priors (..., 5) -> xyxy boxes in input pixels
    (YOLOv5's bounded decode: centre within +-1 stride, size within 4x the anchor)."""
    cxy = priors[..., 0:2] + (2.0 * t[..., 0:2].sigmoid() - 1.0) * priors[..., 4:5]
    wh = priors[..., 2:4] * (2.0 * t[..., 2:4].sigmoid()) ** 2
    return torch.cat([cxy - wh / 2, cxy + wh / 2], -1)


def decode_yolo(raw: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``postprocess._decode_yolo``: raw ``(..., 5+C)`` and priors
    ``(..., 5)`` -> xyxy boxes ``(..., 4)`` and scores ``(..., C)``."""
    scores = raw[..., 4:5].sigmoid() * raw[..., 5:].sigmoid()
    return decode_yolo_boxes(raw[..., :4], priors), scores


# ----------------------------------------------------------------------------- network

class CSPTinyBlock(nn.Module):
    """YOLOv4-tiny CSP block on ``c`` channels -> (pooled ``2c`` output, ``c`` fuse output).

    darknet: conv3x3 -> route groups=2 group_id=1 (second half) -> conv3x3 ->
    conv3x3 -> concat -> conv1x1 -> concat with the first conv -> maxpool 2x2.
    """

    def __init__(self, c: int):
        super().__init__()
        if c % 2:
            raise ConfigError(f"CSP-tiny block needs an even channel count, got {c}")
        h = c // 2
        self.conv1 = ConvBNAct(c, c, 3, act="leaky")
        self.conv2 = ConvBNAct(h, h, 3, act="leaky")
        self.conv3 = ConvBNAct(h, h, 3, act="leaky")
        self.conv4 = ConvBNAct(c, c, 1, act="leaky")
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)  # ceil: same sizes as k3/s2/p1 convs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1 = self.conv1(x)
        x2 = self.conv2(x1[:, x1.shape[1] // 2:])
        x3 = self.conv3(x2)
        fuse = self.conv4(torch.cat([x3, x2], 1))
        return self.pool(torch.cat([x1, fuse], 1)), fuse


class CSPDarknetTiny(nn.Module):
    """Returns the stride-16 route (``c16`` channels) and the stride-32 map (``c32``)."""

    def __init__(self, width_mult: float = 1.0):
        super().__init__()
        ch = lambda c: make_divisible(c * width_mult)  # noqa: E731
        c0, c1 = ch(32), ch(64)
        self.stem = nn.Sequential(ConvBNAct(3, c0, 3, 2, act="leaky"), ConvBNAct(c0, c1, 3, 2, act="leaky"))
        self.stage3 = CSPTinyBlock(c1)
        self.stage4 = CSPTinyBlock(2 * c1)
        self.stage5 = CSPTinyBlock(4 * c1)
        self.conv5 = ConvBNAct(8 * c1, ch(512), 3, act="leaky")
        self.c16, self.c32 = 4 * c1, ch(512)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.stage3(self.stem(x))
        x, _ = self.stage4(x)
        x, route16 = self.stage5(x)
        return route16, self.conv5(x)


class TinyFPN(nn.Module):
    """YOLOv4-tiny neck: outputs (stride-16, stride-32) feature maps."""

    def __init__(self, c16: int, c32: int, width_mult: float = 1.0):
        super().__init__()
        ch = lambda c: make_divisible(c * width_mult)  # noqa: E731
        self.reduce = ConvBNAct(c32, ch(256), 1, act="leaky")
        self.p5 = ConvBNAct(ch(256), ch(512), 3, act="leaky")
        self.lateral = ConvBNAct(ch(256), ch(128), 1, act="leaky")
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.p4 = ConvBNAct(ch(128) + c16, ch(256), 3, act="leaky")
        self.out_channels = (ch(256), ch(512))

    def forward(self, route16: torch.Tensor, x32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.reduce(x32)
        p4 = self.p4(torch.cat([self.upsample(self.lateral(r)), route16], 1))
        return p4, self.p5(r)


class YoloHead(nn.Module):
    def __init__(self, in_channels: tuple[int, int], num_anchors: int, num_outputs: int):
        super().__init__()
        self.num_anchors = num_anchors
        self.pred16 = nn.Conv2d(in_channels[0], num_anchors * num_outputs, 1)
        self.pred32 = nn.Conv2d(in_channels[1], num_anchors * num_outputs, 1)

    def init_biases(self, num_classes: int) -> None:
        """YOLOv5 prior init: objectness for ~8 objects per 640x640 image, class
        probability ~0.6/C, so early training is not swamped by the objectness loss."""
        for conv, s in ((self.pred16, 16), (self.pred32, 32)):
            b = conv.bias.detach().view(self.num_anchors, -1)
            b.zero_()
            b[:, 4] = math.log(8 / (640 / s) ** 2)
            b[:, 5:] = math.log(0.6 / (num_classes - 0.99))

    def forward(self, p4: torch.Tensor, p5: torch.Tensor) -> torch.Tensor:
        a = self.num_anchors
        return torch.cat([flatten_head(self.pred16(p4), a), flatten_head(self.pred32(p5), a)], 1)


# ----------------------------------------------------------------------------- detector

class YoloTinyDetector(Detector):
    family = "yolo_tiny"

    # Loss hyper-parameters: YOLOv5 hyp.scratch-low.yaml (box 0.05, obj 1.0, cls 0.5,
    # anchor_t 4.0), rescaled in __init__ the way yolov5 train.py does: box, obj and cls
    # by 3 / num_levels (fewer levels -> fewer summed terms), obj by (input / 640)^2
    # (the objectness mean is over fewer cells at a smaller input), cls by C / 80 (the
    # class BCE is a mean over C outputs). At 320 px, 8 classes: box 0.075, obj 0.375,
    # cls 0.075. These were kept as is: they trained yolo_tiny to AP50 0.88 on the
    # synthetic set in 6 epochs (750 steps of 16) with the default TrainConfig.
    anchor_t = 4.0
    balance = (4.0, 1.0)  # objectness weight per level (stride 16, 32): yolov5's first two

    def __init__(self, name: str, input_spec: InputSpec, class_names: tuple[str, ...],
                 width_mult: float = 1.0):
        post = pp.PostProcessConfig(head="yolo", num_classes=len(class_names), strides=STRIDES,
                                    anchors=scaled_anchors(input_spec.height, input_spec.width))
        super().__init__(name, input_spec, class_names, post)
        self.backbone = CSPDarknetTiny(width_mult)
        self.neck = TinyFPN(self.backbone.c16, self.backbone.c32, width_mult)
        self.head = YoloHead(self.neck.out_channels, 3, post.channels)
        self.head.init_biases(self.num_classes)
        nl, nc = len(STRIDES), self.num_classes
        self.box_gain = 0.05 * 3 / nl
        self.cls_gain = 0.5 * nc / 80 * 3 / nl
        self.obj_gain = 1.0 * (input_spec.height * input_spec.width / 640 ** 2) * 3 / nl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.neck(*self.backbone(x)))

    def decode(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable torch decode of a raw ``(N, P, K)`` output (same as the NumPy one)."""
        return decode_yolo(raw, self.priors_t)

    def _levels(self) -> list[tuple[int, int, int, int, torch.Tensor]]:
        """Per level: (first prior index, grid h, grid w, stride, anchors (A, 2) in pixels)."""
        out, start = [], 0
        for s, anchors in zip(self.post.strides, self.post.anchors):
            gh, gw = pp.feature_size(self.input_spec.height, s), pp.feature_size(self.input_spec.width, s)
            out.append((start, gh, gw, s, torch.tensor(anchors, dtype=torch.float32)))
            start += gh * gw * len(anchors)
        return out

    def loss(self, raw: torch.Tensor, targets: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """YOLOv5 loss. Returns ``(box + obj + cls) * batch_size`` like yolov5's
        ``ComputeLoss`` (each term is a per-image mean, the sum is scaled by the batch
        size so SGD sees a per-image gradient sum); components are the scaled terms."""
        n = raw.shape[0]
        gt = _stack_targets(targets, raw.device)
        zero = raw.sum() * 0.0
        lbox, lobj, lcls, num_pos = zero, zero, zero, 0
        for lvl, (start, gh, gw, s, anchors) in enumerate(self._levels()):
            a = len(anchors)
            p = raw[:, start:start + gh * gw * a]
            tobj = torch.zeros(p.shape[:2], dtype=p.dtype, device=p.device)
            b, cls, idx, tbox = assign_yolo(gt, anchors.to(raw.device), s, gh, gw, self.anchor_t)
            if b.numel():
                ps = p[b, idx]
                pbox = decode_yolo_boxes(ps[:, :4], self.priors_t[start + idx])
                iou = aligned_iou(pbox.float(), tbox, kind="ciou")
                lbox = lbox + (1.0 - iou).mean()
                tobj[b, idx] = iou.detach().clamp(min=0).to(tobj.dtype)
                tcls = F.one_hot(cls, self.num_classes).to(ps.dtype)
                lcls = lcls + F.binary_cross_entropy_with_logits(ps[:, 5:], tcls)
                num_pos += int(b.numel())
            lobj = lobj + F.binary_cross_entropy_with_logits(p[..., 4], tobj) * self.balance[lvl]
        lbox, lobj, lcls = lbox * self.box_gain * n, lobj * self.obj_gain * n, lcls * self.cls_gain * n
        total = lbox + lobj + lcls
        return total, {"box": lbox.item(), "obj": lobj.item(), "cls": lcls.item(), "num_pos": float(num_pos)}


def _stack_targets(targets: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """List of (n_i, 5) ``[cls, x1, y1, x2, y2]`` -> (T, 6) ``[img, cls, x1, y1, x2, y2]``,
    boxes with no area dropped."""
    rows = [torch.cat([torch.full((len(t), 1), float(i), device=device),
                       t.detach().to(device, torch.float32).reshape(-1, 5)], 1)
            for i, t in enumerate(targets)]
    gt = torch.cat(rows, 0) if rows else torch.zeros(0, 6, device=device)
    return gt[(gt[:, 4] > gt[:, 2]) & (gt[:, 5] > gt[:, 3])]


# Neighbour cells: yolov5 offsets (self, left, up, right, down) scaled by g = 0.5.
_OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32) * 0.5


def assign_yolo(gt: torch.Tensor, anchors: torch.Tensor, stride: int, gh: int, gw: int,
                anchor_t: float = 4.0) -> tuple[torch.Tensor, ...]:
    """YOLOv5 ``build_targets`` for one level, vectorised over every GT of the batch.

    ``gt`` (T, 6) ``[img, cls, x1, y1, x2, y2]`` in pixels, ``anchors`` (A, 2) in pixels.
    A GT goes to every anchor whose shape ratio ``max(r, 1/r) < anchor_t``, at its own
    cell and the two nearest neighbour cells: their decoded centres reach
    ``(-0.5, 1.5)`` cells around the cell corner, so they can still hit it.
    Returns image index, class, prior index within the level (``(y*gw + x)*A + a``)
    and the GT box (xyxy pixels) of every positive.
    """
    na = len(anchors)
    cxy = (gt[:, 2:4] + gt[:, 4:6]) / 2 / stride            # centre in grid units
    wh = gt[:, 4:6] - gt[:, 2:4]
    r = wh[None] / anchors[:, None]                          # (A, T, 2)
    match = torch.max(r, 1 / r).max(2).values < anchor_t     # (A, T)
    ai, ti = match.nonzero(as_tuple=True)
    gxy = cxy[ti]
    gxi = torch.tensor([gw, gh], dtype=gxy.dtype, device=gxy.device) - gxy
    j, k = ((gxy % 1 < 0.5) & (gxy > 1)).T
    l, m = ((gxi % 1 < 0.5) & (gxi > 1)).T
    sel = torch.stack([torch.ones_like(j), j, k, l, m])     # (5, M)
    off = _OFFSETS.to(gxy.device)[:, None].expand(5, len(gxy), 2)[sel]
    ai, ti = ai.repeat(5, 1)[sel], ti.repeat(5, 1)[sel]
    gij = (cxy[ti] - off).long()
    gi, gj = gij[:, 0].clamp(0, gw - 1), gij[:, 1].clamp(0, gh - 1)
    idx = (gj * gw + gi) * na + ai
    return gt[ti, 0].long(), gt[ti, 1].long(), idx, gt[ti, 2:6]


# ----------------------------------------------------------------------------- factory

def build_yolo_tiny(name: str = "yolo_tiny", num_classes: int | None = None,
                    class_names: tuple[str, ...] | list[str] | None = None,
                    input_size: int | tuple[int, int] = 320, width_mult: float = 1.0,
                    **kw) -> YoloTinyDetector:
    """Build a YOLOv4-tiny style detector (``width_mult`` 1.0 = the original widths)."""
    if kw:
        raise ConfigError(f"yolo_tiny: unknown option(s) {sorted(kw)}; accepted: num_classes, "
                          "class_names, input_size, width_mult")
    if not 0 < width_mult <= 4:
        raise ConfigError(f"yolo_tiny: width_mult={width_mult} is out of range; use a value in (0, 4], e.g. 0.5")
    spec, names = resolve_common(num_classes, class_names, input_size)
    return YoloTinyDetector(name, spec, names, width_mult=width_mult)


# yolo_tiny: half width (1.0 GFLOPs at 320 px, ~0.44 s for forward + backward of 16
# images on 2 CPU threads) for the 20-minute CPU training budget; yolo_tiny_l: the
# original widths (4.0 GFLOPs, ~1.2 s).
register_detector("yolo_tiny", "yolo_tiny", build_yolo_tiny,
                  "YOLOv4-tiny at half width (CSP-Darknet-tiny, 2-level FPN, 3 anchors/level); CPU-friendly",
                  width_mult=0.5)
register_detector("yolo_tiny_l", "yolo_tiny", build_yolo_tiny,
                  "YOLOv4-tiny at full width (channels 32..512, as darknet yolov4-tiny.cfg)",
                  width_mult=1.0)
