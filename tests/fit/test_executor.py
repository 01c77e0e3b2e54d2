"""Executors: the local process pool and Ray (a Ray instance started on this machine: Ray 2.60 has no
in-process local mode any more), including a whole fit whose builds, fine-tunes and device
measurements run as Ray tasks and on the device actor."""

import json
import operator

import pytest

from edge_compress.errors import ConfigError
from edge_compress.fit.executor import InlineExecutor, ProcessExecutor, RayExecutor, make_executor


def test_make_executor_choices():
    assert isinstance(make_executor("inline"), InlineExecutor)
    assert type(make_executor("process", workers=1)) is InlineExecutor     # one worker: no pool to pay for
    with pytest.raises(ConfigError, match="choose one of: process, inline, ray"):
        make_executor("dask")
    with pytest.raises(ConfigError, match="--workers 0"):
        make_executor("process", workers=0)


def test_process_pool_maps_in_order():
    ex = ProcessExecutor(2)
    try:
        assert ex.map(operator.neg, range(6)) == [0, -1, -2, -3, -4, -5]
        assert ex.measure_all(operator.neg, [3], local_device=True) == [-3]
    finally:
        ex.close()


@pytest.fixture(scope="module")
def ray_executor():
    pytest.importorskip("ray")
    ex = RayExecutor(None, 2)
    yield ex
    ex.close()


def test_ray_tasks_and_the_device_actor(ray_executor):
    assert ray_executor.map(operator.neg, [1, 2, 3]) == [-1, -2, -3]
    assert ray_executor.measure_all(operator.neg, [4, 5], local_device=True) == [-4, -5]


def test_fit_on_ray(ray_executor, tiny_checkpoint, tiny_synth, tmp_path, monkeypatch):
    import edge_compress.fit.run as run_mod
    from edge_compress.fit import FitConfig, fit

    monkeypatch.setattr(run_mod, "make_executor", lambda *a, **k: ray_executor)
    monkeypatch.setattr(ray_executor, "close", lambda: None)     # the fixture shuts Ray down
    devices = tmp_path / "devices.yaml"
    devices.write_text("devices:\n  local:\n    connection: local\n    backends: [onnxruntime]\n    threads: 1\n")
    cfg = FitConfig(budget_ms=1000.0, ratios=(0.0, 0.5), sensitivity_images=8, initial_samples=3,
                    max_measurements=8, search_rounds=1, batch=3, check_candidates=1, check_epochs=1,
                    finetune_epochs=1, calib_images=8, verify_rounds=1, profile_seconds=1.0,
                    measure_sessions=1)
    res = fit(tiny_checkpoint, tiny_synth, cfg, tmp_path / "out", backend="onnxruntime", devices_path=devices,
              store=tmp_path / "profiles", executor="ray")
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    assert len([m for m in state["measurements"] if "record" in m]) >= 6
    assert res.result["result"]["latency_ms"] <= 1000.0 and (res.artifact / "manifest.json").is_file()
