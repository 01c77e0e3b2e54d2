"""Artifacts: a folder holding a backend's model file(s) and ``manifest.json``.

The manifest carries everything a device needs besides the runtime (input spec
and preprocessing, labels, post-process parameters) and everything needed to
trust the folder (source model hash, recipe, validation, metrics, the sha256 of
every file). This module is device-side: it imports neither torch nor the
compression code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edge_compress.errors import ArtifactError
from edge_compress.models.postprocess import PostProcessConfig

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("schema_version", "backend", "model_file", "precision", "input_spec", "preprocessing",
                 "class_names", "postprocess", "source_model_sha256", "recipe", "files", "validation", "metrics")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def backend(self) -> str:
        return self.manifest["backend"]["name"]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["class_names"])

    @property
    def input_spec(self) -> dict[str, Any]:
        return self.manifest["input_spec"]

    @property
    def post(self) -> PostProcessConfig:
        return PostProcessConfig.from_dict(self.manifest["postprocess"])


def is_artifact(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def write_artifact(target: str | os.PathLike, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Build an artifact in a temporary folder beside ``target``, then rename it into place.

    ``build(tmp_dir)`` writes the model file(s) into ``tmp_dir`` and returns the
    manifest without ``files``; the sha256 of every file is added here. On any
    error the temporary folder is removed and ``target`` never appears. An
    existing ``target`` is never overwritten.
    """
    target = Path(target)
    _refuse_existing(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        manifest = build(tmp)
        manifest["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p)
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _refuse_existing(target)  # something may have appeared while we were building
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _refuse_existing(target: Path) -> None:
    if target.exists():
        raise ArtifactError(f"'{target}' already exists; artifacts are never overwritten: "
                            "choose another --out or remove it first")


def load_artifact(path: str | os.PathLike, verify: bool = True) -> Artifact:
    """Read an artifact's manifest and (by default) check the sha256 of every file it lists."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"'{path}' is not an artifact: {MANIFEST} is missing "
                            "(write one with `edge-compress export`)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the artifact is damaged: export it again") from e
    missing = [k for k in REQUIRED_KEYS if k not in manifest] if isinstance(manifest, dict) else list(REQUIRED_KEYS)
    if missing:
        raise ArtifactError(f"{mpath} lacks {missing}; it was not written by edge-compress export")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise ArtifactError(f"{mpath}: schema_version {manifest['schema_version']} is not supported "
                            f"(this edge-compress reads {SCHEMA_VERSION}); re-export with this version")
    if verify:
        verify_files(path, manifest["files"])
    return Artifact(path, manifest)


def verify_files(root: Path, files: dict[str, str]) -> None:
    for rel, expected in files.items():
        f = root / rel
        if not f.is_file():
            raise ArtifactError(f"artifact '{root}': file '{rel}' listed in {MANIFEST} is missing")
        actual = sha256_file(f)
        if actual != expected:
            raise ArtifactError(f"artifact '{root}': sha256 of '{rel}' no longer matches {MANIFEST} "
                                f"(expected {expected[:12]}..., found {actual[:12]}...); the file was "
                                "modified or damaged: export the artifact again")
