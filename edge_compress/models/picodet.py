"""PP-PicoDet-style detectors (Yu et al. 2021, "PP-PicoDet: A Better Real-Time
Object Detector on Mobile Devices", arXiv:2111.00902).

* backbone: ESNet-like, i.e. ShuffleNetV2 units (channel split + shuffle; stride-2
  units with two branches) with Squeeze-Excite in every unit;
* neck: CSP-PAN, 1x1 convs to one width, then top-down and bottom-up paths whose
  fusion blocks are CSP blocks of depthwise-separable convs;
* head: GFL head (Li et al. 2020, "Generalized Focal Loss"): per level a tower of
  depthwise-separable convs and one 1x1 conv to ``C + 4 * (reg_max + 1)``
  channels, class logits (IoU-quality aware) then four distance distributions;
* loss: Quality Focal Loss + GIoU + Distribution Focal Loss, with the
  Task-Aligned assigner (TOOD, Feng et al. 2021), vectorised over the batch.
  PicoDet / PP-YOLOE warm up with a static ATSS assigner (Zhang et al. 2020);
  that is here too (``assigner_warmup_steps``) but off by default: on the
  synthetic set it did not help (AP50 0.875 with 300 warm-up steps vs 0.880
  without, 9 epochs), since TAL's ``IoU ** 6`` already acts as a scale prior
  while the initial boxes are all ~7 strides wide.

Three levels (strides 8, 16, 32) by default: with ``reg_max = 7`` the stride-32
level reaches 224 px per side, enough for 320-px inputs; PicoDet's extra stride-64
level (``extra_level=True``) costs little (0.654 vs 0.651 GFLOPs, 4 more ops per
level in training) but buys nothing at this size.

The forward output is the raw ``(N, P, K)`` tensor of the ``gfl`` post-process
(:mod:`edge_compress.models.postprocess`); nothing here decodes at inference.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from edge_compress.errors import ConfigError, DataError
from edge_compress.models import postprocess as pp
from edge_compress.models.base import Detector, InputSpec, resolve_common
from edge_compress.models.boxes import aligned_iou
from edge_compress.models.layers import ACTIVATIONS, ConvBNAct, DWSeparable, SqueezeExcite, flatten_head, make_divisible
from edge_compress.models.registry import register_detector

# --------------------------------------------------------------------------- backbone


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _seq(**modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(modules))


class ESUnit(nn.Module):
    """ShuffleNetV2 unit with SE (ESNet). Stride 1: half the channels pass through,
    the other half runs ``pw1 -> dw -> se -> pw2``. Stride 2: ``branch1`` (dw s2 -> pw)
    and ``branch2`` (pw1 -> dw s2 -> se -> pw2) each make half of the output."""

    def __init__(self, c_in: int, c_out: int, stride: int, act: str):
        super().__init__()
        if stride not in (1, 2) or (stride == 1 and c_in != c_out) or c_out % 2:
            raise ConfigError(f"ESUnit({c_in}, {c_out}, stride={stride}): stride 1 needs c_in == c_out, "
                              "stride must be 1 or 2 and c_out even")
        self.stride = stride
        half = c_out // 2
        b2_in = c_in if stride == 2 else half
        if stride == 2:
            self.branch1 = _seq(dw=ConvBNAct(c_in, c_in, 3, 2, groups=c_in, act="none"),
                                pw=ConvBNAct(c_in, half, 1, act=act))
        self.branch2 = _seq(pw1=ConvBNAct(b2_in, half, 1, act=act),
                            dw=ConvBNAct(half, half, 3, stride, groups=half, act="none"),
                            se=SqueezeExcite(half),
                            pw2=ConvBNAct(half, half, 1, act=act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)


class ESNet(nn.Module):
    """Stem (conv 3x3 s2 + maxpool, stride 4), then ``stage2..stage4`` (strides 8, 16, 32).
    Returns the three stage outputs."""

    def __init__(self, stem: int, channels: tuple[int, int, int], repeats: tuple[int, int, int], act: str):
        super().__init__()
        self.stem = ConvBNAct(3, stem, 3, 2, act=act)
        self.pool = nn.MaxPool2d(3, 2, 1)
        c_prev = stem
        for i, (c, n) in enumerate(zip(channels, repeats)):
            units = [ESUnit(c_prev, c, 2, act)] + [ESUnit(c, c, 1, act) for _ in range(n - 1)]
            self.add_module(f"stage{i + 2}", nn.Sequential(*units))
            c_prev = c
        self.out_channels = tuple(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.pool(self.stem(x))
        outs = []
        for stage in (self.stage2, self.stage3, self.stage4):
            x = stage(x)
            outs.append(x)
        return outs


# --------------------------------------------------------------------------- neck


class CSPBlock(nn.Module):
    """CSP block of CSP-PAN: ``main`` and ``short`` 1x1 convs to half width, ``n``
    bottlenecks (1x1 conv + depthwise-separable kxk) on the main path, 1x1 ``fuse``."""

    def __init__(self, c_in: int, c_out: int, k: int, n: int, act: str):
        super().__init__()
        hid = c_out // 2
        self.main = ConvBNAct(c_in, hid, 1, act=act)
        self.short = ConvBNAct(c_in, hid, 1, act=act)
        self.blocks = nn.Sequential(*[_seq(conv=ConvBNAct(hid, hid, 1, act=act),
                                           dwsep=DWSeparable(hid, hid, k, act=act)) for _ in range(n)])
        self.fuse = ConvBNAct(2 * hid, c_out, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.blocks(self.main(x)), self.short(x)], 1))


class CSPPAN(nn.Module):
    """1x1 ``reduce`` convs to ``c`` channels, top-down (nearest upsample + concat + CSP)
    and bottom-up (depthwise-separable s2 ``downsample`` + concat + CSP) paths; with
    ``extra_level`` a stride-2x level is added on top, as in PicoDet:
    ``extra_in(reduced top) + extra_out(top output)``."""

    def __init__(self, in_channels: tuple[int, ...], c: int, k: int, n: int, act: str, extra_level: bool):
        super().__init__()
        levels = len(in_channels)
        self.reduce = nn.ModuleList(ConvBNAct(ci, c, 1, act=act) for ci in in_channels)
        self.top_down = nn.ModuleList(CSPBlock(2 * c, c, k, n, act) for _ in range(levels - 1))
        self.downsample = nn.ModuleList(DWSeparable(c, c, k, 2, act=act) for _ in range(levels - 1))
        self.bottom_up = nn.ModuleList(CSPBlock(2 * c, c, k, n, act) for _ in range(levels - 1))
        self.extra_level = extra_level
        if extra_level:
            self.extra_in = DWSeparable(c, c, k, 2, act=act)
            self.extra_out = DWSeparable(c, c, k, 2, act=act)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x = [r(f) for r, f in zip(self.reduce, feats)]
        inner = [x[-1]]                                   # top-down, coarsest first
        for i in range(len(x) - 2, -1, -1):
            up = F.interpolate(inner[0], size=x[i].shape[-2:], mode="nearest")
            inner.insert(0, self.top_down[i](torch.cat([up, x[i]], 1)))
        outs = [inner[0]]                                 # bottom-up, finest first
        for i in range(len(x) - 1):
            down = self.downsample[i](outs[-1])
            outs.append(self.bottom_up[i](torch.cat([down, inner[i + 1]], 1)))
        if self.extra_level:
            outs.append(self.extra_in(x[-1]) + self.extra_out(outs[-1]))
        return outs


# --------------------------------------------------------------------------- head


class GFLHead(nn.Module):
    """Per level: ``tower.<l>`` of depthwise-separable convs, then ``pred.<l>`` 1x1 conv
    to ``C + 4 * (reg_max + 1)`` (class logits first, then l, t, r, b distributions)."""

    def __init__(self, c: int, levels: int, num_convs: int, k: int, num_classes: int, reg_max: int, act: str):
        super().__init__()
        out = num_classes + 4 * (reg_max + 1)
        self.num_classes = num_classes
        self.tower = nn.ModuleList(
            nn.Sequential(*[DWSeparable(c, c, k, act=act) for _ in range(num_convs)]) for _ in range(levels))
        self.pred = nn.ModuleList(nn.Conv2d(c, out, 1) for _ in range(levels))
        prior_bias = -math.log((1 - 0.01) / 0.01)   # RetinaNet/GFL: initial score ~0.01
        for conv in self.pred:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            nn.init.constant_(conv.bias[:num_classes], prior_bias)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p(t(f)) for t, p, f in zip(self.tower, self.pred, feats)]


# --------------------------------------------------------------------------- loss pieces


def gfl_boxes(reg: torch.Tensor, priors: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Torch twin of ``postprocess._decode_gfl``'s boxes: ``reg (..., P, 4*(R+1))`` ->
    xyxy ``(..., P, 4)`` in input pixels (expected distance x stride around the centre)."""
    prob = reg.reshape(*reg.shape[:-1], 4, reg_max + 1).softmax(-1)
    d = (prob @ torch.arange(reg_max + 1, dtype=reg.dtype, device=reg.device)) * priors[:, 4:5]
    return torch.cat([priors[:, :2] - d[..., :2], priors[:, :2] + d[..., 2:]], -1)


