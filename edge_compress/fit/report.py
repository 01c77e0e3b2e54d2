"""The HTML report of a latency-budget search (``fit``).

One self-contained HTML5 page: inline CSS, hand-written inline SVG, no scripts and no external
URLs, so it opens from a file on any machine and can travel with a run folder. It shows

* the title: model, device, backend, threads and the budget (latency at a percentile, energy, size);
* ``#summary``: the chosen configuration against the baselines: latency at the budget percentile,
  speed-up and AP delta (in points, AP x 100) against the fp32 baseline, size, and energy with
  whether it was measured or estimated;
* ``#pareto``: AP against measured latency of every candidate. AP is the measured mAP where a short
  fine-tune checked it (filled dot) and the search's estimate otherwise (hollow dot); the Pareto
  front is connected, the baselines are labelled squares, the result is ringed and the latency
  budget is a dashed vertical line;
* ``#latency-model``: predicted against measured latency of the held-out candidates, with the
  y = x line and the +-10 % band: how far the latency model that steered the search can be trusted;
* ``#layers``: per layer, output channels kept, prune ratio, precision and MACs;
* ``#rounds``: each search round's internal budget, the latency measured for its pick and how fast the
  uncompressed model ran beside it against the start of the run (a device in a slow phase);
* the runtime environment the latency model was fitted in, and the search's notes.

The input is the plain JSON-able dict the search writes (schema in ``render_report``). Missing
values show as a dash; a plot with nothing to draw says "no data"; a single point or values that
are all equal get a window opened around them rather than a division by zero.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from edge_compress.io import atomic_path

DASH = "\u2014"
WITHIN = 0.10  # the latency model's band: |predicted - measured| <= 10 % of measured

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1000px; color: #222; }
h1 { font-size: 20px; margin-bottom: 4px; } h2 { font-size: 16px; margin-top: 28px; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid #999; } tfoot td { font-weight: 600; border-top: 2px solid #999; }
tr.result td { background: #fdecea; font-weight: 600; }
.ok { color: #2e7d32; } .fail { color: #c62828; }
figure { margin: 8px 0; } figcaption { color: #444; max-width: 900px; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
svg .axis-title { font-size: 12px; } svg .nodata { font-size: 16px; fill: #888; }
.plot-bg { fill: #fafafa; stroke: #999; } .grid { stroke: #e4e4e4; }
.cand { fill: #4c78a8; stroke: #4c78a8; stroke-width: 1.5; } .cand.est { fill: #fff; }
.cand.front { fill: #f58518; stroke: #f58518; } .cand.front.est { fill: #fff; }
.front-line { fill: none; stroke: #f58518; stroke-width: 1.5; }
.baseline { fill: #555; } .result-ring { fill: none; stroke: #e45756; stroke-width: 2.5; }
.budget-line { stroke: #e45756; stroke-width: 1.5; stroke-dasharray: 6 4; }
.identity { stroke: #555; stroke-width: 1; } .band { fill: #54a24b; fill-opacity: 0.15; }
.lm.in { fill: #54a24b; } .lm.out { fill: #e45756; }
"""


