"""Train the small detectors the backend conformance suite quantizes (run once; the results are
committed under tests/assets/conformance/).

Why shipped weights: int8 SQNR is only meaningful on a trained network. Untrained or briefly
trained detectors put out near-constant head outputs (bias-dominated: SQNR looks like 70-100 dB
while the input-dependent part is pure noise) or carry the wild activation ranges of early
training (picodet_s after 90 steps: 12 dB). These are trained to convergence on the synthetic
set at 128 px, width 0.5, and stored as fp16 state dicts (a few hundred KB each).

    .venv/bin/python tests/assets/make_conformance_models.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "conformance"
FAMILIES = ("yolo_tiny", "picodet_s", "ssdlite_mbv2", "ssdlite_mbv3")
SIZE, WIDTH = 128, 0.5
DATA = {"num_train": 800, "num_val": 100, "image_size": SIZE, "seed": 11}
EPOCHS = 12


def main(families=FAMILIES) -> None:
    from edge_compress.data.synth import generate_synthetic
    from edge_compress.eval.runner import evaluate_model
    from edge_compress.models import create_detector
    from edge_compress.pipeline import open_split
    from edge_compress.train import TrainConfig, load_detector, train

    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate_synthetic(data, **DATA)
        ds = open_split(data, "train", (SIZE, SIZE), augment=True, seed=0)
        val = open_split(data, "val", (SIZE, SIZE))
        for fam in families:
            t = time.perf_counter()
            torch.manual_seed(0)
            model = create_detector(fam, class_names=ds.class_names, input_size=SIZE, width_mult=WIDTH)
            run = Path(tmp) / fam
            train(model, ds, TrainConfig(epochs=EPOCHS, batch_size=16, lr=4e-3, warmup_iters=50), run,
                  progress=False)
            best = load_detector(run / "last.pt")
            ap = evaluate_model(best, val)
            state = {k: (v.half() if v.is_floating_point() else v) for k, v in best.state_dict().items()}
            torch.save({"version": 1, "model_config": best.config(), "model": state}, OUT / f"{fam}.pt")
            info = {"family": fam, "data": DATA, "epochs": EPOCHS, "width_mult": WIDTH, "ap": ap.ap,
                    "ap50": ap.ap50, "train_s": round(time.perf_counter() - t, 1)}
            (OUT / f"{fam}.json").write_text(json.dumps(info, indent=1) + "\n")
            print(info, flush=True)


if __name__ == "__main__":
    main(tuple(sys.argv[1:]) or FAMILIES)
