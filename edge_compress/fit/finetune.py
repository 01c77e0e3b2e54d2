"""The fine-tune job of ``fit``: prune a candidate for real and fine-tune it with distillation.

One recipe step, run by ``compress`` (so the result is an ordinary compressed
checkpoint that ``export`` and ``load_detector`` read): channel pruning to the
candidate's per-conv ratios with BatchNorm recalibration, then ``epochs`` of
fine-tune distilled from the uncompressed detector (class-score KL + box
distillation, ``edge_compress.compress.distill``). The same job serves the short
checks of the search (1 epoch) and the final model; it runs in a worker (process
pool or Ray task) and returns plain data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

BN_RECAL_BATCHES = 16


@dataclass(frozen=True)
class FinetuneJob:
    checkpoint: str
    key: str
    ratios: dict[str, float]
    round_to: int
    min_channels: int
    data: str
    out: str
    epochs: int
    lr: float = 2e-3
    batch_size: int = 16
    seed: int = 0


def recipe_for(job: FinetuneJob):
    from edge_compress.compress.distill import DistillConfig
    from edge_compress.compress.recipe import Recipe, RecipeStep
    from edge_compress.compress.structured import ChannelPruneConfig
    from edge_compress.train.config import TrainConfig

    prune = ChannelPruneConfig(ratio=dict(job.ratios), round_to=job.round_to, min_channels=job.min_channels,
                               recalibrate_bn=BN_RECAL_BATCHES)
    train = TrainConfig(epochs=job.epochs, batch_size=job.batch_size, lr=job.lr, warmup_iters=50, seed=job.seed)
    distill = DistillConfig(output_weight=1.0, box_weight=1.0, temperature=1.0)
    return Recipe((RecipeStep("channel_pruning", prune, finetune=train, distill=distill),),
                  name=f"fit-{job.key}", source=f"fit candidate {job.key}")


def finetune_candidate(job: FinetuneJob) -> dict[str, Any]:
    """Prune + fine-tune with distillation into ``job.out``; the checkpoint and its val AP."""
    from edge_compress.compress.recipe import compress
    from edge_compress.train import load_detector

    t0 = time.perf_counter()
    model = load_detector(job.checkpoint)
    result = compress(model, recipe_for(job), job.data, job.out, progress=False)
    last = result.rows[-1]
    return {"key": job.key, "checkpoint": str(result.out / "model.pt"), "ap": last.ap, "ap50": last.ap50,
            "pruned_ap": result.rows[1].ap, "epochs": job.epochs, "seconds": time.perf_counter() - t0}
