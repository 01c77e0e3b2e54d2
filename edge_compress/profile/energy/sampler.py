"""A background thread that samples instantaneous power and integrates it (trapezoid rule).

Power monitors (INA3221, INA219/INA226, a phone's fuel gauge) report power,
not energy, so the energy of a window is the integral of a sampled trace. The
first sample is taken in ``start()`` and the last in ``stop()``, both on the
caller's thread, so the trace covers exactly the window; the thread fills in
between every ``interval_s``. The raw samples are kept (``samples``):
measurements are data (STYLE.md).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from edge_compress.errors import ConfigError, DataError, EdgeCompressError
from edge_compress.profile.energy.reading import EnergyReading, PowerSample, reading_from_samples


class SampledSensor:
    """Base of the sampled sensors: a subclass implements ``read_power() -> (watts, resolution_w)``.

    ``clock`` gives the sample times (``time.monotonic`` by default); each
    sample is stamped at the midpoint of its read, because a sysfs or ADB read
    takes long enough (tens of microseconds to tens of milliseconds) to matter
    at the edges. ``min_resolution_w`` raises the per-sample resolution to a
    chip's LSB where that is coarser than the unit the interface reports in.
    """

    name = "sampled"
    kind = "measured"
    method: str  # each subclass names its method (reading.METHODS)

    def __init__(
        self,
        interval_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_resolution_w: float = 0.0,
    ) -> None:
        if not interval_s > 0:
            raise ConfigError(f"{self.name}: interval_s={interval_s}; expected a positive sampling interval in seconds")
        self.interval_s = interval_s
        self.min_resolution_w = min_resolution_w
        self._clock = clock
        self._samples: list[PowerSample] = []
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        self._error: BaseException | None = None

    def read_power(self) -> tuple[float, float]:
        """One instantaneous reading: watts and that reading's resolution in watts."""
        raise NotImplementedError

    @property
    def samples(self) -> tuple[PowerSample, ...]:
        """The raw trace of the last window."""
        return tuple(self._samples)

    def sample(self) -> PowerSample:
        """Read once, stamped at the midpoint of the read."""
        t0 = self._clock()
        watts, resolution = self.read_power()
        t1 = self._clock()
        return PowerSample((t0 + t1) / 2.0, watts, max(resolution, self.min_resolution_w))

    def start(self) -> None:
        if self._thread is not None:
            raise EdgeCompressError(f"{self.name}: start() called twice; call stop() to close the open window first")
        self._samples = [self.sample()]
        self._halt.clear()
        self._error = None
        self._thread = threading.Thread(target=self._loop, name=f"{self.name}-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> EnergyReading:
        if self._thread is None:
            raise EdgeCompressError(f"{self.name}: stop() without start(); call start() before the workload")
        self._halt.set()
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise DataError(f"{self.name}: reading the sensor failed during the window: {self._error}") from self._error
        self._samples.append(self.sample())
        return reading_from_samples(self._samples, self.method)

    def _loop(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                self._samples.append(self.sample())
            except Exception as err:  # noqa: BLE001 - re-raised on the caller's thread in stop()
                self._error = err
                return