# --- values and formatting --------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> float | None:
    """A finite float, or None for None, booleans, non-numbers, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    v = _num(value)
    return DASH if v is None else f"{v:{spec}}{unit}"


def _fmt_ms(value: Any) -> str:
    return _fmt(value, ".2f", " ms")


def _fmt_ap(value: Any) -> str:
    return _fmt(value, ".3f")


def _fmt_pts(delta: Any) -> str:
    """An AP difference in points (AP x 100)."""
    v = _num(delta)
    return DASH if v is None else f"{100 * v:+.1f}"


def _fmt_scaled(value: Any, units: Sequence[tuple[str, float]], base: str) -> str:
    v = _num(value)
    if v is None:
        return DASH
    for unit, scale in units:
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f}{base}"


def _fmt_bytes(value: Any) -> str:
    return _fmt_scaled(value, (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)), " B")


def _fmt_count(value: Any) -> str:
    return _fmt_scaled(value, (("G", 1e9), ("M", 1e6), ("k", 1e3)), "")


def _fmt_mj(value: Any) -> str:
    return _fmt(value, ".2f", " mJ")


def _fmt_energy(value: Any, label: Any = None) -> str:
    text = _fmt_mj(value)
    return f"{text} ({label})" if label and text != DASH else text


def _fmt_pct(fraction: Any) -> str:
    v = _num(fraction)
    return DASH if v is None else f"{100 * v:.1f} %"


def _diff(a: Any, b: Any) -> float | None:
    a, b = _num(a), _num(b)
    return None if a is None or b is None else a - b


def _ratio(a: Any, b: Any) -> float | None:
    a, b = _num(a), _num(b)
    return None if a is None or b is None or b == 0 else a / b


# --- plot geometry ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Frame:
    """Pixel layout of one plot: the plot area, with the legend to the right of it."""

    right: int
    width: int = 900
    height: int = 400
    left: int = 70
    top: int = 20
    bottom: int = 340


PARETO_FRAME = _Frame(right=640)
LM_FRAME = _Frame(right=390)  # square plot area: the y = x line runs at 45 degrees


@dataclass(frozen=True)
class _Axis:
    lo: float
    hi: float  # always > lo (see _domain)
    px_lo: float
    px_hi: float

    def at(self, v: float) -> float:
        return self.px_lo + (v - self.lo) / (self.hi - self.lo) * (self.px_hi - self.px_lo)


@dataclass(frozen=True)
class _Point:
    x: float
    y: float
    label: str
    measured: bool = True  # y is a measured value, not an estimate


def _domain(values: Iterable[float], floor: float | None = None) -> tuple[float, float]:
    """Data range padded by 6 %; one value (or all equal) gets a +-10 % window around it.

    ``floor`` (0 for latencies and AP) keeps the padding from reaching below it when the data do not.
    """
    vals = list(values)
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.06 if hi > lo else (abs(lo) * 0.1 or 1.0)
    low = lo - pad if floor is None or lo < floor else max(lo - pad, floor)
    return low, hi + pad


def _ticks(lo: float, hi: float, target: int = 6) -> tuple[list[float], int]:
    """Round tick values (steps of 1, 2 or 5 x 10^k) inside [lo, hi] and the decimals they need."""
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    count = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [first + i * step for i in range(count)], max(0, -math.floor(math.log10(step)))


def _tick_label(value: float, decimals: int) -> str:
    return f"{round(value, decimals) + 0.0:.{decimals}f}"  # + 0.0 turns -0.0 into 0.0


# --- SVG pieces -------------------------------------------------------------------------------

def _svg(ident: str, frame: _Frame, body: Sequence[str], label: str) -> str:
    return (f'<svg id="{ident}" width="{frame.width}" height="{frame.height}" '
            f'viewBox="0 0 {frame.width} {frame.height}" role="img" aria-label="{_e(label)}">'
            + "".join(body) + "</svg>")


def _no_data_svg(ident: str, frame: _Frame, why: str) -> str:
    body = [f'<rect class="plot-bg" x="{frame.left}" y="{frame.top}" width="{frame.right - frame.left}" '
            f'height="{frame.bottom - frame.top}"/>',
            f'<text class="nodata" x="{(frame.left + frame.right) / 2}" y="{(frame.top + frame.bottom) / 2}" '
            f'text-anchor="middle">no data</text>',
            f'<text x="{(frame.left + frame.right) / 2}" y="{(frame.top + frame.bottom) / 2 + 20}" '
            f'text-anchor="middle">{_e(why)}</text>']
    return _svg(ident, frame, body, f"no data: {why}")


def _x_ticks(frame: _Frame, x: _Axis) -> list[str]:
    ticks, decimals = _ticks(x.lo, x.hi)
    out = []
    for t in ticks:
        px = x.at(t)
        out.append(f'<line class="grid" x1="{px:.1f}" y1="{frame.top}" x2="{px:.1f}" y2="{frame.bottom}"/>'
                   f'<text x="{px:.1f}" y="{frame.bottom + 16}" text-anchor="middle">'
                   f"{_tick_label(t, decimals)}</text>")
    return out


def _y_ticks(frame: _Frame, y: _Axis) -> list[str]:
    ticks, decimals = _ticks(y.lo, y.hi)
    out = []
    for t in ticks:
        py = y.at(t)
        out.append(f'<line class="grid" x1="{frame.left}" y1="{py:.1f}" x2="{frame.right}" y2="{py:.1f}"/>'
                   f'<text x="{frame.left - 6}" y="{py + 4:.1f}" text-anchor="end">'
                   f"{_tick_label(t, decimals)}</text>")
    return out


def _axes(frame: _Frame, x: _Axis, y: _Axis, x_title: str, y_title: str) -> list[str]:
    mid_x, mid_y = (frame.left + frame.right) / 2, (frame.top + frame.bottom) / 2
    return ([f'<rect class="plot-bg" x="{frame.left}" y="{frame.top}" width="{frame.right - frame.left}" '
             f'height="{frame.bottom - frame.top}"/>']
            + _x_ticks(frame, x) + _y_ticks(frame, y)
            + [f'<text class="axis-title" x="{mid_x}" y="{frame.bottom + 38}" text-anchor="middle">'
               f"{_e(x_title)}</text>",
               f'<text class="axis-title" x="18" y="{mid_y}" text-anchor="middle" '
               f'transform="rotate(-90 18 {mid_y})">{_e(y_title)}</text>'])


def _legend(frame: _Frame, items: Sequence[tuple[str, str]]) -> list[str]:
    """``items``: (marker template with {x} and {y} placeholders, label), one per row."""
    x0, out = frame.right + 24, []
    for i, (marker, label) in enumerate(items):
        y = frame.top + 12 + 22 * i
        out.append(marker.format(x=x0, y=y, x1=x0 - 8, x2=x0 + 8, ys=y - 5, xs=x0 - 5)
                   + f'<text x="{x0 + 16}" y="{y + 4}">{_e(label)}</text>')
    return out


def _dot(p: _Point, x: _Axis, y: _Axis, css: str, r: float, tip: str) -> str:
    return f'<circle class="{css}" cx="{x.at(p.x):.1f}" cy="{y.at(p.y):.1f}" r="{r}"><title>{_e(tip)}</title></circle>'


# --- the Pareto plot --------------------------------------------------------------------------

def _candidate_point(c: dict) -> _Point | None:
    x, ap, est = _num(c.get("measured_ms")), _num(c.get("ap")), _num(c.get("est_ap"))
    y = ap if ap is not None else est
    return None if x is None or y is None else _Point(x, y, str(c.get("key", "")), ap is not None)


def _baseline_point(b: dict) -> _Point | None:
    x, y = _num(b.get("latency_ms")), _num(b.get("ap"))
    return None if x is None or y is None else _Point(x, y, str(b.get("name", "")))


def _result_point(result: dict | None, candidates: Sequence[dict]) -> _Point | None:
    """The result at its measured latency; its AP, or its candidate's AP (or estimate) when it has none."""
    if not result or _num(result.get("latency_ms")) is None:
        return None
    if _num(result.get("ap")) is not None:
        return _Point(float(result["latency_ms"]), float(result["ap"]), str(result.get("key", "")))
    match = next((p for c in candidates if c.get("key") == result.get("key") and (p := _candidate_point(c))), None)
    return None if match is None else _Point(float(result["latency_ms"]), match.y, match.label, match.measured)


