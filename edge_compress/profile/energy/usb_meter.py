"""An external USB power meter's CSV log, aligned to the inference window by timestamps.

The meter sits between the supply and the device and logs on its own clock,
for example::

    timestamp,voltage_v,current_a            timestamp,power_w
    1764000000.00,5.12,0.81                  2026-11-24T10:00:01.250+00:00,4.15

The time column holds epoch seconds or ISO-8601 (a naive ISO time is read as
the local time of the machine reading the file; write the offset to be safe).
Power comes from a watts column, or from volts x amps. Only the part of the
trace inside [t0, t1] counts: the edges are linearly interpolated, so a
piecewise-linear trace integrates exactly.
"""

from __future__ import annotations

import bisect
import csv
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Sequence

from edge_compress.errors import ConfigError, DataError
from edge_compress.profile.energy.reading import EnergyReading, PowerSample, check_samples, reading_from_samples

TIME_NAMES = ("timestamp", "time", "epoch", "t", "time_s", "time(s)")
POWER_NAMES = ("power_w", "power", "watts", "power(w)", "p", "w")
VOLTAGE_NAMES = ("voltage_v", "voltage", "volts", "voltage(v)", "v")
CURRENT_NAMES = ("current_a", "current", "amps", "current(a)", "i", "a")


@dataclass(frozen=True)
class MeterCsvFormat:
    """Which columns to read. ``None`` picks the first header (case-insensitive) from the ``*_NAMES`` defaults.

    ``resolution_w`` is the meter's power resolution per sample (its display
    step, e.g. 0.001 W), used in the error bound.
    """

    time_column: str | None = None
    power_column: str | None = None
    voltage_column: str | None = None
    current_column: str | None = None
    delimiter: str = ","
    resolution_w: float = 0.0

    def __post_init__(self) -> None:
        if (self.voltage_column is None) != (self.current_column is None):
            raise ConfigError(
                f"MeterCsvFormat voltage_column={self.voltage_column!r}, current_column={self.current_column!r}: "
                "set both (power = V * I) or neither"
            )
        if self.power_column is not None and self.voltage_column is not None:
            raise ConfigError("MeterCsvFormat: set power_column or voltage_column + current_column, not both")
        if self.resolution_w < 0:
            raise ConfigError(f"MeterCsvFormat resolution_w={self.resolution_w}: expected >= 0 watts")


def parse_timestamp(text: str) -> float:
    """Epoch seconds from a number or an ISO-8601 string; ``ValueError`` otherwise."""
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text.strip()).timestamp()


def _pick(header: Sequence[str], wanted: str | None, defaults: Sequence[str]) -> str | None:
    by_lower = {h.strip().lower(): h for h in header}
    if wanted is not None:
        return by_lower.get(wanted.strip().lower())
    return next((by_lower[d] for d in defaults if d in by_lower), None)


def _asked(fmt: MeterCsvFormat) -> list[str]:
    return [c for c in (fmt.time_column, fmt.power_column, fmt.voltage_column, fmt.current_column) if c]


def _columns(path: Path, header: Sequence[str], fmt: MeterCsvFormat) -> tuple[str, tuple[str, ...]]:
    """The time column and either (power,) or (voltage, current), or a DataError listing the header."""
    t = _pick(header, fmt.time_column, TIME_NAMES)
    p = None if fmt.voltage_column else _pick(header, fmt.power_column, POWER_NAMES)
    vi = (_pick(header, fmt.voltage_column, VOLTAGE_NAMES), _pick(header, fmt.current_column, CURRENT_NAMES))
    if t is None or (p is None and None in vi):
        raise DataError(
            f"{path}: header {list(header)} lacks a time column and a power (W) or voltage (V) + current (A) "
            f"pair; asked for {_asked(fmt) or 'the defaults'} (time {TIME_NAMES}, power {POWER_NAMES}); "
            "name your columns with MeterCsvFormat(time_column=..., power_column=...)"
        )
    return t, (p,) if p is not None else vi  # type: ignore[return-value]


