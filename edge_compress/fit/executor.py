"""Where ``fit`` runs its candidate builds, fine-tunes and device measurements.

* ``inline``: everything in this process, one after another;
* ``process`` (the default): builds and fine-tunes in a local process pool
  (``spawn``: torch and the runtimes do not survive ``fork``);
* ``ray``: builds and fine-tunes as Ray tasks on a cluster (``address``), or on a
  Ray instance started on this machine when no address is given.

Device measurements are never run two at a time on one device: two models
timed together on the same cores would each measure the other. ``measure_all``
therefore runs them one by one: in one measuring process for ``inline``/``process``,
and in one Ray actor per device (``max_concurrency=1``) for ``ray``, pinned to
this node when the device is ``local`` (this machine), wherever Ray likes otherwise.
Every local measurement runs in a fresh ``spawn`` process that loads only the
runtime, as a device's one-shot profile does: a process that has loaded many
models runs the next one slower (measured: an artifact timed at 2.36 ms in a
measuring process that had timed 40 candidates before it took 1.65-1.80 ms in a
fresh one; in the host process after training and exports, 10.8 against 7.2 ms).
On a local device the builds of a batch finish before its measurements start,
for the same reason.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable

from edge_compress.errors import BackendUnavailableError, ConfigError

EXECUTORS = ("process", "inline", "ray")


class InlineExecutor:
    name = "inline"

    def __init__(self) -> None:
        self._measurer: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        return [fn(i) for i in items]

    def measure_all(self, fn: Callable[[Any], Any], items: Iterable[Any], local_device: bool) -> list[Any]:
        """One at a time, in the measuring process (see the module docstring)."""
        if self._measurer is None:
            self._measurer = _spawn_pool(1, tasks_per_process=1)
        return [self._measurer.submit(fn, i).result() for i in items]

    def close(self) -> None:
        if self._measurer is not None:
            self._measurer.shutdown(wait=True, cancel_futures=True)
            self._measurer = None


class ProcessExecutor(InlineExecutor):
    name = "process"

    def __init__(self, workers: int):
        super().__init__()
        self.workers = workers

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """In a pool started for this batch and shut down before returning: idle workers that hold
        runtime sessions and thread pools were seen stealing time slices from the measurement that
        followed a batch (samples in steps of the 4 ms scheduler tick, a 3 ms model timed at 12 ms)."""
        items = list(items)
        if len(items) <= 1:
            return [fn(i) for i in items]
        pool = _spawn_pool(min(self.workers, len(items)))
        try:
            return list(pool.map(fn, items))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _spawn_pool(workers: int, tasks_per_process: int | None = None) -> ProcessPoolExecutor:
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               max_tasks_per_child=tasks_per_process)


class RayExecutor(InlineExecutor):
    name = "ray"

    def __init__(self, address: str | None, workers: int):
        try:
            import ray
        except ImportError as e:
            raise BackendUnavailableError(f"--executor ray needs Ray ({e}); install it with: "
                                          "pip install 'edge-compress[ray]'") from e
        super().__init__()
        self.ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            kwargs = {"address": address} if address else {"num_cpus": workers}
            ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
        self._actor = None

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        task = self.ray.remote(_apply)
        return self.ray.get([task.remote(fn, i) for i in items])

    def measure_all(self, fn: Callable[[Any], Any], items: Iterable[Any], local_device: bool) -> list[Any]:
        if self._actor is None:
            self._actor = self._device_actor(local_device)
        return self.ray.get([self._actor.run.remote(fn, i) for i in items])

    def _device_actor(self, local_device: bool):
        ray = self.ray
        options: dict[str, Any] = {"max_concurrency": 1}
        if local_device:   # the device is this machine: the measuring actor must live here
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=False)
        return ray.remote(_DeviceSlot).options(**options).remote()

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def _apply(fn: Callable[[Any], Any], item: Any) -> Any:
    """One job as a Ray task (Ray wraps Python functions only; this takes any callable)."""
    return fn(item)


class _DeviceSlot:
    """A Ray actor that runs one measurement at a time."""

    def run(self, fn: Callable[[Any], Any], item: Any) -> Any:
        return fn(item)


def make_executor(name: str, workers: int | None = None, address: str | None = None) -> InlineExecutor:
    if name not in EXECUTORS:
        raise ConfigError(f"--executor {name!r} is unknown; choose one of: {', '.join(EXECUTORS)}")
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be >= 1")
    if name == "inline" or (name == "process" and workers == 1):
        return InlineExecutor()
    if name == "process":
        return ProcessExecutor(workers)
    return RayExecutor(address, workers)