def _candidate_dot(c: dict, p: _Point, x: _Axis, y: _Axis) -> str:
    css = "cand" + (" front" if c.get("pareto") else "") + ("" if p.measured else " est")
    kind = "measured AP" if p.measured else "estimated AP"
    return _dot(p, x, y, css, 4, f"{p.label}: {_fmt_ms(p.x)}, {kind} {_fmt_ap(p.y)}")


def _front_line(points: Sequence[_Point], x: _Axis, y: _Axis) -> list[str]:
    if len(points) < 2:
        return []
    coords = " ".join(f"{x.at(p.x):.1f},{y.at(p.y):.1f}" for p in sorted(points, key=lambda p: (p.x, p.y)))
    return [f'<polyline class="front-line" points="{coords}"/>']


def _label(text: str, px: float, py: float, x: _Axis, css: str = "") -> str:
    """A marker's label, beside it towards the middle of the plot so it stays inside the plot area."""
    left_half = px < (x.px_lo + x.px_hi) / 2
    anchor, lx = ("start", px + 8) if left_half else ("end", px - 8)
    cls = f' class="{css}"' if css else ""
    return f'<text{cls} x="{lx:.1f}" y="{py:.1f}" text-anchor="{anchor}">{_e(text)}</text>'


def _baseline_marker(p: _Point, x: _Axis, y: _Axis) -> str:
    px, py = x.at(p.x), y.at(p.y)
    return (f'<rect class="baseline" x="{px - 5:.1f}" y="{py - 5:.1f}" width="10" height="10">'
            f"<title>{_e(p.label)}: {_fmt_ms(p.x)}, AP {_fmt_ap(p.y)}</title></rect>"
            + _label(p.label, px, py - 7, x))


