"""``edge-compress profile`` and ``edge-compress profiles list | show | compare``.

Argument parsing and printing only: the measuring is ``profile_artifact``
(or, for a remote device, ``edge_compress.profile.remote.profile_on_device``)
and the filing is ``ProfileStore``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edge_compress.errors import ConfigError, EdgeCompressError

TOP_LAYERS = 10


def add_parsers(verbs) -> None:
    """Add ``profile`` and ``profiles`` to the CLI's sub-command set ``verbs``."""
    from edge_compress.profile.profiler import ENERGY_CHOICES

    p = verbs.add_parser("profile", help="latency (end to end and per layer), memory and energy of an artifact "
                                         "on a device; the record is stored under profiles/")
    p.add_argument("artifact", type=Path, help="an artifact directory written by `edge-compress export`")
    p.add_argument("--device", default="local", help="a device of --devices (default local: this machine)")
    p.add_argument("--devices", default="devices.yaml", help="the device registry (default ./devices.yaml)")
    p.add_argument("--threads", type=int, help="runtime threads (default: the device's)")
    p.add_argument("--warmup", type=int, help="untimed runs first (default 10)")
    p.add_argument("--max-repeats", dest="max_repeats", type=int, help="cap on timed runs (default 1000)")
    p.add_argument("--max-seconds", dest="max_seconds", type=float, help="cap on timing wall time (default 30)")
    p.add_argument("--no-per-layer", dest="per_layer", action="store_false", help="skip the per-layer run")
    p.add_argument("--energy", choices=ENERGY_CHOICES, help="energy sensor (default: the device's energy_sensor)")
    p.add_argument("--store", type=Path, default=Path("profiles"), help="profile store folder (default ./profiles)")
    p.add_argument("--top", type=int, default=TOP_LAYERS, help=f"slowest layers to show (default {TOP_LAYERS})")
    p.set_defaults(func=cmd_profile)

    sub = verbs.add_parser("profiles", help="stored profiles").add_subparsers(dest="profiles_verb", required=True,
                                                                              metavar="VERB")
    p = sub.add_parser("list", help="stored profiles, oldest first")
    p.add_argument("--device")
    p.add_argument("--backend")
    p.add_argument("--artifact", help="an artifact folder, or a prefix of its manifest's sha256")
    p.add_argument("--store", type=Path, default=Path("profiles"))
    p.set_defaults(func=cmd_profiles_list)
    p = sub.add_parser("show", help="one stored profile")
    p.add_argument("id", help="a record id from `profiles list` (or a unique prefix), or a record's path")
    p.add_argument("--json", action="store_true", help="print the whole record as JSON")
    p.add_argument("--store", type=Path, default=Path("profiles"))
    p.add_argument("--top", type=int, default=TOP_LAYERS)
    p.set_defaults(func=cmd_profiles_show)
    p = sub.add_parser("compare", help="two profiles side by side (two artifacts, or two devices), ratio B / A")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--store", type=Path, default=Path("profiles"))
    p.set_defaults(func=cmd_profiles_compare)


def settings_from_args(a: argparse.Namespace, device) -> Any:
    """ProfileSettings from the flags, the device's threads and energy sensor filling the gaps."""
    from edge_compress.profile.profiler import ProfileSettings

    d: dict[str, Any] = {"threads": a.threads or device.threads, "energy": a.energy or device.energy_sensor,
                         "per_layer": a.per_layer}
    for key in ("warmup", "max_repeats", "max_seconds"):
        if getattr(a, key) is not None:
            d[key] = getattr(a, key)
    if "max_repeats" in d:
        d["min_repeats"] = min(ProfileSettings.min_repeats, d["max_repeats"])
    return ProfileSettings.from_dict(d)


def run_profile(device, artifact: Path, settings) -> dict[str, Any]:
    """Profile on ``device``: here for a local device, through the device's transport otherwise."""
    from edge_compress.artifact import load_artifact
    from edge_compress.profile.profiler import attach_device, profile_artifact, sensor_for_device

    backend = load_artifact(artifact, verify=False).backend
    if backend not in device.backends:
        raise ConfigError(f"artifact '{artifact}' is for {backend}, which device '{device.name}' does not list "
                          f"(backends: {', '.join(device.backends)}); export for one of those, or add {backend} "
                          "to its entry in devices.yaml")
    if device.connection == "local":
        record = profile_artifact(artifact, settings, device=device.name,
                                  sensor=sensor_for_device(device, settings.energy))
    else:
        try:
            from edge_compress.profile.remote import profile_on_device
        except ModuleNotFoundError as e:
            if e.name != "edge_compress.profile.remote":
                raise
            raise EdgeCompressError(f"device '{device.name}' is reached over {device.connection}, but this install "
                                    "has no remote transports (edge_compress.profile.remote); update edge-compress "
                                    "or profile on the device itself") from e
        record = profile_on_device(device, artifact, settings)
    return attach_device(record, device)


def cmd_profile(a) -> int:
    from edge_compress.profile.devices import get_device
    from edge_compress.profile.store import ProfileStore

    device = get_device(a.device, a.devices)
    settings = settings_from_args(a, device)
    record = run_profile(device, a.artifact, settings)
    path = ProfileStore(a.store).add(record)
    print_record(record, a.top)
    print(f"stored: {path}")
    return 0


# --- printing ----------------------------------------------------------------------------------

