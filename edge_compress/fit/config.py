"""``FitConfig``: the budget and how hard ``fit`` searches, one frozen validated dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from edge_compress.errors import ConfigError, require_known_keys

PERCENTILES = ("p50", "p90", "p99")
PRECISION_MODES = ("per-layer", "int8", "fp32")


@dataclass(frozen=True)
class FitConfig:
    """What to meet and how to search.

    Budgets (one or more): ``budget_ms`` latency at ``percentile`` of the measured
    distribution, ``budget_mj`` energy per inference (as the device's sensor reports
    it; an estimate where the device has none, and labelled so), ``budget_bytes``
    artifact size on disk.

    Search: ``precision`` ``per-layer`` (fp32 or int8 per conv, where the backend takes
    int8), ``int8`` (every conv int8, only the pruning searched) or ``fp32``; ``ratios``
    per knob, ``initial_samples`` candidates measured before the first model fit, then
    rounds of search + ``batch`` measurements (promising and adaptive-sampling picks)
    up to ``max_measurements``; ``holdout`` of them are kept
    out of the latency model's fit to report its error honestly. ``sensitivity_images``
    val images score each layer's change. ``check_candidates`` of the best measured
    candidates get a ``check_epochs`` fine-tune and a real mAP before the choice.

    A measurement is the median of ``measure_sessions`` profiling sessions of up to
    ``profile_seconds`` each, every one in a fresh process (see ``fit.measure``).
    Result: ``finetune_epochs`` of fine-tune with distillation from the uncompressed
    model, export (``calib_images`` calibration images for int8), verification on the
    device; a miss tightens the search budget and repeats, ``verify_rounds`` at most.
    """

    budget_ms: float | None = None
    percentile: str = "p50"
    budget_mj: float | None = None
    budget_bytes: int | None = None
    ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    precision: str = "per-layer"
    round_to: int = 8
    min_channels: int = 8
    initial_samples: int = 10
    batch: int = 6
    max_measurements: int = 48
    search_rounds: int = 6
    holdout: float = 0.25
    sensitivity_images: int = 100
    check_candidates: int = 2
    check_epochs: int = 1
    finetune_epochs: int = 4
    finetune_lr: float = 1e-3
    calib_images: int = 64
    verify_rounds: int = 3
    profile_seconds: float = 10.0
    measure_sessions: int = 3
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if self.budget_ms is None and self.budget_mj is None and self.budget_bytes is None:
            raise ConfigError("fit needs a budget: --budget-ms (latency), --budget-mj (energy per inference) or "
                              "--budget-bytes (artifact size), alone or together")
        for name in ("budget_ms", "budget_mj", "budget_bytes", "finetune_lr", "profile_seconds"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise ConfigError(f"fit.{name}={v!r} must be a positive number")
        if self.precision not in PRECISION_MODES:
            raise ConfigError(f"fit.precision={self.precision!r}; choose one of: {', '.join(PRECISION_MODES)}")
        if self.percentile not in PERCENTILES:
            raise ConfigError(f"fit.percentile={self.percentile!r}; choose one of: {', '.join(PERCENTILES)}")
        for name in ("round_to", "min_channels", "batch", "search_rounds", "verify_rounds", "calib_images",
                     "sensitivity_images", "initial_samples", "measure_sessions"):
            _positive_int(name, getattr(self, name))
        for name in ("check_candidates", "check_epochs", "finetune_epochs"):
            _positive_int(name, getattr(self, name), minimum=0)
        if self.max_measurements < self.initial_samples + 3:
            raise ConfigError(f"fit.max_measurements={self.max_measurements} must exceed initial_samples "
                              f"({self.initial_samples}) + 3 (the baselines)")
        if not 0.0 <= self.holdout < 0.9:
            raise ConfigError(f"fit.holdout={self.holdout} must be in [0, 0.9): the fraction of measured "
                              "candidates kept out of the latency model's fit")
        if self.threads is not None:
            _positive_int("threads", self.threads)

    def constraints(self) -> dict[str, float]:
        """Budget name -> limit, for the budgets that are set."""
        out = {}
        if self.budget_ms is not None:
            out["latency_ms"] = float(self.budget_ms)
        if self.budget_mj is not None:
            out["energy_mj"] = float(self.budget_mj)
        if self.budget_bytes is not None:
            out["size_bytes"] = float(self.budget_bytes)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratios"] = list(self.ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "fit config") -> "FitConfig":
        require_known_keys(cls, d, source=source)
        return cls(**d)

    def search_dict(self) -> dict[str, Any]:
        """The fields that decide what is measured (a resumed run must match them)."""
        keep = {f.name for f in fields(self)} - {"budget_ms", "budget_mj", "budget_bytes", "verify_rounds",
                                                  "finetune_epochs", "finetune_lr", "calib_images",
                                                  "check_candidates", "check_epochs", "max_measurements",
                                                  "search_rounds", "batch"}
        return {k: v for k, v in self.to_dict().items() if k in keep}


def _positive_int(name: str, v: Any, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"fit.{name}={v!r} must be an integer >= {minimum}")