def _row_sample(path: Path, row_no: int, row: dict, t_col: str, p_cols: tuple[str, ...], res: float) -> PowerSample:
    def number(col: str, parse: Callable[[str], float]) -> float:
        value = row.get(col)
        try:
            return parse(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            what = "epoch seconds or ISO-8601" if col == t_col else "a number"
            found = "missing (the row is shorter than the header)" if value is None else f"{value!r} is not {what}"
            raise DataError(f"{path}: row {row_no}, column {col!r}: {found}") from None

    t = number(t_col, parse_timestamp)
    values = [number(c, float) for c in p_cols]
    watts = values[0] if len(values) == 1 else values[0] * values[1]
    return PowerSample(t, watts, res)


def read_meter_csv(path: str | Path, fmt: MeterCsvFormat = MeterCsvFormat()) -> list[PowerSample]:
    """The whole trace, in file order; timestamps must increase (a DataError names the row)."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter=fmt.delimiter)
        t_col, p_cols = _columns(path, reader.fieldnames or [], fmt)
        samples: list[PowerSample] = []
        for row in reader:
            sample = _row_sample(path, reader.line_num, row, t_col, p_cols, fmt.resolution_w)
            if samples and not sample.t > samples[-1].t:
                raise DataError(
                    f"{path}: row {reader.line_num}, column {t_col!r}: time {sample.t} does not come after the "
                    f"previous row's {samples[-1].t}; the meter log must be in increasing time"
                )
            samples.append(sample)
    check_samples(samples, str(path))
    return samples


def interpolate(samples: Sequence[PowerSample], t: float) -> PowerSample:
    """The linearly interpolated power at ``t`` (inside the trace's span)."""
    i = bisect.bisect_left([s.t for s in samples], t)
    if samples[i].t == t:
        return samples[i]
    a, b = samples[i - 1], samples[i]
    watts = a.watts + (b.watts - a.watts) * (t - a.t) / (b.t - a.t)
    return PowerSample(t, watts, max(a.resolution_w, b.resolution_w))


def window_trace(samples: Sequence[PowerSample], t0: float, t1: float, source: str) -> tuple[list[PowerSample], int]:
    """The trace cut to [t0, t1] with interpolated edges, and how many real samples lie in it."""
    if not t1 > t0:
        raise ConfigError(f"{source}: window t0={t0}, t1={t1}; expected t1 > t0")
    first, last = samples[0].t, samples[-1].t
    if t0 < first or t1 > last:
        raise DataError(
            f"{source}: window [{t0:.3f}, {t1:.3f}] is outside the meter's time span [{first:.3f}, {last:.3f}]; "
            "check that the meter logged during the run and that its clock matches (clock_offset_s)"
        )
    inside = [s for s in samples if t0 < s.t < t1]
    real = sum(1 for s in samples if t0 <= s.t <= t1)
    return [interpolate(samples, t0), *inside, interpolate(samples, t1)], real


def energy_in_window(
    csv_path: str | Path,
    t0: float,
    t1: float,
    *,
    fmt: MeterCsvFormat = MeterCsvFormat(),
    clock_offset_s: float = 0.0,
    clock_uncertainty_s: float = 0.0,
) -> EnergyReading:
    """Energy the meter logged between host times ``t0`` and ``t1`` (epoch seconds).

    ``clock_offset_s`` is added to the meter's timestamps to bring them onto
    the host clock. ``clock_uncertainty_s`` (how far the two clocks may still
    disagree) adds ``clock_uncertainty_s * (P(t0) + P(t1))`` to the error:
    each edge may really lie that far away, at roughly the edge power.
    """
    shifted = [PowerSample(s.t + clock_offset_s, s.watts, s.resolution_w) for s in read_meter_csv(csv_path, fmt)]
    trace, real = window_trace(shifted, t0, t1, str(csv_path))
    edge_error = clock_uncertainty_s * (abs(trace[0].watts) + abs(trace[-1].watts))
    return reading_from_samples(trace, "usb-meter-csv", real_count=real, extra_error_j=edge_error)


class UsbMeterCsvSensor:
    """The ``Sensor`` face of a meter that logs to ``csv_path`` while the workload runs.

    ``start``/``stop`` note the host's epoch time; ``stop`` waits ``settle_s``
    for the meter's logger to write the last rows, then integrates the window.
    """

    name = "usb-meter-csv"
    kind = "measured"
    method = "usb-meter-csv"

    def __init__(
        self,
        csv_path: str | Path,
        *,
        fmt: MeterCsvFormat = MeterCsvFormat(),
        clock_offset_s: float = 0.0,
        clock_uncertainty_s: float = 0.0,
        settle_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.csv_path, self.fmt, self.settle_s = Path(csv_path), fmt, settle_s
        self.clock_offset_s, self.clock_uncertainty_s = clock_offset_s, clock_uncertainty_s
        self._clock = clock
        self._t0: float | None = None

    def available(self) -> tuple[bool, str]:
        if not self.csv_path.is_file():
            return False, f"{self.csv_path} does not exist: start the meter's logger writing there before profiling"
        return True, f"meter log {self.csv_path}"

    def start(self) -> None:
        self._t0 = self._clock()

    def stop(self) -> EnergyReading:
        if self._t0 is None:
            raise ConfigError("usb-meter-csv: stop() without start(); call start() before the workload")
        t0, t1, self._t0 = self._t0, self._clock(), None
        time.sleep(self.settle_s)
        return energy_in_window(
            self.csv_path,
            t0,
            t1,
            fmt=self.fmt,
            clock_offset_s=self.clock_offset_s,
            clock_uncertainty_s=self.clock_uncertainty_s,
        )
