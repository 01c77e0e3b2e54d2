"""Training configuration: one frozen, validated dataclass, loadable from YAML/JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edge_compress.errors import ConfigError, require_known_keys

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float = 4e-3                 # peak learning rate after warm-up
    weight_decay: float = 0.05       # not applied to BatchNorm weights and biases
    momentum: float = 0.9            # SGD momentum / AdamW beta1
    warmup_iters: int = 300          # linear warm-up from lr * warmup_ratio
    warmup_ratio: float = 0.1
    final_lr_ratio: float = 0.05     # cosine decay ends at lr * final_lr_ratio
    ema: bool = True
    ema_decay: float = 0.9995
    ema_tau: float = 400.0           # EMA decay ramp: decay * (1 - exp(-updates / tau))
    grad_clip: float = 10.0          # max global grad norm; 0 disables
    seed: int = 0
    workers: int = 0                 # DataLoader worker processes
    eval_every: int = 0              # evaluate every N epochs (0: only at the end)

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "lr")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"train config: {name}={getattr(self, name)} must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train config: optimizer='{self.optimizer}' is unknown; choose one of {OPTIMIZERS}")
        for name in ("warmup_ratio", "final_lr_ratio", "ema_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train config: {name}={getattr(self, name)} must be in [0, 1]")
        for name in ("warmup_iters", "weight_decay", "grad_clip", "workers", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train config: {name}={getattr(self, name)} must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "train config") -> "TrainConfig":
        require_known_keys(cls, d, source=source)
        return cls(**d)
