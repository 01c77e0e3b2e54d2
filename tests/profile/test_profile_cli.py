"""`edge-compress profile` and `edge-compress profiles list | show | compare`, from a parser built by add_parsers."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import pytest

from edge_compress.cli.profile_cmd import add_parsers
from edge_compress.errors import EdgeCompressError

FAST = ["--warmup", "1", "--max-seconds", "0.2", "--max-repeats", "50"]


def main(argv: list[str]) -> int:
    """What cli/main.py's main() does with these verbs: parse, run, one line and exit 2 on a fixable error."""
    parser = argparse.ArgumentParser(prog="edge-compress")
    add_parsers(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EdgeCompressError as e:
        print(f"edge-compress: error: {e}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def art(ort_artifact):
    return ort_artifact


@pytest.fixture
def devices(tmp_path):
    p = tmp_path / "devices.yaml"
    p.write_text("devices:\n"
                 "  local:\n    connection: local\n    threads: 1\n    energy_sensor: estimate\n"
                 "  pi:\n    connection: agent\n    host: 127.0.0.1\n    token_env: PI_TOKEN\n"
                 "    backends: [onnxruntime]\n    power_mode: performance governor\n    energy_sensor: ina2xx\n"
                 "  ovbox:\n    connection: local\n    backends: [openvino]\n")
    return p


def test_profile_prints_the_table_and_stores_the_record(art, devices, tmp_path, capsys):
    store = tmp_path / "profiles"
    rc = main(["profile", str(art), "--devices", str(devices), "--store", str(store), "--top", "3", *FAST])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("ssdlite_mbv2 (onnxruntime", "on local, 1 thread(s)", "p50 ms", "per layer: top 3 of",
                 "memory: measured peak RSS", "energy: ESTIMATED, not measured", "stored: "):
        assert text in out, text
    path = Path(out.split("stored: ")[1].strip())
    rec = json.loads(path.read_text())
    assert rec["device_config"]["connection"] == "local" and rec["settings"]["warmup"] == 1
    assert rec["settings"]["max_repeats"] == 50 and rec["settings"]["min_repeats"] == 20


def test_profiles_list_show_compare(art, devices, tmp_path, capsys):
    store = str(tmp_path / "profiles")
    base = ["--devices", str(devices), "--store", store, "--no-per-layer", *FAST]
    assert main(["profile", str(art), *base]) == 0
    assert main(["profile", str(art), *base, "--threads", "2", "--energy", "none"]) == 0
    capsys.readouterr()
    assert main(["profiles", "list", "--store", store, "--device", "local"]) == 0
    out = capsys.readouterr().out
    assert "2 profile(s)" in out
    ids = [p.stem for p in sorted(Path(store).rglob("*.json"), key=lambda p: json.loads(p.read_text())["created_utc"])]
    assert main(["profiles", "show", ids[0][-6:], "--store", store]) == 0
    assert "per layer: per_layer=False" in capsys.readouterr().out
    assert main(["profiles", "show", ids[1], "--store", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["energy"]["label"] == "none"
    assert main(["profiles", "compare", ids[0], ids[1], "--store", store]) == 0
    out = capsys.readouterr().out
    assert "B / A" in out and "comparing runs" in out and "threads 1 vs 2" in out
    assert main(["profiles", "compare", ids[0], ids[1], "--store", store, "--json"]) == 0
    energy = json.loads(capsys.readouterr().out)["rows"][-1]
    assert energy["metric"] == "energy" and energy["ratio"] is None


def test_remote_device_goes_through_profile_on_device(art, devices, tmp_path, capsys, monkeypatch):
    from edge_compress.profile.profiler import ProfileSettings, profile_artifact

    calls = []

    def profile_on_device(device, artifact, settings):
        calls.append((device.name, Path(artifact), settings))
        return profile_artifact(artifact, ProfileSettings(warmup=1, max_seconds=0.1, per_layer=False,
                                                          energy="estimate"), device="agent-side-name")

    fake = types.ModuleType("edge_compress.profile.remote")
    fake.profile_on_device = profile_on_device
    monkeypatch.setitem(sys.modules, "edge_compress.profile.remote", fake)
    rc = main(["profile", str(art), "--device", "pi", "--devices", str(devices), "--store", str(tmp_path / "p"),
               *FAST])
    assert rc == 0
    name, artifact, settings = calls[0]
    assert (name, artifact, settings.energy, settings.threads) == ("pi", art, "ina2xx", 1)
    stored = json.loads(Path(capsys.readouterr().out.split("stored: ")[1].strip()).read_text())
    assert stored["device"] == "pi" and stored["device_config"]["power_mode"] == "performance governor"
    assert (tmp_path / "p" / "pi" / "onnxruntime").is_dir()


@pytest.mark.parametrize("argv, says", [
    (["--device", "nope"], "choose one of: local, ovbox, pi"),
    (["--device", "ovbox"], "does not list (backends: openvino)"),
    (["--energy", "rapl"], "energy sensor 'rapl' is not usable here"),
    (["--max-repeats", "0"], "min_repeats"),
])
def test_fixable_errors_exit_2_with_one_line(art, devices, tmp_path, capsys, argv, says):
    rc = main(["profile", str(art), "--devices", str(devices), "--store", str(tmp_path / "p"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and says in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()


def test_damaged_record_is_reported_by_list_not_fatal(tmp_path, capsys):
    bad = tmp_path / "p" / "local" / "onnxruntime" / ("a" * 16) / "x.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"device": "lo')
    assert main(["profiles", "list", "--store", str(tmp_path / "p")]) == 0
    captured = capsys.readouterr()
    assert "0 profile(s)" in captured.out and "skipped damaged record" in captured.err