def _result_marker(p: _Point, x: _Axis, y: _Axis) -> str:
    ring = _dot(p, x, y, "result-ring", 9, f"result {p.label}: {_fmt_ms(p.x)}, AP {_fmt_ap(p.y)}")
    return ring + _label("result", x.at(p.x), y.at(p.y) + 20, x, "fail")


def _budget_line(frame: _Frame, budget_ms: float | None, x: _Axis) -> list[str]:
    if budget_ms is None:
        return []
    px = x.at(budget_ms)
    return [f'<line class="budget-line" x1="{px:.1f}" y1="{frame.top}" x2="{px:.1f}" y2="{frame.bottom}"/>'
            f'<text x="{px + 4:.1f}" y="{frame.top + 12}" class="fail">budget</text>']


PARETO_LEGEND = (
    ('<circle class="cand" cx="{x}" cy="{y}" r="4"/>', "candidate, measured AP (fine-tuned)"),
    ('<circle class="cand est" cx="{x}" cy="{y}" r="4"/>', "candidate, estimated AP"),
    ('<line class="front-line" x1="{x1}" y1="{y}" x2="{x2}" y2="{y}"/>'
     '<circle class="cand front" cx="{x}" cy="{y}" r="4"/>', "Pareto front"),
    ('<rect class="baseline" x="{xs}" y="{ys}" width="10" height="10"/>', "baseline"),
    ('<circle class="result-ring" cx="{x}" cy="{y}" r="8"/>', "result"),
    ('<line class="budget-line" x1="{x1}" y1="{y}" x2="{x2}" y2="{y}"/>', "latency budget"),
)


