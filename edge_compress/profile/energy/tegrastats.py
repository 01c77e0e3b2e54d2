"""Jetson rail power from ``tegrastats`` output: the fallback where hwmon is not readable.

Rails appear as ``NAME cur/avg`` in milliwatts. Orin (JetPack 5/6) prints the
unit and a leading date::

    11-24-2026 10:00:01 RAM 2519/7620MB (lfb 5x4MB) ... VDD_IN 4556mW/4556mW VDD_CPU_GPU_CV 498mW/498mW

Xavier and Nano (JetPack 4) print bare numbers and no date::

    RAM 2150/3956MB (lfb 100x4MB) ... POM_5V_IN 2963/2963 POM_5V_GPU 0/0 POM_5V_CPU 365/365

``RAM 2519/7620MB`` and ``SWAP 0/3810MB`` share the ``NAME a/b`` shape; the
unit glued to their numbers is what keeps them out of the rail pattern.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Sequence

from edge_compress.errors import BackendUnavailableError, DataError, EdgeCompressError, UnknownNameError
from edge_compress.profile.energy.reading import EnergyReading, PowerSample, reading_from_samples

# A rail: upper-case name, then current/average in mW with an optional "mW" suffix,
# followed by whitespace or the end (so "7620MB" never matches).
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_DATE = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")
MW_RESOLUTION_W = 1e-3  # tegrastats prints whole milliwatts


@dataclass(frozen=True)
class TegrastatsLine:
    """One parsed line: its date when printed (Orin) and every rail as (current mW, average mW)."""

    timestamp: datetime | None
    rails: dict[str, tuple[int, int]] = field(default_factory=dict)

    def watts(self, rail: str) -> float:
        """Instantaneous power of ``rail``; a miss lists the rails on the line."""
        if rail not in self.rails:
            raise UnknownNameError(
                f"rail {rail!r} not in this tegrastats line; rails: {sorted(self.rails)}; pass rail= "
                "with one of them (Orin: VDD_IN, Xavier: VDD_IN, Nano: POM_5V_IN)"
            )
        return self.rails[rail][0] / 1e3


def parse_tegrastats(line: str) -> TegrastatsLine:
    """Parse one tegrastats line; a line without a single ``NAME cur/avg`` rail is a ``DataError``."""
    rails = {m[1]: (int(m[2]), int(m[3])) for m in _RAIL.finditer(line)}
    if not rails:
        raise DataError(
            f"no power rail ('NAME cur/avg' in mW) in tegrastats line {line.strip()[:120]!r}; "
            "rails appear only on boards with an INA3221 (not the Nano 2GB)"
        )
    date = _DATE.match(line)
    stamp = datetime.strptime(date[1], "%m-%d-%Y %H:%M:%S") if date else None
    return TegrastatsLine(stamp, rails)


def tegrastats_energy(lines: Iterable[str], *, rail: str = "VDD_IN", interval_s: float) -> EnergyReading:
    """Energy of a ``tegrastats --interval MS --logfile FILE`` log: line i is taken at ``i * interval_s``.

    The printed date has one-second resolution, too coarse for the time axis,
    so the interval the tool was started with provides it.
    """
    samples = []
    for i, line in enumerate(text for text in lines if text.strip()):
        try:
            watts = parse_tegrastats(line).watts(rail)
        except (DataError, UnknownNameError) as err:
            raise DataError(f"tegrastats line {i + 1}: {err}") from None
        samples.append(PowerSample(i * interval_s, watts, MW_RESOLUTION_W))
    return reading_from_samples(samples, "tegrastats")


def held_edges(samples: Sequence[PowerSample], t0: float, t1: float) -> list[PowerSample]:
    """Samples inside [t0, t1] with the first and last value held out to the window edges."""
    inside = [s for s in samples if t0 < s.t < t1]
    if not inside:
        raise DataError(
            f"tegrastats: no line arrived within the {t1 - t0:.3f} s window; lengthen the window "
            "or lower --interval"
        )
    first, last = inside[0], inside[-1]
    return [PowerSample(t0, first.watts, first.resolution_w), *inside, PowerSample(t1, last.watts, last.resolution_w)]


class TegrastatsSensor:
    """Runs ``tegrastats --interval MS`` for the window and integrates one rail.

    Each line is stamped with ``clock`` when it arrives. ``command`` replaces
    the tool (tests run a script that prints recorded lines).
    """

    name = "tegrastats"
    kind = "measured"
    method = "tegrastats"

    def __init__(
        self,
        *,
        rail: str = "VDD_IN",
        interval_ms: int = 100,
        command: Sequence[str] | None = None,
        root: str | Path = "/",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rail, self.interval_ms, self.root = rail, interval_ms, Path(root)
        self.command = list(command) if command else [self._binary(), "--interval", str(interval_ms)]
        self._clock = clock
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._samples: list[PowerSample] = []
        self._error: Exception | None = None
        self._t0 = 0.0

    def _binary(self) -> str:
        local = self.root / "usr/bin/tegrastats"
        found = shutil.which("tegrastats") if str(self.root) == "/" else None
        return found or str(local)

    def available(self) -> tuple[bool, str]:
        exe = self.command[0]
        if shutil.which(exe) is None and not Path(exe).is_file():
            return False, (
                f"{exe} not found: tegrastats ships with L4T on Jetson boards (/usr/bin/tegrastats); "
                "on other machines there is no Jetson rail to read"
            )
        return True, f"{exe} (rail {self.rail}, every {self.interval_ms} ms)"

    def start(self) -> None:
        if self._proc is not None:
            raise EdgeCompressError("tegrastats: start() called twice; call stop() to close the open window first")
        self._samples, self._error = [], None
        self._t0 = self._clock()
        try:
            self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True, bufsize=1)
        except OSError as err:
            raise BackendUnavailableError(f"cannot run {self.command[0]}: {err}; check available() first") from err
        self._thread = threading.Thread(target=self._read_lines, name="tegrastats-reader", daemon=True)
        self._thread.start()

    def stop(self) -> EnergyReading:
        if self._proc is None or self._thread is None:
            raise EdgeCompressError("tegrastats: stop() without start(); call start() before the workload")
        t1 = self._clock()
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._thread.join(timeout=5)
        self._proc = self._thread = None
        if self._error is not None:
            raise DataError(f"tegrastats: {self._error}") from self._error
        trace = held_edges(self._samples, self._t0, t1)
        return reading_from_samples(trace, "tegrastats", real_count=len(trace) - 2)

    @property
    def samples(self) -> tuple[PowerSample, ...]:
        return tuple(self._samples)

    def _read_lines(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            t = self._clock()
            if not line.strip() or self._error is not None:
                continue
            try:
                self._samples.append(PowerSample(t, parse_tegrastats(line).watts(self.rail), MW_RESOLUTION_W))
            except (DataError, UnknownNameError) as err:
                self._error = err
