"""The profile store: one JSON file per profiling run under ``profiles/``, never overwritten.

Layout (DESIGN.md: keyed by device, backend and model hash)::

    profiles/<device>/<backend>/<artifact sha256[:16]>/<settings hash[:12]>-<UTC time>-<random>.json

A record's id is its file name without ``.json``. ``add`` writes a hidden
temporary file in the target folder, fsyncs it, then hard-links it to its
final name (``os.link`` fails if that name exists, so a collision is an error,
never an overwrite, which a rename could not promise), unlinks the temporary
and fsyncs the folder. A writer killed at any point leaves either nothing, a
hidden ``.*.tmp`` file, or a complete record; ``list`` never counts the first
two and reports (and skips) any damaged ``.json`` it meets, such as a
half-written file from an older, non-atomic writer.

Device side: no torch.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_compress.artifact import MANIFEST, sha256_file
from edge_compress.errors import ConfigError, DataError, EdgeCompressError, UnknownNameError

REQUIRED = ("device", "backend", "artifact", "settings_hash", "latency")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HEX = re.compile(r"^[0-9a-f]{16,}$")


class ProfileStoreError(EdgeCompressError, RuntimeError):
    """The store cannot add or find a record (collision, bad key, unknown id)."""


@dataclass(frozen=True)
class ProfileEntry:
    """One stored record, with the fields a listing shows."""

    id: str
    path: Path
    record: dict[str, Any] = field(repr=False)

    @property
    def device(self) -> str:
        return self.record["device"]

    @property
    def backend(self) -> str:
        return self.record["backend"]

    @property
    def artifact_sha(self) -> str:
        return self.record["artifact"]["sha256"]


class ProfileList(list):
    """``list`` of ``ProfileEntry``, plus what was not counted: ``skipped`` (path, reason) and ``temp_files``."""

    def __init__(self, entries=(), skipped=(), temp_files=()):
        super().__init__(entries)
        self.skipped: list[tuple[Path, str]] = list(skipped)
        self.temp_files: list[Path] = list(temp_files)


def check_record(record: Any) -> None:
    """A ``DataError`` unless ``record`` has the keys the store files it under."""
    if not isinstance(record, dict):
        raise DataError(f"a profile record is a JSON object, not {type(record).__name__}")
    missing = [k for k in REQUIRED if k not in record]
    if missing or not isinstance(record.get("artifact"), dict) or "sha256" not in record["artifact"]:
        raise DataError(f"not a profile record: missing {missing or ['artifact.sha256']}")


def record_dir(root: Path, record: dict[str, Any]) -> Path:
    check_record(record)
    dev, backend, sha, settings = (record["device"], record["backend"], record["artifact"]["sha256"],
                                   record["settings_hash"])
    for what, v in (("device", dev), ("backend", backend)):
        if not isinstance(v, str) or not _SAFE.match(v):
            raise ConfigError(f"profile record {what} {v!r} cannot name a folder: use letters, digits, '_', '.', '-'")
    for what, v in (("artifact sha256", sha), ("settings_hash", settings)):
        if not isinstance(v, str) or not _HEX.match(v):
            raise ConfigError(f"profile record {what} {v!r} is not a lowercase hex digest")
    return root / dev / backend / sha[:16]


class ProfileStore:
    """Profiles under ``root``: ``add``, ``list``, ``show``, ``compare``."""

    def __init__(self, root: str | Path = "profiles"):
        self.root = Path(root)

    def add(self, record: dict[str, Any]) -> Path:
        """Write ``record`` as a new file and return its path; an existing file is never replaced."""
        folder = record_dir(self.root, record)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        rid = f"{record['settings_hash'][:12]}-{stamp}-{secrets.token_hex(3)}"
        data = (json.dumps({**record, "id": rid}, indent=1) + "\n").encode()
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{rid}.json"
        _write_new(final, data)
        return final

    def list(self, device: str | None = None, backend: str | None = None,
             artifact: str | Path | None = None) -> ProfileList:
        """Every readable record, oldest first, filtered by device, backend and artifact
        (a sha256 prefix, or an artifact folder whose manifest is hashed)."""
        sha = _artifact_sha(artifact)
        entries, skipped, temps = [], [], []
        for folder in self._folders(device, backend):
            for p in sorted(folder.iterdir()):
                if p.name.startswith("."):
                    temps += [p] if p.name.endswith(".tmp") else []
                    continue
                if p.suffix != ".json" or not p.is_file():
                    continue
                entry, reason = _read_entry(p)
                if entry is None:
                    skipped.append((p, reason))
                elif sha is None or entry.artifact_sha.startswith(sha):
                    entries.append(entry)
        entries.sort(key=lambda e: (str(e.record.get("created_utc", "")), e.id))
        return ProfileList(entries, skipped, temps)

    def _folders(self, device: str | None, backend: str | None) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob(f"{device or '*'}/{backend or '*'}/*") if p.is_dir())

    def resolve(self, id_or_path: str | Path) -> Path:
        """The file of a record id (or a unique prefix or suffix of one, e.g. its random tail), or
        ``id_or_path`` itself if it is a file."""
        p = Path(id_or_path)
        if p.is_file():
            return p
        key = str(id_or_path).removesuffix(".json")
        found = [f for f in self.root.glob("*/*/*/*.json")
                 if not f.name.startswith(".") and (f.stem.startswith(key) or f.stem.endswith(key))]
        exact = [f for f in found if f.stem == key]
        if exact or len(found) == 1:
            return (exact or found)[0]
        if found:
            raise ProfileStoreError(f"profile id '{key}' is ambiguous: {sorted(f.stem for f in found)[:5]}; "
                                    "give more characters")
        raise UnknownNameError(f"no profile '{key}' under {self.root}/; see `edge-compress profiles list`")

    def show(self, id_or_path: str | Path) -> dict[str, Any]:
        """The record of an id or a path; a damaged file is a ``DataError`` naming it."""
        path = self.resolve(id_or_path)
        entry, reason = _read_entry(path)
        if entry is None:
            raise DataError(f"profile '{path}' is damaged: {reason}")
        return entry.record

    def compare(self, a: dict[str, Any] | str | Path, b: dict[str, Any] | str | Path) -> Comparison:
        """Two records side by side (ratio = B / A)."""
        return compare_records(self._record(a), self._record(b))

    def _record(self, r: dict[str, Any] | str | Path) -> dict[str, Any]:
        if isinstance(r, dict):
            check_record(r)
            return r
        return self.show(r)


def _write_new(final: Path, data: bytes) -> None:
    """Temporary file + fsync + link to ``final`` (fails if it exists) + fsync of the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)
        except FileExistsError:
            raise ProfileStoreError(f"profile '{final}' already exists; records are never overwritten "
                                    "(two writers picked the same id: add it again)") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(final.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_entry(path: Path) -> tuple[ProfileEntry | None, str]:
    try:
        record = json.loads(path.read_bytes())
        check_record(record)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, DataError) as e:
        return None, f"{type(e).__name__}: {e}"
    return ProfileEntry(record.get("id", path.stem), path, record), ""