def _pareto_svg(data: dict) -> str:
    frame, candidates = PARETO_FRAME, data.get("candidates") or []
    cands = [(c, p) for c in candidates if (p := _candidate_point(c))]
    bases = [p for b in data.get("baselines") or [] if (p := _baseline_point(b))]
    res = _result_point(data.get("result"), candidates)
    points = [p for _, p in cands] + bases + ([res] if res else [])
    if not points:
        return _no_data_svg("pareto", frame, "no candidate or baseline has both a latency and an AP")
    budget = _num((data.get("budget") or {}).get("latency_ms"))
    x = _Axis(*_domain([p.x for p in points] + ([budget] if budget is not None else []), floor=0.0),
              frame.left, frame.right)
    y = _Axis(*_domain([p.y for p in points], floor=0.0), frame.bottom, frame.top)
    body = _axes(frame, x, y, f"measured latency (ms, {_percentile(data)})", "COCO AP")
    body += _budget_line(frame, budget, x) + _front_line([p for c, p in cands if c.get("pareto")], x, y)
    body += [_candidate_dot(c, p, x, y) for c, p in cands] + [_baseline_marker(p, x, y) for p in bases]
    body += ([_result_marker(res, x, y)] if res else []) + _legend(frame, PARETO_LEGEND)
    return _svg("pareto", frame, body, "AP against measured latency of every candidate")


def _pareto_caption(data: dict) -> str:
    candidates = data.get("candidates") or []
    plotted = [p for c in candidates if (p := _candidate_point(c))]
    measured = sum(p.measured for p in plotted)
    front = sum(bool(c.get("pareto")) and _candidate_point(c) is not None for c in candidates)
    text = (f"{len(plotted)} candidates plotted ({measured} with AP measured after a short fine-tune, "
            f"{len(plotted) - measured} with estimated AP); {front} on the Pareto front.")
    skipped = len(candidates) - len(plotted)
    return text + (f" {skipped} candidates without a latency or an AP are not plotted." if skipped else "")


# --- the latency-model plot -------------------------------------------------------------------

def _heldout_points(lm: dict) -> list[_Point]:
    points = []
    for h in lm.get("heldout") or []:
        m, p = _num(h.get("measured_ms")), _num(h.get("predicted_ms"))
        if m is not None and p is not None:
            points.append(_Point(m, p, str(h.get("key", ""))))
    return points


def _within(p: _Point) -> bool:
    return abs(p.y - p.x) <= WITHIN * abs(p.x)


def _band_and_identity(lo: float, hi: float, x: _Axis, y: _Axis) -> list[str]:
    band = [(lo, lo * (1 - WITHIN)), (hi, hi * (1 - WITHIN)), (hi, hi * (1 + WITHIN)), (lo, lo * (1 + WITHIN))]
    coords = " ".join(f"{x.at(a):.1f},{y.at(b):.1f}" for a, b in band)
    return [f'<g clip-path="url(#lm-clip)"><polygon class="band" points="{coords}"/>'
            f'<line class="identity" x1="{x.at(lo):.1f}" y1="{y.at(lo):.1f}" x2="{x.at(hi):.1f}" '
            f'y2="{y.at(hi):.1f}"/></g>']


def _clip(frame: _Frame) -> str:
    return (f'<defs><clipPath id="lm-clip"><rect x="{frame.left}" y="{frame.top}" '
            f'width="{frame.right - frame.left}" height="{frame.bottom - frame.top}"/></clipPath></defs>')


def _heldout_dot(p: _Point, x: _Axis, y: _Axis) -> str:
    err = _ratio(p.y - p.x, p.x)
    err_text = DASH if err is None else f"{100 * err:+.1f} %"
    tip = f"{p.label}: predicted {_fmt_ms(p.y)}, measured {_fmt_ms(p.x)} ({err_text})"
    return _dot(p, x, y, "lm " + ("in" if _within(p) else "out"), 4, tip)


LM_LEGEND = (
    ('<circle class="lm in" cx="{x}" cy="{y}" r="4"/>', "held-out, within +-10 %"),
    ('<circle class="lm out" cx="{x}" cy="{y}" r="4"/>', "held-out, outside +-10 %"),
    ('<line class="identity" x1="{x1}" y1="{y}" x2="{x2}" y2="{y}"/>', "predicted = measured"),
    ('<rect class="band" x="{xs}" y="{ys}" width="10" height="10"/>', "+-10 % band"),
)


