"""The profile store: layout, never overwriting, damaged files skipped, comparisons, and SIGKILLed writers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_compress.errors import DataError, UnknownNameError
from edge_compress.profile.store import ProfileStore, ProfileStoreError, _write_new, compare_records

SHA_A, SHA_B = "a" * 64, "b" * 64
SETTINGS = "5" * 64


def record(device="local", backend="onnxruntime", sha=SHA_A, p50=2.0, energy=None, threads=1, **extra):
    """A minimal record with the sections the store and compare read."""
    return {
        "device": device, "backend": backend, "settings_hash": SETTINGS, "settings": {"threads": threads},
        "artifact": {"sha256": sha, "model": "m"}, "created_utc": extra.pop("created_utc", "2026-01-01T00:00:00"),
        "latency": {"p50": p50, "p90": p50 * 1.5, "p99": p50 * 2, "mean": p50 * 1.1, "repeats": 20, "warmup": 10},
        "memory": {"peak_rss_bytes": 100 * 2**20},
        "energy": energy or {"label": "estimated", "method": "estimated", "measured": False, "mj_per_inference": 1.0},
        **extra,
    }


MEASURED = {"label": "measured", "method": "rapl", "measured": True, "mj_per_inference": 3.0}


def test_add_files_by_device_backend_artifact_and_settings(tmp_path):
    store = ProfileStore(tmp_path / "profiles")
    p = store.add(record())
    assert p.parent == tmp_path / "profiles" / "local" / "onnxruntime" / SHA_A[:16]
    assert p.name.startswith(SETTINGS[:12] + "-") and p.suffix == ".json"
    saved = json.loads(p.read_text())
    assert saved["id"] == p.stem and saved["latency"]["p50"] == 2.0
    q = store.add(record())   # the same run again is a new record, not a replacement
    assert q != p and p.exists() and len(store.list()) == 2


def test_an_existing_record_is_never_overwritten(tmp_path):
    target = tmp_path / "r.json"
    _write_new(target, b'{"first": 1}')
    with pytest.raises(ProfileStoreError, match="never overwritten"):
        _write_new(target, b'{"second": 2}')
    assert json.loads(target.read_text()) == {"first": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]   # no temp file left behind


def test_records_that_cannot_name_a_folder_are_refused(tmp_path):
    store = ProfileStore(tmp_path)
    with pytest.raises(Exception, match="cannot name a folder"):
        store.add(record(device="../etc"))
    with pytest.raises(DataError, match="missing"):
        store.add({"device": "local"})


def test_list_filters_and_orders_oldest_first(tmp_path):
    store = ProfileStore(tmp_path)
    store.add(record(created_utc="2026-01-03"))
    store.add(record(device="pi4", backend="litert", sha=SHA_B, created_utc="2026-01-01"))
    store.add(record(backend="openvino", created_utc="2026-01-02"))
    assert [e.device for e in store.list()] == ["pi4", "local", "local"]
    assert [e.backend for e in store.list(device="local")] == ["openvino", "onnxruntime"]
    assert len(store.list(backend="litert")) == 1
    assert len(store.list(artifact=SHA_B[:8])) == 1
    assert store.list(device="nowhere") == []


def test_list_filters_by_an_artifact_folder(tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text("{}")
    from edge_compress.artifact import sha256_file

    store = ProfileStore(tmp_path / "p")
    store.add(record(sha=sha256_file(art / "manifest.json")))
    store.add(record())
    assert len(store.list(artifact=art)) == 1


def test_damaged_and_temporary_files_are_reported_and_skipped(tmp_path):
    store = ProfileStore(tmp_path)
    good = store.add(record())
    (good.parent / "old-writer-truncated.json").write_text('{"device": "local", "latency": {"p5')
    (good.parent / "not-a-record.json").write_text('[1, 2]')
    (good.parent / f".{good.stem}.x1.tmp").write_text('{"device"')
    found = store.list()
    assert [e.path for e in found] == [good]
    assert sorted(p.name for p, _ in found.skipped) == ["not-a-record.json", "old-writer-truncated.json"]
    assert all(reason for _, reason in found.skipped)
    assert len(found.temp_files) == 1
    with pytest.raises(DataError, match="damaged"):
        store.show(good.parent / "old-writer-truncated.json")


def test_show_by_id_prefix_suffix_or_path(tmp_path):
    store = ProfileStore(tmp_path)
    p = store.add(record())
    assert store.show(p.stem)["id"] == p.stem
    assert store.show(p.stem[-6:])["id"] == p.stem          # the random tail
    assert store.show(str(p))["id"] == p.stem
    store.add(record())
    with pytest.raises(ProfileStoreError, match="ambiguous"):
        store.show(SETTINGS[:12])
    with pytest.raises(UnknownNameError, match="profiles list"):
        store.show("nope")


def test_compare_two_artifacts_gives_ratios_b_over_a(tmp_path):
    c = compare_records(record(p50=2.0), record(sha=SHA_B, p50=1.0))
    rows = {r.metric: r for r in c.rows}
    assert c.kind == "artifacts"
    assert rows["p50"].ratio == 0.5 and rows["p99"].ratio == 0.5 and rows["peak memory"].ratio == 1.0
    assert rows["energy"].ratio == 1.0 and "estimated" in rows["energy"].note
    assert set(rows) == {"p50", "p90", "p99", "mean", "peak memory", "energy"}


def test_compare_refuses_a_ratio_between_measured_and_estimated_energy():
    c = compare_records(record(device="minipc", energy=MEASURED), record())
    e = next(r for r in c.rows if r.metric == "energy")
    assert c.kind == "devices"
    assert (e.a, e.b, e.ratio) == (3.0, 1.0, None) and "measurement and an estimate" in e.note
    both = compare_records(record(energy=MEASURED), record(sha=SHA_B, energy={**MEASURED, "mj_per_inference": 6.0}))
    assert next(r for r in both.rows if r.metric == "energy").ratio == 2.0


def test_compare_names_what_else_differs(tmp_path):
    store = ProfileStore(tmp_path)
    a, b = store.add(record(threads=1)), store.add(record(device="pi5", sha=SHA_B, threads=4))
    c = store.compare(a.stem, b.stem)
    assert c.kind == "artifacts and devices"
    assert any("threads 1 vs 4" in n for n in c.notes) and any("mixes both" in n for n in c.notes)
    assert c.to_dict()["rows"][0]["metric"] == "p50"


WRITER = """
import sys
from edge_compress.profile.store import ProfileStore
store = ProfileStore(sys.argv[1])
samples = [i * 0.001 for i in range(20000)]   # about 200 kB a record: kills land mid-write
i = 0
while True:
    rec = {"device": "local", "backend": "onnxruntime", "settings_hash": "5" * 64,
           "artifact": {"sha256": "a" * 64}, "latency": {"p50": 1.0, "samples_ms": samples}, "seq": i}
    print(store.add(rec), flush=True)
    i += 1
"""


def test_writers_killed_at_random_points_leave_every_finished_record_readable(tmp_path):
    root = tmp_path / "profiles"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(7)
    finished: list[Path] = []
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True)
        finished.append(Path(proc.stdout.readline().strip()))   # it is writing now
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(proc.pid, signal.SIGKILL)
        finished += [Path(line.strip()) for line in proc.stdout.read().splitlines() if line.strip()]
        proc.wait()
    found = ProfileStore(root).list()
    listed = {e.path for e in found}
    assert set(finished) <= listed                     # every record whose add() returned is there
    assert not found.skipped                            # and nothing half-written poses as a record
    for e in found:
        assert len(e.record["latency"]["samples_ms"]) == 20000
    on_disk = [p for p in root.rglob("*") if p.is_file()]
    assert len(listed) == sum(1 for p in on_disk if p.suffix == ".json" and not p.name.startswith("."))
    assert all(p.name.startswith(".") and p.suffix == ".tmp" for p in on_disk if p not in listed)