def _artifact_sha(artifact: str | Path | None) -> str | None:
    if artifact is None:
        return None
    manifest = Path(artifact) / MANIFEST
    if manifest.is_file():
        return sha256_file(manifest)
    key = str(artifact).lower()
    if not re.fullmatch(r"[0-9a-f]{4,64}", key):
        raise ConfigError(f"--artifact {artifact!r} is neither an artifact folder nor a sha256 prefix (4+ hex digits)")
    return key



# --- compare -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompareRow:
    """One metric of two records; ``ratio`` is B / A, or None with ``note`` saying why not."""

    metric: str
    unit: str
    a: float | None
    b: float | None
    ratio: float | None
    note: str = ""


@dataclass(frozen=True)
class Comparison:
    a_id: str
    b_id: str
    kind: str            # "artifacts" | "devices" | "runs" | "artifacts and devices"
    rows: tuple[CompareRow, ...]
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(a: float | None, b: float | None) -> float | None:
    return b / a if a and b is not None else None


def _energy_row(a: dict[str, Any], b: dict[str, Any]) -> CompareRow:
    ea, eb = a.get("energy", {}), b.get("energy", {})
    va, vb = ea.get("mj_per_inference"), eb.get("mj_per_inference")
    la, lb = ea.get("label", "none"), eb.get("label", "none")
    labels = f"A {la} ({ea.get('method', 'none')}), B {lb} ({eb.get('method', 'none')})"
    if va is None or vb is None:
        return CompareRow("energy", "mJ/inference", va, vb, None, f"{labels}: no ratio, a value is missing")
    if la != lb:
        return CompareRow("energy", "mJ/inference", va, vb, None,
                          f"{labels}: no ratio between a measurement and an estimate")
    note = labels
    if la == "measured" and ea.get("method") != eb.get("method"):
        note += ": different sensors cover different parts of the system; read the ratio with care"
    return CompareRow("energy", "mJ/inference", va, vb, _ratio(va, vb), note)


def _latency_rows(a: dict[str, Any], b: dict[str, Any]) -> list[CompareRow]:
    la, lb = a["latency"], b["latency"]
    how = f"measured: A {la.get('repeats')} repeats after {la.get('warmup')} warm-up, B {lb.get('repeats')} after " \
          f"{lb.get('warmup')}"
    return [CompareRow(k, "ms", la.get(k), lb.get(k), _ratio(la.get(k), lb.get(k)), how)
            for k in ("p50", "p90", "p99", "mean")]


def _memory_row(a: dict[str, Any], b: dict[str, Any]) -> CompareRow:
    ma, mb = (r.get("memory", {}).get("peak_rss_bytes") for r in (a, b))
    va, vb = (v / 2**20 if v is not None else None for v in (ma, mb))
    return CompareRow("peak memory", "MiB", va, vb, _ratio(va, vb), "measured: peak RSS (VmHWM) of the process")


def _kind_and_notes(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, list[str]]:
    same_dev = a["device"] == b["device"]
    same_art = a["artifact"]["sha256"] == b["artifact"]["sha256"]
    kind = {(True, False): "artifacts", (False, True): "devices", (True, True): "runs"}.get(
        (same_dev, same_art), "artifacts and devices")
    notes = []
    if kind == "artifacts and devices":
        notes.append("device AND artifact differ: a ratio mixes both effects")
    if a["backend"] != b["backend"]:
        notes.append(f"backends differ: {a['backend']} vs {b['backend']}")
    sa, sb = a.get("settings", {}), b.get("settings", {})
    diff = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
    if diff:
        notes.append("settings differ: " + ", ".join(f"{k} {sa.get(k)} vs {sb.get(k)}" for k in diff))
    va, vb = (r.get("environment", {}).get("runtime_version") for r in (a, b))
    if va != vb:
        notes.append(f"runtime versions differ: {va} vs {vb}")
    return kind, notes


def compare_records(a: dict[str, Any], b: dict[str, Any]) -> Comparison:
    """A and B side by side: latency, peak memory, energy (never a measured/estimated ratio)."""
    check_record(a)
    check_record(b)
    kind, notes = _kind_and_notes(a, b)
    rows = (*_latency_rows(a, b), _memory_row(a, b), _energy_row(a, b))
    return Comparison(str(a.get("id", "A")), str(b.get("id", "B")), kind, rows, tuple(notes))
