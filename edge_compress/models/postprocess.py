"""Box decoding and class-aware NMS, in NumPy only.

This is the one post-process of the toolchain: it scores torch outputs here and
every backend's raw outputs later, and it runs on a device that has no torch.

Raw head layout ``(N, P, K)`` per head type (``P`` priors in level -> y -> x ->
anchor order; priors are ``cx, cy, w, h, stride`` in input pixels):

* ``yolo``  (anchor-based, YOLOv5-style bounded decode): ``K = 5 + C`` =
  ``tx, ty, tw, th, objectness, class logits``;
  ``xy = prior_xy + (2*sigmoid(t_xy) - 1) * stride``,
  ``wh = prior_wh * (2*sigmoid(t_wh))**2``; score = sigmoid(obj) * sigmoid(cls).
* ``gfl``   (anchor-free, Generalized Focal Loss / PP-PicoDet): ``K = C + 4*(R+1)``
  = class logits (quality-aware, sigmoid) then four discrete distributions over
  ``0..R`` (softmax) for the left/top/right/bottom distances in stride units.
* ``ssd``   (default boxes, SSD encoding with variances): ``K = 4 + 1 + C`` =
  ``dx, dy, dw, dh``, background logit, class logits (softmax over ``1 + C``).

Two more for detectors exported elsewhere, whose graphs decode boxes themselves:

* ``yolo_af`` (anchor-free YOLO, e.g. YOLOv8 as exported by Ultralytics): ``K = 4 + C`` =
  ``cx, cy, w, h`` in input pixels, class probabilities; one prior per cell of each stride.
* ``raw``   (already decoded): ``K = 4 + C`` = ``x1, y1, x2, y2`` in input pixels, class
  probabilities; any number of rows (no priors).

``channels_first`` reads a ``(N, K, P)`` output (Ultralytics' layout) as ``(N, P, K)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edge_compress.errors import ConfigError

HEADS = ("yolo", "gfl", "ssd", "yolo_af", "raw")
DECODED_HEADS = ("yolo_af", "raw")   # the graph decodes boxes; no priors needed


@dataclass(frozen=True)
class PostProcessConfig:
    head: str
    num_classes: int
    strides: tuple[int, ...]
    # Per level, the anchor (w, h) sizes in input pixels. Anchor-free heads use one
    # (stride, stride) "anchor" per level, so prior generation is the same for all.
    anchors: tuple[tuple[tuple[float, float], ...], ...]
    reg_max: int = 7                              # gfl: distribution bins are 0..reg_max
    variances: tuple[float, float] = (0.1, 0.2)   # ssd: centre and size variances
    score_thresh: float = 0.05
    nms_iou: float = 0.6
    pre_nms_topk: int = 1000
    max_det: int = 100
    channels_first: bool = False                  # output is (N, K, P): transposed before decoding

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ConfigError(f"postprocess head '{self.head}' is unknown; expected one of {HEADS}")
        if len(self.anchors) != len(self.strides):
            raise ConfigError(
                f"postprocess: {len(self.anchors)} anchor levels for {len(self.strides)} strides; "
                "give one anchor list per stride")
        if self.num_classes < 1:
            raise ConfigError(f"postprocess num_classes={self.num_classes}: need at least 1 class")

    @property
    def channels(self) -> int:
        """K, the raw channels per prior."""
        c = self.num_classes
        return {"yolo": 5 + c, "gfl": c + 4 * (self.reg_max + 1), "ssd": 5 + c, "yolo_af": 4 + c,
                "raw": 4 + c}[self.head]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["anchors"] = [[list(a) for a in lvl] for lvl in self.anchors]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PostProcessConfig":
        d = dict(d)
        d["strides"] = tuple(int(s) for s in d["strides"])
        d["anchors"] = tuple(tuple((float(w), float(h)) for w, h in lvl) for lvl in d["anchors"])
        d["variances"] = tuple(d.get("variances", (0.1, 0.2)))
        return cls(**d)


@dataclass
class Detections:
    """Detections of one image: ``boxes`` (n, 4) xyxy, ``scores`` (n,), ``labels`` (n,) int."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def feature_size(size: int, stride: int) -> int:
    """Feature-map size of a stride-``stride`` level: k3/s2/p1 convs round up."""
    return -(-size // stride)


def make_priors(cfg: PostProcessConfig, height: int, width: int) -> np.ndarray:
    """(P, 5) float32 priors ``cx, cy, w, h, stride`` in level -> y -> x -> anchor order."""
    out = []
    for stride, anchors in zip(cfg.strides, cfg.anchors):
        gh, gw = feature_size(height, stride), feature_size(width, stride)
        ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        centers = np.stack([(xs + 0.5) * stride, (ys + 0.5) * stride], -1).reshape(-1, 1, 2)
        wh = np.asarray(anchors, dtype=np.float64).reshape(1, -1, 2)
        a = len(anchors)
        lvl = np.concatenate([
            np.broadcast_to(centers, (gh * gw, a, 2)),
            np.broadcast_to(wh, (gh * gw, a, 2)),
            np.full((gh * gw, a, 1), float(stride)),
        ], -1).reshape(-1, 5)
        out.append(lvl)
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 5), np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def decode(raw: np.ndarray, cfg: PostProcessConfig, priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw ``(N, P, K)`` -> boxes ``(N, P, 4)`` xyxy in input pixels and scores ``(N, P, C)``."""
    raw = np.asarray(raw, dtype=np.float32)
    if cfg.channels_first and raw.ndim == 3:
        raw = raw.transpose(0, 2, 1)
    rows = raw.shape[1] if cfg.head == "raw" and raw.ndim == 3 else len(priors)
    if raw.ndim != 3 or raw.shape[1] != rows or raw.shape[2] != cfg.channels:
        layout = f"(N, {cfg.channels}, {rows})" if cfg.channels_first else f"(N, {rows}, {cfg.channels})"
        raise ConfigError(
            f"raw head output has shape {raw.shape}; expected {layout} for a '{cfg.head}' head with "
            f"{cfg.num_classes} classes at this input size")
    return {"yolo": _decode_yolo, "gfl": _decode_gfl, "ssd": _decode_ssd, "yolo_af": _decode_yolo_af,
            "raw": _decode_raw}[cfg.head](raw, cfg, priors)


def _xyxy(cxy: np.ndarray, wh: np.ndarray) -> np.ndarray:
    return np.concatenate([cxy - wh / 2, cxy + wh / 2], -1)


def _decode_yolo(raw, cfg, priors):
    p = priors[None]
    cxy = p[..., 0:2] + (2.0 * _sigmoid(raw[..., 0:2]) - 1.0) * p[..., 4:5]
    wh = p[..., 2:4] * (2.0 * _sigmoid(raw[..., 2:4])) ** 2
    scores = _sigmoid(raw[..., 4:5]) * _sigmoid(raw[..., 5:])
    return _xyxy(cxy, wh), scores


def gfl_distances(reg: np.ndarray, reg_max: int) -> np.ndarray:
    """Expected l, t, r, b (in stride units) of the four discrete distributions."""
    prob = _softmax(reg.reshape(*reg.shape[:-1], 4, reg_max + 1))
    return prob @ np.arange(reg_max + 1, dtype=np.float32)


def _decode_gfl(raw, cfg, priors):
    c = cfg.num_classes
    p = priors[None]
    d = gfl_distances(raw[..., c:], cfg.reg_max) * p[..., 4:5]
    boxes = np.concatenate([p[..., 0:2] - d[..., 0:2], p[..., 0:2] + d[..., 2:4]], -1)
    return boxes, _sigmoid(raw[..., :c])


def _decode_ssd(raw, cfg, priors):
    v0, v1 = cfg.variances
    p = priors[None]
    cxy = p[..., 0:2] + raw[..., 0:2] * v0 * p[..., 2:4]
    wh = p[..., 2:4] * np.exp(np.clip(raw[..., 2:4] * v1, -10.0, 10.0))
    scores = _softmax(raw[..., 4:])[..., 1:]
    return _xyxy(cxy, wh), scores


def _decode_yolo_af(raw, cfg, priors):
    return _xyxy(raw[..., 0:2], raw[..., 2:4]), raw[..., 4:]


def _decode_raw(raw, cfg, priors):
    return raw[..., 0:4], raw[..., 4:]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes ``a`` (n, 4) and ``b`` (m, 4) -> (n, m)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Greedy NMS; returns kept indices in descending score order.

    A box is suppressed when its IoU with a higher-scoring kept box is strictly
    greater than ``iou_thresh`` (the convention of torchvision and ONNX NMS).
    Ties in score keep the lower index first (stable sort).
    """
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if order.size == 1:
            break
        ious = box_iou(boxes[i:i + 1], boxes[order[1:]])[0]
        order = order[1:][ious <= iou_thresh]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_thresh: float) -> np.ndarray:
    """Class-aware NMS: boxes of different labels never suppress each other.

    Offsets every class into its own disjoint coordinate range, then runs one NMS.
    """
    if boxes.size == 0:
        return np.zeros(0, dtype=np.int64)
    span = float(np.max(boxes) - np.min(boxes)) + 1.0
    shifted = boxes + (labels.astype(np.float64) * span)[:, None]
    return nms(shifted, scores, iou_thresh)