def _latency_model_svg(lm: dict) -> str:
    frame, points = LM_FRAME, _heldout_points(lm)
    if not points:
        return _no_data_svg("latency-model", frame, "no held-out candidate with both latencies")
    lo, hi = _domain([v for p in points for v in (p.x, p.y)], floor=0.0)
    x, y = _Axis(lo, hi, frame.left, frame.right), _Axis(lo, hi, frame.bottom, frame.top)
    body = [_clip(frame)] + _axes(frame, x, y, "measured latency (ms)", "predicted latency (ms)")
    body += _band_and_identity(lo, hi, x, y) + [_heldout_dot(p, x, y) for p in points]
    return _svg("latency-model", frame, body + _legend(frame, LM_LEGEND),
                "predicted against measured latency of the held-out candidates")


def _latency_model_caption(lm: dict) -> str:
    points, within = _heldout_points(lm), _num(lm.get("within_10pct"))
    source = ""
    if within is None and points:
        within, source = sum(map(_within, points)) / len(points), " (counted from the plotted points)"
    return (f"Within +-10 % of the measured latency: {_fmt_pct(within)}{source} of the held-out candidates. "
            f"Fitted on {_e(lm.get('n_fit', DASH))} candidates, {_e(lm.get('n_heldout', DASH))} held out; "
            f"median |relative error| {_fmt_pct(lm.get('median_abs_rel_err'))}, "
            f"95th percentile {_fmt_pct(lm.get('p95_abs_rel_err'))}." + _raw_caption(lm)
            + _noise_caption(lm.get("measurement")))


def _raw_caption(lm: dict) -> str:
    """Where some held-out candidates' batches ran while the device was off its speed at the start (the
    reference drifted), the measured latency is divided by that drift; the figure before the division."""
    raw = _num(lm.get("raw_within_10pct"))
    shifted = sum(1 for h in lm.get("heldout") or [] if isinstance(h, dict) and _num(h.get("speed")) not in (None, 1.0))
    if raw is None or not shifted:
        return ""
    return (f" {shifted} of them were measured while the device ran off its speed at the start of the run; "
            f"their latencies are divided by the reference's drift in that batch. Against the latencies as "
            f"measured: {_fmt_pct(raw)} within +-10 %.")


def _noise_caption(rep: Any) -> str:
    """The device's own repeatability, the bound on any model's accuracy (absent in older results)."""
    if not isinstance(rep, dict) or _num(rep.get("session_within_10pct_of_median")) is None:
        return ""
    return (f" The measurements themselves: {_fmt_pct(rep['session_within_10pct_of_median'])} of single "
            f"sessions fall within +-10 % of their candidate's median session (median deviation "
            f"{_fmt_pct(rep.get('session_median_abs_rel_dev'))}, over {_e(rep.get('n_candidates', DASH))} "
            "candidates).")


# --- tables -----------------------------------------------------------------------------------

