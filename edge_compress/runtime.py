"""Running an artifact: preprocess, the backend's runner, the shared NumPy post-process.

Device-side: imports neither torch nor the compression code, only NumPy, PIL
and the backend's runtime.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from edge_compress.artifact import Artifact, load_artifact
from edge_compress.backends import Runner, get_backend
from edge_compress.data.transforms import letterbox, normalize
from edge_compress.errors import DataError
from edge_compress.io import atomic_path, write_json_atomic
from edge_compress.models.postprocess import Detections, make_priors, postprocess, unletterbox

RUN_SCORE_THRESH = 0.25   # `run` shows confident detections; mAP uses the low eval threshold


def open_runner(artifact: Artifact, threads: int = 1) -> Runner:
    return get_backend(artifact.backend).load(artifact.path, threads)


def artifact_predictor(artifact: Artifact, runner: Runner, score_thresh: float | None = None):
    """A ``Predictor`` (uint8 ``(N, 3, H, W)`` -> detections in input pixels) through the runtime."""
    spec = SimpleNamespace(**artifact.input_spec)
    post = artifact.post
    priors = make_priors(post, spec.height, spec.width)

    def predict(images_u8: np.ndarray) -> list[Detections]:
        return postprocess(runner(normalize(images_u8, spec)), post, priors, score_thresh=score_thresh)

    return predict


def read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise DataError(f"image '{path}' does not exist") from e
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"'{path}' cannot be decoded as an image ({e})") from e


def detect(artifact: Artifact, runner: Runner, image: np.ndarray,
           score_thresh: float = RUN_SCORE_THRESH) -> Detections:
    """Detections of one HxWx3 uint8 RGB image, boxes in original-image pixels."""
    spec = artifact.input_spec
    canvas, scale, pad_x, pad_y = letterbox(image, spec["height"], spec["width"], spec["pad_value"])
    det = artifact_predictor(artifact, runner, score_thresh)(canvas.transpose(2, 0, 1)[None])[0]
    return unletterbox(det, scale, pad_x, pad_y, image.shape[1], image.shape[0])


def detections_json(det: Detections, class_names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"label": class_names[int(c)], "class_id": int(c), "score": round(float(s), 5),
             "box_xyxy": [round(float(v), 2) for v in b]}
            for b, s, c in zip(det.boxes, det.scores, det.labels)]


def draw(image: np.ndarray, det: Detections, class_names: tuple[str, ...]) -> Image.Image:
    im = Image.fromarray(image)
    pen = ImageDraw.Draw(im)
    for b, s, c in zip(det.boxes, det.scores, det.labels):
        pen.rectangle([float(v) for v in b], outline=(255, 0, 0), width=2)
        pen.text((float(b[0]) + 2, float(b[1]) + 1), f"{class_names[int(c)]} {s:.2f}", fill=(255, 0, 0))
    return im


def run_images(artifact_dir: str | os.PathLike, images: list[str | os.PathLike], out_dir: str | os.PathLike,
               score_thresh: float = RUN_SCORE_THRESH, threads: int = 1) -> list[Path]:
    """Detect on each image; write ``<stem>.json`` and ``<stem>.png`` (boxes drawn) per image.

    Every image is read before anything is written, so a bad image leaves no output.
    """
    artifact = load_artifact(artifact_dir)
    pixels = [(Path(p), read_image(Path(p))) for p in images]
    stems = [p.stem for p, _ in pixels]
    if len(set(stems)) != len(stems):
        raise DataError(f"images share a file name stem ({sorted(stems)}); their outputs would collide")
    runner = open_runner(artifact, threads)
    results = [(p, img, detect(artifact, runner, img, score_thresh)) for p, img in pixels]
    out = Path(out_dir)
    written = []
    for p, img, det in results:
        js = out / f"{p.stem}.json"
        write_json_atomic(js, {"image": str(p), "width": img.shape[1], "height": img.shape[0],
                               "detections": detections_json(det, artifact.class_names)})
        png = out / f"{p.stem}.png"
        with atomic_path(png) as tmp:
            draw(img, det, artifact.class_names).save(tmp, format="PNG")
        written += [js, png]
    return written