def postprocess(raw: np.ndarray, cfg: PostProcessConfig, priors: np.ndarray,
                score_thresh: float | None = None) -> list[Detections]:
    """Decode + threshold + top-k + class-aware NMS for a batch of raw outputs."""
    thresh = cfg.score_thresh if score_thresh is None else score_thresh
    boxes, scores = decode(raw, cfg, priors)
    results = []
    for b, s in zip(boxes, scores):
        idx, cls = np.nonzero(s > thresh)  # every (prior, class) pair above threshold
        sc = s[idx, cls]
        if sc.size > cfg.pre_nms_topk:
            top = np.argpartition(-sc, cfg.pre_nms_topk - 1)[:cfg.pre_nms_topk]
            idx, cls, sc = idx[top], cls[top], sc[top]
        bx = b[idx].astype(np.float64)
        keep = batched_nms(bx, sc, cls, cfg.nms_iou)[:cfg.max_det]
        results.append(Detections(bx[keep].astype(np.float32), sc[keep].astype(np.float32),
                                  cls[keep].astype(np.int64)))
    return results


def unletterbox(det: Detections, scale: float, pad_x: float, pad_y: float,
                orig_w: int, orig_h: int) -> Detections:
    """Map boxes from letterboxed input pixels back to the original image, clipped."""
    b = det.boxes.copy()
    b[:, [0, 2]] = np.clip((b[:, [0, 2]] - pad_x) / scale, 0, orig_w)
    b[:, [1, 3]] = np.clip((b[:, [1, 3]] - pad_y) / scale, 0, orig_h)
    return Detections(b, det.scores, det.labels)
