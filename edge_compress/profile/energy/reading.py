"""What an energy measurement is: samples, a reading with its error bound, the sensor protocol.

A reading always says how it was obtained (``method``) and whether a sensor
measured it (``measured``), so a measured and an estimated number can never be
added or compared by accident (``combine_readings`` refuses).

Error bounds, both documented where they are computed:

* counters (RAPL): ``counter_error_j``
* sampled power (INA3221, INA2xx, tegrastats, Android, USB meter): ``sampled_error_j``
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol, Sequence, runtime_checkable

from edge_compress.errors import ConfigError, DataError, EdgeCompressError

METHODS = (
    "rapl",
    "ina3221-hwmon",
    "tegrastats",
    "ina2xx-hwmon",
    "android-battery",
    "usb-meter-csv",
    "estimated",
)


class MixedReadingsError(EdgeCompressError, ValueError):
    """Readings of different kinds (measured vs estimated) or sensors were combined."""


@dataclass(frozen=True)
class PowerSample:
    """Instantaneous power ``watts`` at time ``t`` (seconds, monotonic or epoch: one clock per trace).

    ``resolution_w`` is the quantisation of this one sample (the sensor's
    reporting unit carried through P = V * I), used by ``sampled_error_j``.
    """

    t: float
    watts: float
    resolution_w: float = 0.0


@dataclass(frozen=True)
class EnergyReading:
    """Energy over one window, how it was obtained, and how far it can be off.

    ``mean_watts`` and ``sampling_hz`` are ``None`` where they do not exist (an
    estimate without a latency has no window). ``error_j`` is a bound, not a
    standard deviation: the true energy lies within ``joules +- error_j`` under
    the assumptions written next to the formula that produced it.
    """

    joules: float
    window_s: float
    mean_watts: float | None
    sample_count: int
    sampling_hz: float | None
    method: str
    error_j: float
    measured: bool

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"EnergyReading method {self.method!r} is unknown; choices: {', '.join(METHODS)}")
        if self.measured != (self.method != "estimated"):
            raise ConfigError(
                f"EnergyReading method {self.method!r} with measured={self.measured}: only method "
                "'estimated' is unmeasured; a sensor reading must say measured=True"
            )
        if not (math.isfinite(self.joules) and self.error_j >= 0 and self.window_s >= 0 and self.sample_count >= 0):
            raise DataError(
                f"EnergyReading({self.method}): joules={self.joules}, error_j={self.error_j}, "
                f"window_s={self.window_s}, sample_count={self.sample_count}; expected finite joules "
                "and non-negative error, window and count"
            )

    @property
    def kind(self) -> str:
        """``"measured"`` or ``"estimated"``: the word a record and a table show."""
        return "measured" if self.measured else "estimated"

    def millijoules_per_inference(self, inferences: int) -> float:
        """Energy of one inference in mJ when the window held ``inferences`` of them."""
        if inferences < 1:
            raise ConfigError(f"inferences={inferences}: expected at least 1 inference in the window")
        return self.joules * 1e3 / inferences


@runtime_checkable
class Sensor(Protocol):
    """A power or energy sensor: ``start()`` opens a window, ``stop()`` closes it and returns the reading.

    ``available()`` never raises: it answers ``(False, reason)`` with what to do
    about it (STYLE.md: a backend answers with a reason instead of crashing).
    """

    name: str
    kind: str

    def available(self) -> tuple[bool, str]: ...

    def start(self) -> None: ...

    def stop(self) -> EnergyReading: ...


def counter_error_j(unit_j: float, update_s: float, mean_watts: float) -> float:
    """Error bound of an energy-counter difference (RAPL).

    ``error_j = 2 * unit_j + 2 * update_s * mean_watts``

    * quantisation: each of the two reads is truncated to the counter's energy
      unit, so the difference is off by less than one unit per read;
    * window edges: the hardware updates the counter every ``update_s``
      (about 1 ms for RAPL, Intel SDM vol. 3B, 15.10.1), so up to one update
      period of energy at ``mean_watts`` can fall on the wrong side of each edge.
    """
    return 2.0 * unit_j + 2.0 * update_s * abs(mean_watts)


def sampled_error_j(samples: Sequence[PowerSample]) -> float:
    """Error bound of a trapezoid integral over sampled power.

    ``error_j = dt * max_step + max_resolution * window``

    * edges: the workload starts and stops somewhere inside a sample interval
      ``dt`` (the mean interval), so the power step there is placed up to
      ``dt / 2`` off at each of the two edges; ``max_step`` is the largest
      change between consecutive samples, the worst step the trace shows:
      ``2 * (dt / 2) * max_step``;
    * resolution: every sample can be off by its ``resolution_w``; in the
      worst case all in the same direction, which integrates to
      ``max_resolution * window``.
    """
    window = samples[-1].t - samples[0].t
    dt = window / (len(samples) - 1)
    max_step = max(abs(b.watts - a.watts) for a, b in pairwise(samples))
    return dt * max_step + max(s.resolution_w for s in samples) * window


def trapezoid_j(samples: Sequence[PowerSample]) -> float:
    """The trapezoid integral of power over time: exact for a piecewise-linear trace."""
    return sum((b.t - a.t) * (a.watts + b.watts) / 2.0 for a, b in pairwise(samples))


def check_samples(samples: Sequence[PowerSample], source: str) -> None:
    """At least two samples in strictly increasing time, or a ``DataError`` naming ``source``."""
    if len(samples) < 2:
        raise DataError(
            f"{source}: {len(samples)} power sample(s) in the window; integration needs at least 2 "
            "(lengthen the window or sample faster)"
        )
    for i, (a, b) in enumerate(pairwise(samples), start=1):
        if not b.t > a.t:
            raise DataError(f"{source}: sample {i} at t={b.t} does not come after sample {i - 1} at t={a.t}")


def reading_from_samples(
    samples: Sequence[PowerSample],
    method: str,
    *,
    real_count: int | None = None,
    extra_error_j: float = 0.0,
) -> EnergyReading:
    """Integrate a power trace whose first and last samples are the window edges.

    ``real_count`` is the number of samples the sensor produced when the edge
    points were interpolated or held (tegrastats, USB meter); the sampling rate
    is then ``real_count / window`` instead of ``(len - 1) / window``.
    """
    check_samples(samples, method)
    joules = trapezoid_j(samples)
    window = samples[-1].t - samples[0].t
    count = len(samples) if real_count is None else real_count
    hz = (count - 1) / window if real_count is None else count / window
    error = sampled_error_j(samples) + extra_error_j
    return EnergyReading(joules, window, joules / window, count, hz, method, error, True)


def combine_readings(readings: Sequence[EnergyReading]) -> EnergyReading:
    """One reading for consecutive windows of the same sensor: energies, windows and errors add.

    Refuses to mix kinds (measured with estimated) or methods: a sum of a
    RAPL reading and an INA3221 one, or of a measurement and an estimate, is a
    number nobody can interpret.
    """
    if not readings:
        raise DataError("combine_readings: no readings given; pass at least one EnergyReading")
    check_same_kind(readings)
    joules = sum(r.joules for r in readings)
    window = sum(r.window_s for r in readings)
    rates = [r.sampling_hz for r in readings]
    return EnergyReading(
        joules=joules,
        window_s=window,
        mean_watts=joules / window if window > 0 else None,
        sample_count=sum(r.sample_count for r in readings),
        sampling_hz=None if None in rates else min(rates),
        method=readings[0].method,
        error_j=sum(r.error_j for r in readings),
        measured=readings[0].measured,
    )


def check_same_kind(readings: Sequence[EnergyReading]) -> None:
    """Raise ``MixedReadingsError`` unless every reading has the same kind and method."""
    kinds = sorted({r.kind for r in readings})
    if len(kinds) > 1:
        raise MixedReadingsError(
            f"cannot combine {' and '.join(kinds)} energy readings: an estimate is not a measurement; "
            "report them side by side instead"
        )
    methods = sorted({r.method for r in readings})
    if len(methods) > 1:
        raise MixedReadingsError(
            f"cannot combine readings of different methods {methods}: each sensor covers a different "
            "part of the system; combine readings of one sensor only"
        )

