"""The detector contract every zoo family implements.

A detector is an ``nn.Module`` whose ``forward`` maps a float image batch
``(N, 3, H, W)`` (RGB, values in [0, 1] after letterboxing, see ``InputSpec``)
to ONE raw tensor ``(N, P, K)``: one row per prior (anchor point x anchor, in
level -> y -> x -> anchor order) and ``K`` head channels whose meaning depends
on ``PostProcessConfig.head``. Decoding and NMS are NOT part of the graph: they
live in :mod:`edge_compress.models.postprocess` (NumPy only), so torch outputs
and every backend's outputs are scored by the very same code.

Targets for ``loss`` are a list (one per image) of float tensors ``(n, 5)``
holding ``[class_id, x1, y1, x2, y2]`` in input pixels (after letterboxing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from edge_compress.errors import ConfigError
from edge_compress.models import postprocess as pp


@dataclass(frozen=True)
class InputSpec:
    """What the network expects; everything a device needs to preprocess an image.

    Preprocessing: letterbox (keep aspect ratio, pad with ``pad_value``) to
    ``height x width``, convert to ``color`` order, multiply by ``scale``, then
    ``(x - mean) / std`` per channel, layout ``NCHW``.
    """

    height: int = 320
    width: int = 320
    channels: int = 3
    layout: str = "NCHW"
    color: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pad_value: int = 114

    def __post_init__(self) -> None:
        if self.height % 32 or self.width % 32 or self.height <= 0 or self.width <= 0:
            raise ConfigError(
                f"input size {self.height}x{self.width} is not supported: height and width "
                "must be positive multiples of 32 (the largest backbone stride); try 320 or 416"
            )
        if self.channels != 3:
            raise ConfigError(f"input channels={self.channels}: only 3-channel RGB input is supported")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


class Detector(nn.Module):
    """Base class of the zoo detectors. Subclasses set ``family`` and implement
    ``forward`` (raw ``(N, P, K)`` tensor) and ``loss``."""

    family: ClassVar[str] = ""

    def __init__(self, name: str, input_spec: InputSpec, class_names: tuple[str, ...],
                 post: pp.PostProcessConfig):
        super().__init__()
        self.name = name
        self.input_spec = input_spec
        self.class_names = tuple(class_names)
        self.post = post
        self._priors_np = pp.make_priors(post, input_spec.height, input_spec.width)
        # Priors as a non-persistent buffer: follows .to(device), not saved in state_dict.
        self.register_buffer("priors_t", torch.from_numpy(self._priors_np), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def strides(self) -> tuple[int, ...]:
        return self.post.strides

    def priors(self) -> np.ndarray:
        """(P, 5) float32: cx, cy, w, h, stride in input pixels."""
        return self._priors_np

    def loss(self, raw: torch.Tensor, targets: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_thresh: float | None = None) -> list[pp.Detections]:
        """Run the network and the shared NumPy post-process; boxes in input pixels."""
        was_training = self.training
        self.eval()
        raw = self(images).float().cpu().numpy()
        self.train(was_training)
        return pp.postprocess(raw, self.post, self._priors_np, score_thresh=score_thresh)

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this detector (stored in checkpoints and manifests)."""
        return {
            "name": self.name,
            "family": self.family,
            "input_spec": self.input_spec.to_dict(),
            "class_names": list(self.class_names),
            "postprocess": self.post.to_dict(),
            "build": dict(getattr(self, "build_kwargs", {})),
        }


def resolve_common(num_classes: int | None, class_names: tuple[str, ...] | list[str] | None,
                   input_size: int | tuple[int, int]) -> tuple[InputSpec, tuple[str, ...]]:
    """Shared factory arguments: class names (or a count) and the input size."""
    if class_names is None:
        n = 80 if num_classes is None else int(num_classes)
        class_names = tuple(f"class_{i}" for i in range(n))
    elif num_classes is not None and num_classes != len(class_names):
        raise ConfigError(f"num_classes={num_classes} but {len(class_names)} class_names were given")
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    return InputSpec(height=int(h), width=int(w)), tuple(class_names)
