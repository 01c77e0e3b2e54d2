"""Torch box utilities shared by the zoo losses (training only; inference decode is NumPy)."""

from __future__ import annotations

import math

import torch


def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (n, 4) x (m, 4) -> (n, m)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter + eps)


def aligned_iou(a: torch.Tensor, b: torch.Tensor, kind: str = "iou", eps: float = 1e-7) -> torch.Tensor:
    """Element-wise IoU / GIoU (Rezatofighi 2019) / CIoU (Zheng 2020) of matched (..., 4) boxes."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter + eps
    iou = inter / union
    if kind == "iou":
        return iou
    enc_lt = torch.minimum(a[..., :2], b[..., :2])
    enc_rb = torch.maximum(a[..., 2:], b[..., 2:])
    enc_wh = (enc_rb - enc_lt).clamp(min=0)
    if kind == "giou":
        enc = enc_wh.prod(-1) + eps
        return iou - (enc - union) / enc
    if kind == "ciou":
        c2 = (enc_wh ** 2).sum(-1) + eps
        ca = (a[..., :2] + a[..., 2:]) / 2
        cb = (b[..., :2] + b[..., 2:]) / 2
        rho2 = ((ca - cb) ** 2).sum(-1)
        wa, ha = (a[..., 2] - a[..., 0]).clamp(min=eps), (a[..., 3] - a[..., 1]).clamp(min=eps)
        wb, hb = (b[..., 2] - b[..., 0]).clamp(min=eps), (b[..., 3] - b[..., 1]).clamp(min=eps)
        v = (4 / math.pi ** 2) * (torch.atan(wb / hb) - torch.atan(wa / ha)) ** 2
        with torch.no_grad():
            alpha = v / (1 - iou + v + eps)
        return iou - rho2 / c2 - alpha * v
    raise ValueError(f"unknown IoU kind '{kind}'; expected iou, giou or ciou")
