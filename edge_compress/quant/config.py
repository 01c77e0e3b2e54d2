"""The int8 post-training quantization config: one frozen dataclass, validated on creation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edge_compress.errors import ConfigError, require_known_keys
from edge_compress.quant.calibrators import CALIBRATORS


@dataclass(frozen=True)
class QuantConfig:
    """How to calibrate and quantize: activations per tensor (asymmetric 8-bit), weights per
    output channel (symmetric int8) unless ``per_channel`` is off.

    ``keep_fp32`` names layers left in float: zoo module names as printed by
    ``edge-compress zoo summary NAME --layers`` (``backbone.stem.0.conv``) or ONNX node
    names (``/backbone/stem/stem.0/conv/Conv``); a name that matches no layer is an error.
    The head's output convs (the last conv before the ``(N, P, K)`` output) stay in fp32
    unless ``quantize_outputs`` (see ``edge_compress.quant.qdq`` for the measured reason).
    """

    calibrator: str = "percentile"
    num_images: int = 64
    percentile: float = 99.99
    bins: int = 2048
    per_channel: bool = True
    keep_fp32: tuple[str, ...] = ()
    quantize_outputs: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.calibrator not in CALIBRATORS:
            raise ConfigError(f"quant.calibrator='{self.calibrator}' is unknown; choose one of: "
                              f"{', '.join(CALIBRATORS)}")
        if self.num_images < 1:
            raise ConfigError(f"quant.num_images={self.num_images} must be >= 1 (calibration images)")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"quant.percentile={self.percentile} must be in (50, 100]")
        if self.bins < 256:
            raise ConfigError(f"quant.bins={self.bins} must be >= 256 (finer than the 8-bit grid)")
        object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_fp32"] = list(self.keep_fp32)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        require_known_keys(cls, d, what="quant setting")
        return cls(**d)
