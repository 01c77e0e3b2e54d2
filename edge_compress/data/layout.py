"""Where a dataset's splits live: a directory in a known layout, or a small YAML file.

Accepted ``--data`` values:

* a directory written by ``edge-compress data synth`` (or laid out the same way):
  ``annotations/instances_{train,val}.json`` + ``images/{train,val}/``;
* a directory in the COCO 2017 layout: ``annotations/instances_{train,val}2017.json``
  + ``{train,val}2017/``;
* a YAML file naming the files directly (paths relative to the YAML file)::

      train: {annotations: ann/train.json, images: img/train}
      val:   {annotations: ann/val.json,   images: img/val}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from edge_compress.errors import DataError

SPLITS = ("train", "val")


@dataclass(frozen=True)
class SplitPaths:
    annotations: Path
    images: Path


def _dir_layouts(root: Path, split: str) -> list[SplitPaths]:
    return [SplitPaths(root / "annotations" / f"instances_{split}.json", root / "images" / split),
            SplitPaths(root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017")]


def resolve_split(data: str | Path, split: str) -> SplitPaths:
    """The annotation file and image folder of ``split`` ('train' or 'val') of ``data``."""
    data = Path(data)
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; expected one of {SPLITS}")
    if data.is_dir():
        for cand in _dir_layouts(data, split):
            if cand.annotations.is_file():
                return cand
        tried = ", ".join(str(c.annotations) for c in _dir_layouts(data, split))
        raise DataError(f"dataset directory '{data}' has no '{split}' split (looked for {tried}); "
                        "generate one with `edge-compress data synth --out DIR` or pass a data YAML")
    if data.suffix in (".yaml", ".yml") and data.is_file():
        return _from_yaml(data, split)
    raise DataError(f"--data '{data}' is neither a dataset directory nor a .yaml file that exists")


def _from_yaml(path: Path, split: str) -> SplitPaths:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping with keys {SPLITS}")
    unknown = sorted(set(doc) - set(SPLITS))
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown}; expected only {SPLITS}")
    entry = doc.get(split)
    if not isinstance(entry, dict) or set(entry) != {"annotations", "images"}:
        raise DataError(f"{path}: '{split}' must be a mapping with exactly the keys 'annotations' and 'images'")
    base = path.parent
    return SplitPaths(base / entry["annotations"], base / entry["images"])