def dfl_targets(centers: torch.Tensor, strides: torch.Tensor, boxes: torch.Tensor, reg_max: int) -> torch.Tensor:
    """GT distances l, t, r, b in stride units, clamped to ``[0, reg_max - 0.01]`` so the
    upper bin ``floor + 1`` always exists. Shapes: (..., 2), (...), (..., 4) -> (..., 4)."""
    s = strides[..., None]
    d = torch.cat([centers - boxes[..., :2], boxes[..., 2:] - centers], -1) / s
    return d.clamp(0.0, reg_max - 0.01)


def distribution_focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL (GFL paper eq. 6): cross-entropy towards the two bins around a continuous
    target, weighted by closeness. ``logits (..., R+1)``, ``target (...)`` -> ``(...)``."""
    left = target.floor().long()
    w_right = target - left.to(target.dtype)
    logp = logits.log_softmax(-1)
    lp_left = logp.gather(-1, left[..., None])[..., 0]
    lp_right = logp.gather(-1, (left + 1)[..., None])[..., 0]
    return -(lp_left * (1.0 - w_right) + lp_right * w_right)


def quality_focal_loss(logits: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """QFL (GFL paper eq. 5), element-wise: BCE towards a soft IoU-quality target,
    modulated by ``|sigmoid - target| ** beta``; negatives have target 0."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return bce * (logits.sigmoid() - target).abs().pow(beta)


