"""The fit HTML report: structure, degenerate inputs, escaping, and a real headless browser.

The browser tests need Debian's chromium (``apt-get install -y chromium``); they skip without it,
except under CI (``CI=true``), which installs it and so fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from edge_compress.fit.report import render_report, write_report

N_CANDIDATES, N_LAYERS = 20, 10
INSTALL_HINT = "chromium not found: install it with `apt-get install -y chromium`"


def _candidates() -> list[dict]:
    out = []
    for i in range(N_CANDIDATES):
        ms = 8.0 + 0.9 * i
        est = 0.30 + 0.2 * (1 - 1 / (1 + 0.25 * i)) - 0.01 * (i % 3)
        out.append({"key": f"c{i:02d}-p{0.05 * (i % 6):.2f}-int8", "measured_ms": ms,
                    "predicted_ms": ms * (1 + 0.03 * ((i % 5) - 2)), "est_ap": est,
                    "ap": est - 0.004 if i % 4 == 0 else None, "heldout": i % 3 == 0,
                    "pareto": i % 3 != 2, "energy_mj": 2.0 + 0.1 * i, "size_bytes": 2_000_000 + 50_000 * i})
    return out


def _layers() -> list[dict]:
    kinds = ("conv", "depthwise", "pointwise")
    return [{"name": f"backbone.{i}.conv", "kind": kinds[i % 3], "prune_ratio": None if i == 0 else 0.1 * (i % 4),
             "precision": "fp32" if i in (0, N_LAYERS - 1) else "int8", "in_channels": 16 * (i + 1),
             "out_channels": 16 * (i + 2) - 4 * (i % 4), "orig_out_channels": 16 * (i + 2),
             "macs": 1_000_000 * (i + 1)} for i in range(N_LAYERS)]


def realistic() -> dict:
    cands = _candidates()
    heldout = [{"key": c["key"], "predicted_ms": c["predicted_ms"], "measured_ms": c["measured_ms"]}
               for c in cands if c["heldout"]]
    return {
        "model": {"name": "picodet-s", "family": "picodet"}, "device": "rpi5", "backend": "onnxruntime",
        "threads": 4, "budget": {"latency_ms": 20.0, "percentile": "p90", "energy_mj": 4.0, "size_bytes": 4_000_000},
        "baselines": [{"name": "fp32", "latency_ms": 31.0, "ap": 0.512, "size_bytes": 4_800_000},
                      {"name": "int8 uniform", "latency_ms": 17.5, "ap": 0.489, "size_bytes": 1_300_000},
                      {"name": "uniform prune 0.25 + int8", "latency_ms": 13.2, "ap": 0.455, "size_bytes": None}],
        "candidates": cands,
        "result": {"key": cands[12]["key"], "latency_ms": 19.1, "ap": 0.497, "ap50": 0.701, "energy_mj": 3.2,
                   "energy_label": "estimated", "size_bytes": 2_600_000, "artifact": "runs/fit/picodet-s/artifact",
                   "rounds": [{"round": 1, "search_budget_ms": 20.0, "measured_ms": 21.3, "passed": False},
                              {"round": 2, "search_budget_ms": 18.8, "measured_ms": 19.1, "passed": True,
                               "reference": [{"drift": 1.42}, {"drift": 1.03}]}]},
        "layers": _layers(),
        "latency_model": {"n_fit": 14, "n_heldout": len(heldout), "within_10pct": 1.0, "median_abs_rel_err": 0.03,
                          "p95_abs_rel_err": 0.06, "heldout": heldout,
                          "environment": {"onnxruntime": "1.32.0", "cpu": "Cortex-A76"}},
        "notes": ["energy estimated from the power model (no meter attached)"],
    }


def _empty() -> dict:
    return {"model": {"name": "m", "family": "f"}, "device": "d", "backend": "b", "threads": 1,
            "budget": {"latency_ms": None, "percentile": "p50", "energy_mj": None, "size_bytes": None},
            "baselines": [], "candidates": [], "result": None, "layers": [],
            "latency_model": {"n_fit": 0, "n_heldout": 0, "within_10pct": None, "median_abs_rel_err": None,
                              "p95_abs_rel_err": None, "heldout": [], "environment": {}},
            "notes": []}


def _single_point() -> dict:
    data = _empty()
    data["candidates"] = [{"key": "only", "measured_ms": 10.0, "predicted_ms": None, "est_ap": 0.4, "ap": None,
                           "heldout": False, "pareto": True, "energy_mj": None, "size_bytes": None}]
    return data


def _all_equal() -> dict:
    data = realistic()
    for c in data["candidates"]:
        c.update(measured_ms=12.0, est_ap=0.4, ap=None)
    data["baselines"], data["result"] = [], None
    data["latency_model"]["heldout"] = [{"key": "a", "predicted_ms": 0.0, "measured_ms": 0.0}] * 3
    return data


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.ids.update(v for k, v in attrs if k == "id" and v)


def _ids(page: str) -> set[str]:
    parser = _Ids()
    parser.feed(page)
    parser.close()
    return parser.ids


def _inside(page: str, tag: str, ident: str) -> str:
    match = re.search(rf'<{tag}\b[^>]*\bid="{ident}"[^>]*>(.*?)</{tag}>', page, re.S)
    assert match, f'no <{tag} id="{ident}"> in the page'
    return match.group(1)


def _body_rows(page: str, ident: str) -> int:
    """Rows in the table's body (its header and totals rows are in thead and tfoot)."""
    body = re.search(r"<tbody>(.*?)</tbody>", _inside(page, "table", ident), re.S)
    assert body, f"table {ident} has no tbody"
    return body.group(1).count("<tr")


