"""Idle power subtraction: what the workload cost on top of a device that was on anyway.

A board draws power doing nothing (regulators, DRAM refresh, the OS). The
energy *of the inference* is the gross energy of the window minus the idle
power times the window. The idle window is measured with the same sensor,
just before the workload, so both share the sensor's offset and gain errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from edge_compress.errors import ConfigError
from edge_compress.profile.energy.reading import EnergyReading, Sensor, check_same_kind


@dataclass(frozen=True)
class IdleCorrected:
    """Gross and idle readings and what follows from them.

    ``net_j = gross.joules - idle_watts * gross.window_s``; its error adds the
    gross error and the idle error scaled from the idle window to the workload
    window (``idle.error_j * gross.window_s / idle.window_s``). ``net_j`` can
    come out negative when the workload is below the idle noise: it is
    reported as measured, not clipped.
    """

    gross: EnergyReading
    idle: EnergyReading
    inferences: int
    idle_watts: float
    net_j: float
    net_error_j: float
    mj_per_inference: float
    gross_mj_per_inference: float
    mj_per_inference_error: float


def subtract_idle(gross: EnergyReading, idle: EnergyReading, inferences: int) -> IdleCorrected:
    """Net energy of ``inferences`` inferences from a gross and an idle reading of the same sensor."""
    check_same_kind([gross, idle])
    if inferences < 1:
        raise ConfigError(f"inferences={inferences}: expected at least 1 inference in the workload window")
    if not idle.window_s > 0 or idle.mean_watts is None:
        raise ConfigError(f"idle reading has window {idle.window_s} s; expected a positive idle window")
    net = gross.joules - idle.mean_watts * gross.window_s
    error = gross.error_j + idle.error_j * gross.window_s / idle.window_s
    return IdleCorrected(
        gross=gross,
        idle=idle,
        inferences=inferences,
        idle_watts=idle.mean_watts,
        net_j=net,
        net_error_j=error,
        mj_per_inference=net * 1e3 / inferences,
        gross_mj_per_inference=gross.joules * 1e3 / inferences,
        mj_per_inference_error=error * 1e3 / inferences,
    )


def measure_with_idle(
    sensor: Sensor,
    run_fn: Callable[[], object],
    idle_s: float,
    *,
    inferences: int,
    sleep: Callable[[float], None] = time.sleep,
) -> IdleCorrected:
    """Measure ``idle_s`` seconds of idle, then ``run_fn()`` (which runs ``inferences`` inferences).

    Warm the model up before calling this: a first inference that loads
    weights or compiles kernels is not the steady state being measured.
    """
    if not idle_s > 0:
        raise ConfigError(f"idle_s={idle_s}: expected a positive idle window in seconds (a few seconds is typical)")
    idle = _window(sensor, lambda: sleep(idle_s))
    gross = _window(sensor, run_fn)
    return subtract_idle(gross, idle, inferences)


def _window(sensor: Sensor, fn: Callable[[], object]) -> EnergyReading:
    sensor.start()
    try:
        fn()
    except BaseException:
        sensor.stop()  # close the window so a sampler thread does not outlive the error
        raise
    return sensor.stop()