def pad_targets(targets: list[torch.Tensor], num_classes: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """List of ``(n_i, 5)`` -> classes ``(N, M)``, boxes ``(N, M, 4)``, valid ``(N, M)``
    with ``M = max(1, max n_i)``; empty boxes (zero width or height) are invalid."""
    rows = [t.to(device=device, dtype=torch.float32).reshape(-1, 5) for t in targets]
    gt = nn.utils.rnn.pad_sequence(rows, batch_first=True)
    if gt.shape[1] == 0:
        gt = gt.new_zeros(len(rows), 1, 5)
    m = gt.shape[1]
    counts = torch.tensor([len(t) for t in targets], device=device)
    valid = torch.arange(m, device=device)[None] < counts[:, None]
    valid &= (gt[..., 3] > gt[..., 1]) & (gt[..., 4] > gt[..., 2])
    cls = gt[..., 0].long()
    if valid.any() and ((cls[valid] < 0) | (cls[valid] >= num_classes)).any():
        bad = sorted(set(cls[valid].tolist()) - set(range(num_classes)))
        raise DataError(f"target class ids {bad} are outside 0..{num_classes - 1}; "
                        "check the dataset's category mapping against the model's class_names")
    return cls.clamp(0, num_classes - 1), gt[..., 1:], valid


def batched_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of ``a (N, M, 4)`` against ``b (N, P, 4)`` -> ``(N, M, P)``."""
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter + eps)


def candidate_mask(priors: torch.Tensor, gt_boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(N, M, P)``: priors whose centre lies strictly inside the GT box. A GT too small
    to contain any centre falls back to the prior of each level whose cell holds the GT
    centre (``|centre offset| <= stride / 2``), so no valid GT is left without candidates."""
    c, s = priors[:, :2], priors[:, 4]
    lt = c[None, None] - gt_boxes[:, :, None, :2]
    rb = gt_boxes[:, :, None, 2:] - c[None, None]
    inside = torch.cat([lt, rb], -1).amin(-1) > 1e-3
    gt_c = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
    cell = ((c[None, None] - gt_c[:, :, None]).abs().amax(-1) <= s / 2)
    fallback = cell & ~inside.any(-1, keepdim=True)
    return (inside | fallback) & valid[..., None]


def resolve_conflicts(mask: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A prior matched to several GTs keeps the one of highest IoU. ``mask, iou (N, M, P)``
    -> foreground ``(N, P)`` bool and the assigned GT index ``(N, P)``."""
    gt_idx = torch.where(mask, iou, torch.full_like(iou, -1.0)).argmax(1)
    return mask.any(1), gt_idx


def assign_tal(scores: torch.Tensor, pred_boxes: torch.Tensor, priors: torch.Tensor, gt_cls: torch.Tensor,
               gt_boxes: torch.Tensor, valid: torch.Tensor, topk: int = 13, alpha: float = 1.0,
               beta: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Task-aligned assignment (TOOD): per GT, the ``topk`` candidate priors of highest
    ``score(gt class) ** alpha * IoU(pred, gt) ** beta``. Inputs detached; scores are
    probabilities ``(N, P, C)``, boxes ``(N, P, 4)``; returns ``(fg, gt_idx)``, both ``(N, P)``."""
    iou = batched_iou(gt_boxes, pred_boxes)
    cls_idx = gt_cls[:, :, None].expand(-1, -1, scores.shape[1])
    score = scores.transpose(1, 2).gather(1, cls_idx)
    cand = candidate_mask(priors, gt_boxes, valid)
    metric = score.pow(alpha) * iou.pow(beta) * cand
    top = metric.topk(min(topk, metric.shape[-1]), dim=-1).indices
    mask = torch.zeros_like(cand).scatter_(-1, top, True) & cand
    return resolve_conflicts(mask, iou)


def assign_atss(priors: torch.Tensor, level_sizes: list[int], gt_boxes: torch.Tensor, valid: torch.Tensor,
                topk: int = 9, anchor_scale: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Static ATSS assignment (the warm-up assigner of PicoDet): per level the ``topk``
    priors nearest the GT centre are candidates; those whose square anchor
    (``anchor_scale * stride``) has IoU >= mean + std of the candidates' IoUs and that
    pass :func:`candidate_mask` are positives. Returns ``(fg, gt_idx)``, both ``(N, P)``."""
    n, m = gt_boxes.shape[:2]
    half = priors[:, 4:5] * anchor_scale / 2
    anchors = torch.cat([priors[:, :2] - half, priors[:, :2] + half], -1)
    iou = batched_iou(gt_boxes, anchors[None].expand(n, -1, -1))
    gt_c = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2
    dist = (gt_c[:, :, None] - priors[None, None, :, :2]).norm(dim=-1)
    idx, start = [], 0
    for size in level_sizes:                       # a loop over levels only (3-4)
        k = min(topk, size)
        idx.append(dist[..., start:start + size].topk(k, dim=-1, largest=False).indices + start)
        start += size
    idx = torch.cat(idx, -1)
    cand_iou = iou.gather(-1, idx)
    thr = cand_iou.mean(-1, keepdim=True) + cand_iou.std(-1, keepdim=True)
    mask = torch.zeros_like(iou, dtype=torch.bool).scatter_(-1, idx, cand_iou >= thr)
    mask &= candidate_mask(priors, gt_boxes, valid)
    return resolve_conflicts(mask, iou)


# --------------------------------------------------------------------------- detector


class PicoDet(Detector):
    """ESNet + CSP-PAN + GFL head.

    Label assignment: ``loss`` uses static ATSS for its first ``assigner_warmup_steps``
    calls in training mode with gradients enabled, then the Task-Aligned assigner
    (default ``assigner_warmup_steps=0``: TAL from the start). The count is the
    ``assign_steps`` buffer, so it is saved in and resumed from checkpoints; a training
    loop may set either attribute (e.g. ``model.assign_steps.fill_(step)``)."""

    family = "picodet"
    loss_weights = {"qfl": 1.0, "giou": 2.0, "dfl": 0.25}

    def __init__(self, name: str, input_spec: InputSpec, class_names: tuple[str, ...],
                 post: pp.PostProcessConfig, backbone: ESNet, neck: CSPPAN, head: GFLHead,
                 assigner_warmup_steps: int = 0):
        super().__init__(name, input_spec, class_names, post)
        self.backbone, self.neck, self.head = backbone, neck, head
        self.assigner_warmup_steps = int(assigner_warmup_steps)
        self.register_buffer("assign_steps", torch.zeros((), dtype=torch.long))
        self.level_sizes = [pp.feature_size(input_spec.height, s) * pp.feature_size(input_spec.width, s)
                            for s in post.strides]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.head(self.neck(self.backbone(x)))
        return torch.cat([flatten_head(o, 1) for o in outs], 1)

    def decode(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Torch twin of ``postprocess.decode``: boxes ``(N, P, 4)`` xyxy and scores ``(N, P, C)``."""
        c = self.num_classes
        return gfl_boxes(raw[..., c:], self.priors_t.to(raw.dtype), self.post.reg_max), raw[..., :c].sigmoid()

    def assigner(self) -> str:
        """The assigner the next training ``loss`` call uses: 'atss' (warm-up) or 'tal'."""
        return "atss" if int(self.assign_steps) < self.assigner_warmup_steps else "tal"

    def assign(self, raw: torch.Tensor, pred_boxes: torch.Tensor, targets: list[torch.Tensor]):
        """Pad the targets and assign priors; returns ``fg, gt_idx (N, P)``, ``gt_cls (N, M)``,
        ``gt_boxes (N, M, 4)``. Everything here is without gradient."""
        c = self.num_classes
        gt_cls, gt_boxes, valid = pad_targets(targets, c, raw.device)
        priors = self.priors_t.to(raw.dtype)
        with torch.no_grad():
            if self.assigner() == "atss":
                fg, gt_idx = assign_atss(priors, self.level_sizes, gt_boxes, valid)
            else:
                fg, gt_idx = assign_tal(raw[..., :c].detach().sigmoid(), pred_boxes.detach(), priors,
                                        gt_cls, gt_boxes, valid)
        if self.training and torch.is_grad_enabled():
            self.assign_steps += 1
        return fg, gt_idx, gt_cls, gt_boxes

    def loss(self, raw: torch.Tensor, targets: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        c, r = self.num_classes, self.post.reg_max
        priors = self.priors_t.to(raw.dtype)
        cls_logits, reg = raw[..., :c], raw[..., c:]
        pred_boxes = gfl_boxes(reg, priors, r)
        fg, gt_idx, gt_cls, gt_boxes = self.assign(raw, pred_boxes, targets)
        b_idx, p_idx = fg.nonzero(as_tuple=True)
        g_idx = gt_idx[b_idx, p_idx]
        pos_gt, pos_cls = gt_boxes[b_idx, g_idx], gt_cls[b_idx, g_idx]
        pos_pred = pred_boxes[b_idx, p_idx]

        # QFL: the positive's class target is the IoU of its (detached) box with its GT.
        quality = aligned_iou(pos_pred.detach(), pos_gt).clamp(min=0)
        cls_target = torch.zeros_like(cls_logits)
        cls_target[b_idx, p_idx, pos_cls] = quality
        num_pos = max(len(b_idx), 1)
        loss_qfl = quality_focal_loss(cls_logits, cls_target).sum() / num_pos

        # Box losses weighted by the predicted score (GFL / PicoDet), normalised by its sum.
        w = cls_logits[b_idx, p_idx].detach().sigmoid().amax(-1)
        w_sum = w.sum().clamp(min=1e-6)
        loss_giou = ((1.0 - aligned_iou(pos_pred, pos_gt, "giou")) * w).sum() / w_sum
        target_d = dfl_targets(priors[p_idx, :2], priors[p_idx, 4], pos_gt, r)
        pos_reg = reg[b_idx, p_idx].reshape(-1, 4, r + 1)
        loss_dfl = (distribution_focal_loss(pos_reg, target_d).mean(-1) * w).sum() / w_sum

        lw = self.loss_weights
        total = lw["qfl"] * loss_qfl + lw["giou"] * loss_giou + lw["dfl"] * loss_dfl
        parts = {"qfl": loss_qfl.item(), "giou": loss_giou.item(), "dfl": loss_dfl.item(),
                 "num_pos": float(len(b_idx))}
        return total, parts


# --------------------------------------------------------------------------- factory

_BUILD_OPTIONS = ("stem", "stage_channels", "stage_repeats", "neck_channels", "head_convs", "kernel_size",
                  "csp_blocks", "extra_level", "act", "reg_max", "assigner_warmup_steps")


def build_picodet(name: str = "picodet_s", num_classes: int | None = None,
                  class_names: tuple[str, ...] | list[str] | None = None, input_size: int | tuple[int, int] = 320,
                  width_mult: float = 1.0, **kw) -> PicoDet:
    """Build a PicoDet. ``width_mult`` scales the backbone stages, the neck and the head.
    Architecture options (``**kw``): ``stem`` (24), ``stage_channels`` ((96, 192, 384)),
    ``stage_repeats`` ((3, 7, 3)), ``neck_channels`` (96), ``head_convs`` (2),
    ``kernel_size`` (5, depthwise kernel of neck and head), ``csp_blocks`` (1),
    ``extra_level`` (False: strides 8/16/32; True adds stride 64), ``act`` ('hswish'),
    ``reg_max`` (7), ``assigner_warmup_steps`` (0)."""
    unknown = sorted(set(kw) - set(_BUILD_OPTIONS))
    if unknown:
        raise ConfigError(f"build_picodet: unknown option(s) {unknown}; known options: {list(_BUILD_OPTIONS)}")
    if width_mult <= 0:
        raise ConfigError(f"build_picodet: width_mult={width_mult} must be > 0 (e.g. 0.75 or 1.0)")
    spec, names = resolve_common(num_classes, class_names, input_size)
    act = kw.get("act", "hswish")
    k, reg_max = int(kw.get("kernel_size", 5)), int(kw.get("reg_max", 7))
    if act not in ACTIVATIONS or k % 2 == 0 or reg_max < 1:
        raise ConfigError(f"build_picodet: act={act!r} (choose one of {sorted(ACTIVATIONS)}), "
                          f"kernel_size={k} (must be odd) or reg_max={reg_max} (must be >= 1) is invalid")
    stages = tuple(make_divisible(c * width_mult, 16) for c in kw.get("stage_channels", (96, 192, 384)))
    repeats = tuple(int(n) for n in kw.get("stage_repeats", (3, 7, 3)))
    if len(stages) != 3 or len(repeats) != 3 or min(repeats) < 1:
        raise ConfigError(f"build_picodet: stage_channels {stages} and stage_repeats {repeats} need three "
                          "entries each (strides 8, 16, 32), repeats >= 1")
    neck_c = make_divisible(kw.get("neck_channels", 96) * width_mult, 16)
    extra = bool(kw.get("extra_level", False))
    strides = (8, 16, 32, 64) if extra else (8, 16, 32)
    post = pp.PostProcessConfig(head="gfl", num_classes=len(names), strides=strides,
                                anchors=tuple(((float(s), float(s)),) for s in strides), reg_max=reg_max)
    backbone = ESNet(make_divisible(kw.get("stem", 24) * width_mult, 8), stages, repeats, act)
    neck = CSPPAN(stages, neck_c, k, int(kw.get("csp_blocks", 1)), act, extra)
    head = GFLHead(neck_c, len(strides), int(kw.get("head_convs", 2)), k, len(names), reg_max, act)
    return PicoDet(name, spec, names, post, backbone, neck, head, kw.get("assigner_warmup_steps", 0))


register_detector("picodet_s", "picodet", build_picodet,
                  "PP-PicoDet-S-like: ESNet (SE ShuffleNetV2) + CSP-PAN + GFL head, strides 8/16/32",
                  width_mult=1.0)
register_detector("picodet_xs", "picodet", build_picodet,
                  "smaller PicoDet: width 0.75 of picodet_s, one head conv",
                  width_mult=0.75, head_convs=1)