def _console():
    from rich.console import Console

    # A pipe or a file gets wide lines instead of rich's 80-column default: the tables are data.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def energy_text(e: dict[str, Any]) -> str:
    """One line for an energy section, its label first: measured, ESTIMATED, or none."""
    if e.get("mj_per_inference") is None:
        return f"none ({e.get('reason', 'not measured')})"
    v = f"{e['mj_per_inference']:.4g} mJ/inference"
    if e.get("measured"):
        return (f"measured ({e['method']}): {v} +- {e['error_mj']:.2g} (idle {e['idle_watts']:.3g} W subtracted, "
                f"{e['inferences']} inferences, {e['sample_count']} samples)")
    return f"ESTIMATED, not measured: {v} (up to {e['error_mj']:.2g} more; {e.get('source', '')})"


def print_record(r: dict[str, Any], top: int = TOP_LAYERS) -> None:
    from rich.table import Table

    con, lat, art = _console(), r["latency"], r["artifact"]
    con.print(f"[bold]{art.get('model')}[/] ({r['backend']} {r['environment'].get('runtime_version', '')}) on "
              f"[bold]{r['device']}[/], {r['system']['threads']} thread(s); artifact {art['sha256'][:12]}")
    con.print(f"latency: measured, {lat['repeats']} repeats after {lat['warmup']} warm-up; {lat['stopped']} "
              f"({lat['stop_reason']})")
    t = Table("p50 ms", "p90 ms", "p99 ms", "mean ms", "std ms", "median 95% CI ms")
    ci = lat.get("median_ci95")
    t.add_row(*(_fmt(lat[k]) for k in ("p50", "p90", "p99", "mean", "std")),
              f"{ci[0]:.3f} .. {ci[1]:.3f}" if ci else "n/a (too few repeats)")
    con.print(t)
    own = lat.get("runtime_reported")
    if own:
        con.print(f"the runtime's own timer on the same calls: p50 {own['p50']:.3f} ms (our timer adds "
                  f"{own['host_overhead_p50_ms']:.3f} ms: the Python call and input/output copies)")
    _print_layers(con, r.get("per_layer", {}), lat["p50"], top)
    mem = r.get("memory", {})
    if mem.get("method") == "measured":
        con.print(f"memory: measured peak RSS {mem['peak_rss_bytes'] / 2**20:.1f} MiB "
                  f"({mem['peak_minus_before_bytes'] / 2**20:.1f} MiB above the RSS before loading)")
    else:
        con.print(f"memory: {mem.get('reason', 'unavailable')}")
    con.print(f"energy: {energy_text(r.get('energy', {}))}")


def _print_layers(con, pl: dict[str, Any], p50_ms: float, top: int) -> None:
    from rich.table import Table

    if pl.get("method") != "measured":
        con.print(f"per layer: {pl.get('reason', 'not measured')}")
        return
    layers = sorted(pl["layers"], key=lambda x: -x["median_us"])[:top]
    con.print(f"per layer: top {len(layers)} of {len(pl['layers'])} nodes ({pl['source']}, separate run of "
              f"{pl['repeats']} repeats; sum of medians {pl['sum_of_medians_ms']:.3f} ms vs end-to-end p50 "
              f"{p50_ms:.3f} ms)")
    t = Table("layer", "op", "median us", "% of sum")
    total = pl["sum_of_medians_ms"] * 1e3 or 1.0
    for x in layers:
        t.add_row(x["name"], x["op_type"], f"{x['median_us']:.1f}", f"{100 * x['median_us'] / total:.1f}")
    con.print(t)


def cmd_profiles_list(a) -> int:
    from rich.table import Table

    from edge_compress.profile.store import ProfileStore

    found = ProfileStore(a.store).list(device=a.device, backend=a.backend, artifact=a.artifact)
    t = Table("id", "created (UTC)", "device", "backend", "model", "artifact", "threads", "p50 ms", "energy mJ")
    for e in found:
        r, en = e.record, e.record.get("energy", {})
        mj = en.get("mj_per_inference")
        t.add_row(e.id, str(r.get("created_utc", ""))[:19], e.device, e.backend, str(r["artifact"].get("model")),
                  e.artifact_sha[:12], str(r.get("settings", {}).get("threads", "?")), _fmt(r["latency"].get("p50")),
                  "-" if mj is None else f"{mj:.3g} ({en.get('label')})")
    _console().print(t)
    print(f"{len(found)} profile(s) under {a.store}")
    for path, reason in found.skipped:
        print(f"skipped damaged record {path}: {reason}", file=sys.stderr)
    if found.temp_files:
        print(f"{len(found.temp_files)} unfinished temporary file(s) left by interrupted writers were not counted",
              file=sys.stderr)
    return 0


def cmd_profiles_show(a) -> int:
    from edge_compress.profile.store import ProfileStore

    store = ProfileStore(a.store)
    record = store.show(a.id)
    if a.json:
        print(json.dumps(record, indent=1))
        return 0
    print_record(record, a.top)
    print(f"record: {store.resolve(a.id)}")
    return 0


def cmd_profiles_compare(a) -> int:
    from rich.table import Table

    from edge_compress.profile.store import ProfileStore

    store = ProfileStore(a.store)
    ra, rb = store.show(a.a), store.show(a.b)
    c = store.compare(ra, rb)
    if a.json:
        print(json.dumps(c.to_dict(), indent=1))
        return 0
    con = _console()
    for tag, r in (("A", ra), ("B", rb)):
        con.print(f"{tag}: {r.get('id')}  {r['device']} / {r['backend']} / {r['artifact'].get('model')} "
                  f"({r['artifact']['sha256'][:12]})")
    t = Table("metric", "unit", "A", "B", "B / A", "how")
    for row in c.rows:
        t.add_row(row.metric, row.unit, _fmt(row.a, 4), _fmt(row.b, 4),
                  "-" if row.ratio is None else f"x{row.ratio:.3f}", row.note)
    con.print(t)
    con.print(f"comparing {c.kind}" + "".join(f"\nnote: {n}" for n in c.notes))
    return 0