def test_realistic_report_has_every_part():
    page = render_report(realistic())
    assert page.startswith("<!DOCTYPE html>")
    assert {"summary", "pareto", "latency-model", "layers", "rounds", "notes"} <= _ids(page)
    assert _body_rows(page, "layers") == N_LAYERS
    assert _body_rows(page, "rounds") == 2
    assert "+42% then +3%" in _inside(page, "table", "rounds")   # the device's slow phase at the first try
    assert _body_rows(page, "summary") == 1 + 3
    assert _inside(page, "svg", "pareto").count("<circle") >= N_CANDIDATES
    assert "picodet-s" in page and "rpi5" in page and "onnxruntime" in page and "20.00 ms p90" in page
    assert "-1.5" in _inside(page, "table", "summary")  # result AP 0.497 vs fp32 0.512, in points
    assert "(estimated)" in _inside(page, "table", "summary")
    assert "budget-line" in page and "front-line" in page and "result-ring" in page


def test_latency_model_caption_gives_the_error_before_the_drift_correction():
    """Held-out candidates measured while the device ran off its start speed: the caption says how many
    and the share within +-10% against their latencies as measured; with none, it says nothing of it."""
    data = realistic()
    lm = data["latency_model"]
    assert "as measured" not in render_report(data)
    lm["heldout"][0].update(raw_ms=1.3 * lm["heldout"][0]["measured_ms"], speed=1.3)
    lm["raw_within_10pct"] = 0.75
    caption = render_report(data).split('id="latency-model"', 1)[1]
    assert "1 of them were measured while the device ran off its speed" in caption
    assert "Against the latencies as measured: 75" in caption


def test_report_is_self_contained():
    page = render_report(realistic())
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page and "<link" not in page


@pytest.mark.parametrize("make", [_empty, _single_point, _all_equal], ids=["empty", "single", "all-equal"])
def test_degenerate_inputs_render(make):
    page = render_report(make())
    assert {"summary", "pareto", "latency-model", "layers"} <= _ids(page)
    assert not re.search(r'="[^"]*\b(nan|inf)\b', page), "a coordinate is NaN or infinite"


def test_empty_and_single_point_say_no_data():
    empty = render_report(_empty())
    assert "no data" in _inside(empty, "svg", "pareto") and "no data" in _inside(empty, "svg", "latency-model")
    assert "No result" in empty
    single = render_report(_single_point())
    assert 'class="cand front est"' in _inside(single, "svg", "pareto")  # one point is still plotted
    assert "no data" in _inside(single, "svg", "latency-model")


def test_missing_keys_render():
    assert "no data" in render_report({})


def test_strings_are_escaped():
    data = realistic()
    evil = "<script>alert(1)</script>"
    data["model"]["name"] = evil
    data["candidates"][0]["key"] = evil
    data["baselines"][0]["name"] = evil
    data["layers"][0]["name"] = evil
    data["notes"].append(evil + ' & "quoted"')
    page = render_report(data)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&amp; &quot;quoted&quot;" in page


def test_write_report_writes_atomically(tmp_path):
    target = tmp_path / "sub" / "report.html"
    assert write_report(realistic(), target) == target
    assert target.read_text(encoding="utf-8") == render_report(realistic())
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]  # no temporary file left


# --- a real browser -------------------------------------------------------------------------

def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(INSTALL_HINT + " (CI installs it; this run lacks it)")
        pytest.skip(INSTALL_HINT)
    return path


def _run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture
def report_file(tmp_path) -> Path:
    return write_report(realistic(), tmp_path / "report.html")


def test_chromium_renders_the_dom(tmp_path, report_file):
    dom = _run_chromium(tmp_path, "--dump-dom", report_file.as_uri()).stdout
    assert {"pareto", "latency-model", "summary", "layers", "rounds"} <= _ids(dom)
    assert _inside(dom, "svg", "pareto").count("<circle") >= N_CANDIDATES
    assert _inside(dom, "svg", "latency-model").count("<circle") >= sum(c["heldout"] for c in _candidates())
    assert _body_rows(dom, "layers") == N_LAYERS and _body_rows(dom, "rounds") == 2


def test_chromium_screenshot_is_not_blank(tmp_path, report_file):
    from PIL import Image

    png = tmp_path / "report.png"
    _run_chromium(tmp_path, f"--screenshot={png}", "--window-size=1200,2000", report_file.as_uri())
    assert png.is_file() and png.stat().st_size > 0
    with Image.open(png) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 24)
    assert len(colours) > 10, f"the screenshot has only {len(colours)} colours"
