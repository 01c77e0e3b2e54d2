"""One training loop for every zoo family.

Each detector brings its own ``loss``; the loop brings the rest: AdamW or SGD
with linear warm-up and cosine decay, EMA weights, gradient clipping, atomic
checkpoints every epoch, exact resume, a progress bar with loss and ETA, and
COCO evaluation of the EMA weights.

Reproducibility: the shuffle order of epoch ``e`` comes from a generator seeded
with ``(seed, e)`` and the dataset derives its augmentation randomness from
``(seed, e, index)``, so a run resumed from the checkpoint of epoch ``e`` sees
the same batches as an uninterrupted run and ends with the same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from edge_compress.errors import ConfigError
from edge_compress.io import write_json_atomic
from edge_compress.train.checkpoint import read_checkpoint, save_checkpoint
from edge_compress.train.config import TrainConfig
from edge_compress.train.ema import ModelEMA


@dataclass
class TrainResult:
    out_dir: Path
    epochs_run: int
    train_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] | None = None


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to ``cfg.lr * final_lr_ratio``."""
    if step < cfg.warmup_iters:
        return cfg.lr * (cfg.warmup_ratio + (1 - cfg.warmup_ratio) * step / cfg.warmup_iters)
    span = max(1, total_steps - cfg.warmup_iters)
    t = min(1.0, (step - cfg.warmup_iters) / span)
    return cfg.lr * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, extra_params=()) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights only, never on BatchNorm or biases. ``extra_params``
    (e.g. a distillation loss's adaptation layers) are trained alongside the model's."""
    decay, no_decay = [], []
    for p in [*model.parameters(), *extra_params]:
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def normalize_batch(images: torch.Tensor, spec) -> torch.Tensor:
    x = images.float() * spec.scale
    if any(spec.mean) or any(s != 1.0 for s in spec.std):
        mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x


class _Progress:
    """A rich progress bar with loss and ETA; silent when disabled."""

    def __init__(self, enabled: bool, total: int, done: int, title: str):
        self.bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                TimeRemainingColumn())
            self.task = self.bar.add_task(title, total=total, completed=done, info="")
            self.bar.start()

    def update(self, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _loader(dataset, cfg: TrainConfig, epoch: int) -> DataLoader:
    from edge_compress.data.coco import collate

    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=gen,
                      collate_fn=collate, num_workers=cfg.workers, persistent_workers=False)


def _check_resume(ckpt: dict, model, cfg: TrainConfig, path: Path) -> None:
    if ckpt["model_config"] != model.config():
        raise ConfigError(f"cannot resume from {path}: it was trained with model "
                          f"'{ckpt['model_config']['name']}' {ckpt['model_config'].get('build')}; "
                          "start a new run directory or pass the same model options")
    if ckpt["train_config"] != cfg.to_dict():
        diff = {k: (ckpt["train_config"].get(k), v) for k, v in cfg.to_dict().items()
                if ckpt["train_config"].get(k) != v}
        raise ConfigError(f"cannot resume from {path}: the training options differ (checkpoint, now): "
                          f"{diff}; use the same options or a new run directory")


def train(model, train_data, cfg: TrainConfig, out_dir: str | Path, val_data=None,
          resume: bool = False, progress: bool = True, stop_after_epochs: int | None = None,
          device: str = "cpu", extra_loss=None) -> TrainResult:
    """Train ``model`` in place; checkpoints go to ``out_dir/last.pt`` (every epoch)
    and ``out_dir/best.pt`` (best validation AP). ``stop_after_epochs`` ends the
    run early without changing the schedule (used to test resume). ``device`` is
    a torch device ("cpu", or "cuda" where a GPU is at hand to train faster).

    ``extra_loss(model, x, raw, targets) -> (tensor, {name: float})`` is added to the
    detector's loss at every step (distillation, a BN-scale L1 penalty, ...); when it has
    ``parameters()`` (e.g. distillation's adaptation convs) they are optimised too."""
    out_dir = Path(out_dir)
    last = out_dir / "last.pt"
    if last.exists() and not resume:
        raise ConfigError(f"{out_dir} already holds a training run ({last}); pass --resume to continue it "
                          "or choose a new --out directory (runs are never overwritten)")
    if len(train_data) < cfg.batch_size:
        raise ConfigError(f"training set has {len(train_data)} images, fewer than batch_size={cfg.batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(device)
    if hasattr(extra_loss, "to"):
        extra_loss.to(device)
    extra_params = list(extra_loss.parameters()) if hasattr(extra_loss, "parameters") else []
    opt = build_optimizer(model, cfg, extra_params)
    ema = ModelEMA(model, cfg.ema_decay, cfg.ema_tau) if cfg.ema else None
    start_epoch, history, best_ap, train_s = 0, [], -1.0, 0.0
    if resume and last.exists():
        ckpt = read_checkpoint(last, map_location=device)
        _check_resume(ckpt, model, cfg, last)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, history = ckpt["epoch"] + 1, ckpt["history"]
        best_ap, train_s = ckpt["best_ap"], ckpt["train_s"]
    steps_per_epoch = len(train_data) // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    end_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, start_epoch + stop_after_epochs)
    bar = _Progress(progress, total_steps, start_epoch * steps_per_epoch, f"train {model.name}")
    try:
        for epoch in range(start_epoch, end_epoch):
            t0 = time.perf_counter()
            sums = _train_epoch(model, ema, opt, train_data, cfg, epoch, steps_per_epoch, total_steps, bar,
                                extra_loss)
            train_s += time.perf_counter() - t0
            record = {"epoch": epoch, "train_s": round(train_s, 2), **sums}
            if val_data is not None and (epoch + 1 == cfg.epochs or
                                         (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
                from edge_compress.eval.runner import evaluate_model

                metrics = evaluate_model(ema.module if ema else model, val_data).to_dict()
                record["val"] = metrics
                if metrics["ap"] > best_ap:
                    best_ap = metrics["ap"]
                    save_checkpoint(out_dir / "best.pt", _state(model, ema, opt, cfg, epoch, history + [record],
                                                                best_ap, train_s))
            history.append(record)
            save_checkpoint(last, _state(model, ema, opt, cfg, epoch, history, best_ap, train_s))
            write_json_atomic(out_dir / "history.json", history)
    finally:
        bar.close()
    final = history[-1].get("val") if history else None
    return TrainResult(out_dir, end_epoch - start_epoch, train_s, history, final)


def _state(model, ema, opt, cfg, epoch, history, best_ap, train_s) -> dict[str, Any]:
    # A compressed model (masks, replaced layers) records the steps that rebuild its structure.
    steps = {"compression_steps": model.compression_steps} if getattr(model, "compression_steps", None) else {}
    return {"model_config": model.config(), **steps, "model": model.state_dict(),
            "ema": ema.state_dict() if ema else None, "optimizer": opt.state_dict(),
            "train_config": cfg.to_dict(), "epoch": epoch, "history": history,
            "best_ap": best_ap, "train_s": train_s}


def _train_epoch(model, ema, opt, data, cfg, epoch, steps_per_epoch, total_steps, bar,
                 extra_loss=None) -> dict[str, float]:
    model.train()
    if hasattr(model, "set_epoch"):
        model.set_epoch(epoch)
    sums: dict[str, float] = {}
    n = 0
    for i, (images, targets, _metas) in enumerate(_loader(data, cfg, epoch)):
        step = epoch * steps_per_epoch + i
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total_steps, cfg)
        device = model.priors_t.device
        x = normalize_batch(images.to(device, non_blocking=True), model.input_spec)
        targets = [t.to(device) for t in targets]
        raw = model(x)
        loss, parts = model.loss(raw, targets)
        if extra_loss is not None:
            extra, extra_parts = extra_loss(model, x, raw, targets)
            loss, parts = loss + extra, {**parts, **extra_parts}
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{model.name}: loss became {loss.item()} at epoch {epoch} step {i}; "
                                     "lower --lr or check the dataset's boxes")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            extra = list(extra_loss.parameters()) if hasattr(extra_loss, "parameters") else []
            torch.nn.utils.clip_grad_norm_([*model.parameters(), *extra], cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        n += 1
        parts = {"loss": float(loss.item()), **parts}
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        bar.update(f"ep {epoch + 1}/{cfg.epochs} loss {sums['loss'] / n:.3f}")
    return {k: round(v / max(n, 1), 5) for k, v in sums.items()}