def _row(cells: Sequence[Any], css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>"


def _table(ident: str, header: Sequence[str], rows: Sequence[str], foot: str = "") -> str:
    if not rows:
        rows = [f'<tr class="empty"><td colspan="{len(header)}">no data</td></tr>']
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    tfoot = f"<tfoot>{foot}</tfoot>" if foot else ""
    return f'<table id="{ident}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>{tfoot}</table>'


def _reference(baselines: Sequence[dict]) -> dict | None:
    """The baseline deltas are taken against: the one named fp32, else the first."""
    named = [b for b in baselines if str(b.get("name", "")).strip().lower() == "fp32"]
    return (named or list(baselines) or [None])[0]


def _summary_row(name: str, row: dict, ref: dict | None, css: str = "") -> str:
    ref = ref or {}
    speedup = _ratio(ref.get("latency_ms"), row.get("latency_ms"))
    return _row([name, _fmt_ms(row.get("latency_ms")), _fmt(speedup, ".2f", "x"), _fmt_ap(row.get("ap")),
                 _fmt_pts(_diff(row.get("ap"), ref.get("ap"))), _fmt_ap(row.get("ap50")),
                 _fmt_bytes(row.get("size_bytes")), _fmt_energy(row.get("energy_mj"), row.get("energy_label"))],
                css)


def _summary_table(data: dict) -> str:
    baselines, result = data.get("baselines") or [], data.get("result")
    ref = _reference(baselines)
    ref_name = str(ref.get("name", "")) if ref else "reference"
    rows = [_summary_row(f"result: {result.get('key', '')}", result, ref, "result")] if result else []
    rows += [_summary_row(str(b.get("name", "")), b, ref) for b in baselines]
    header = ["configuration", f"latency ({_percentile(data)})", f"speed-up vs {ref_name}", "AP",
              f"\u0394AP vs {ref_name} (points)", "AP50", "size", "energy"]
    return _table("summary", header, rows)


def _layer_row(layer: dict) -> str:
    channels = f"{layer.get('orig_out_channels', DASH)} \u2192 {layer.get('out_channels', DASH)}"
    return _row([layer.get("name", ""), layer.get("kind", ""), layer.get("in_channels", DASH), channels,
                 _fmt(layer.get("prune_ratio"), ".2f"), layer.get("precision") or DASH, _fmt_count(layer.get("macs"))])


def _layers_table(layers: Sequence[dict]) -> str:
    rows = [_layer_row(layer) for layer in layers]
    orig, kept, macs = (sum(_num(layer.get(k)) or 0 for layer in layers)
                        for k in ("orig_out_channels", "out_channels", "macs"))
    foot = _row([f"total ({len(layers)} layers)", "", "", f"{orig:.0f} \u2192 {kept:.0f}", "", "",
                 _fmt_count(macs)]) if layers else ""
    header = ["layer", "kind", "in channels", "out channels (orig \u2192 kept)", "prune ratio", "precision", "MACs"]
    return _table("layers", header, rows, foot)


def _drift(tries: Sequence[dict]) -> str:
    """The reference's speed at each verification try against its median in the run (+40%: slower)."""
    shown = [f"{t['drift'] - 1:+.0%}" for t in tries if t.get("drift") is not None]
    return " then ".join(shown) if shown else DASH


def _rounds_table(rounds: Sequence[dict]) -> str:
    rows = [_row([r.get("round", DASH), _fmt_ms(r.get("search_budget_ms")), _fmt_ms(r.get("measured_ms")),
                  _drift(r.get("reference") or []), "passed" if r.get("passed") else "failed"],
                 "" if r.get("passed") else "fail")
            for r in rounds]
    return _table("rounds", ["round", "search budget", "measured", "reference vs its median in the run", "verdict"],
                  rows)


def _environment_table(env: dict) -> str:
    rows = [_row([k, v]) for k, v in sorted(env.items(), key=lambda kv: str(kv[0]))]
    return _table("environment", ["key", "value"], rows)


# --- page -------------------------------------------------------------------------------------

def _percentile(data: dict) -> str:
    return str((data.get("budget") or {}).get("percentile") or "p50")


def _budget_text(data: dict) -> str:
    budget = data.get("budget") or {}
    parts = [f"{_fmt_ms(budget.get('latency_ms'))} {_percentile(data)}", _fmt_mj(budget.get("energy_mj")),
             _fmt_bytes(budget.get("size_bytes"))]
    if _num(budget.get("latency_ms")) is None:
        parts[0] = DASH
    return ", ".join(p for p in parts if p != DASH) or "none"


def _title(data: dict) -> str:
    model = data.get("model") or {}
    return (f"fit: {model.get('name', '?')} ({model.get('family', '?')}) on {data.get('device', '?')}, "
            f"{data.get('backend', '?')}, {data.get('threads', '?')} threads; budget {_budget_text(data)}")


def _check(label: str, value: Any, limit: Any, fmt) -> str:
    v, lim = _num(value), _num(limit)
    if lim is None:
        return ""
    if v is None:
        return f'<li>{_e(label)}: unknown (budget {_e(fmt(lim))})</li>'
    ok = v <= lim
    sign = "\u2264" if ok else ">"
    verdict = '<span class="ok">within budget</span>' if ok else '<span class="fail">over budget</span>'
    return f"<li>{_e(label)}: {_e(fmt(v))} {sign} {_e(fmt(lim))}: {verdict}</li>"


def _verdict(data: dict) -> str:
    result, budget = data.get("result"), data.get("budget") or {}
    if not result:
        return '<p class="fail">No result: the search returned no configuration.</p>'
    checks = [_check(f"latency ({_percentile(data)})", result.get("latency_ms"), budget.get("latency_ms"), _fmt_ms),
              _check("energy", result.get("energy_mj"), budget.get("energy_mj"), _fmt_mj),
              _check("size", result.get("size_bytes"), budget.get("size_bytes"), _fmt_bytes)]
    artifact = f"<p>Artifact: <code>{_e(result['artifact'])}</code></p>" if result.get("artifact") else ""
    return f"<p>Result <code>{_e(result.get('key', ''))}</code>:</p><ul>{''.join(checks)}</ul>{artifact}"


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


def _notes(notes: Sequence[Any]) -> str:
    if not notes:
        return "<p>none</p>"
    return '<ul id="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"


def _body(data: dict) -> list[str]:
    result, lm = data.get("result") or {}, data.get("latency_model") or {}
    rounds = result.get("rounds") or []
    return [f"<h1>{_e(_title(data))}</h1>", _verdict(data),
            "<h2>Result and baselines</h2>", _summary_table(data),
            "<h2>AP against latency</h2>", _figure(_pareto_svg(data), _pareto_caption(data)),
            "<h2>Latency model on held-out candidates</h2>",
            _figure(_latency_model_svg(lm), _latency_model_caption(lm)),
            "<h2>Per layer</h2>", _layers_table(data.get("layers") or []),
            *(["<h2>Search rounds</h2>", _rounds_table(rounds)] if rounds else []),
            "<h2>Latency-model environment</h2>", _environment_table(lm.get("environment") or {}),
            "<h2>Notes</h2>", _notes(data.get("notes") or [])]


def render_report(result: dict) -> str:
    """One self-contained HTML5 page for the dict a ``fit`` search writes.

    Keys (any may be missing; values marked so may be None; lists may be empty):
    ``model`` {name, family}, ``device``, ``backend``, ``threads``,
    ``budget`` {latency_ms?, percentile, energy_mj?, size_bytes?},
    ``baselines`` [{name, latency_ms, ap?, size_bytes?}],
    ``candidates`` [{key, measured_ms, predicted_ms?, est_ap?, ap?, heldout, pareto, energy_mj?, size_bytes?}],
    ``result``? {key, latency_ms, ap?, ap50?, energy_mj?, energy_label?, size_bytes?, artifact,
    rounds [{round, search_budget_ms, measured_ms, passed, reference? [{drift, ...}]}]},
    ``layers`` [{name, kind, prune_ratio?, precision, in_channels, out_channels, orig_out_channels, macs}],
    ``latency_model`` {n_fit, n_heldout, within_10pct?, median_abs_rel_err?, p95_abs_rel_err?,
    raw_within_10pct?, heldout [{key, predicted_ms, measured_ms, raw_ms?, speed?}], environment},
    ``notes`` [str].
    AP values are fractions (COCO AP); deltas are shown in points (x 100).
    """
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(_title(result))}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(_body(result)) + "\n</body></html>\n")


def write_report(result: dict, path: str | os.PathLike) -> Path:
    """Render the report and write it to ``path`` atomically (a temporary file renamed onto it)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(render_report(result), encoding="utf-8")
    return path
