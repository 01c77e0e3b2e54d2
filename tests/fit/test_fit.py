"""``fit`` end to end on a tiny detector with ONNX Runtime on this machine: result within budget on the
device, report, resumable state, no measurement lost when interrupted, and the early errors."""

import json
import re
from pathlib import Path

import pytest

from edge_compress.errors import ArtifactError, ConfigError
from edge_compress.fit import FitConfig, FitError, fit
from edge_compress.fit.state import STATE
from edge_compress.profile.remote import RemoteError
from edge_compress.profile.store import ProfileStore

SMALL = dict(ratios=(0.0, 0.5), sensitivity_images=8, initial_samples=3, max_measurements=10, search_rounds=2,
             batch=3, check_candidates=1, check_epochs=1, finetune_epochs=1, calib_images=8, verify_rounds=2,
             profile_seconds=1.0, measure_sessions=2)


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
    p = tmp_path_factory.mktemp("devices") / "devices.yaml"
    p.write_text("devices:\n  local:\n    connection: local\n    backends: [onnxruntime]\n    threads: 1\n"
                 "    energy_sensor: estimate\n"
                 "  board:\n    connection: agent\n    host: 127.0.0.1\n    port: 9\n    token_env: EC_TEST_TOKEN\n"
                 "    backends: [onnxruntime]\n")
    return p


@pytest.fixture(scope="module")
def fp32_bytes(tiny_checkpoint, tmp_path_factory):
    from edge_compress.export import export_checkpoint

    art = export_checkpoint(tiny_checkpoint, "onnxruntime", tmp_path_factory.mktemp("fp32") / "a")
    return art.manifest["metrics"]["model_bytes"]


def _fit(ckpt, data, out, devices, store, **kw):
    cfg = {**SMALL, **{k: v for k, v in kw.items() if k not in ("backend", "device", "log")}}
    lines = []
    res = fit(ckpt, data, FitConfig(**cfg), out, device=kw.get("device", "local"),
              backend=kw.get("backend", "onnxruntime"), devices_path=devices, store=store, executor="inline",
              log=kw.get("log", lines.append))
    return res, lines


@pytest.fixture(scope="module")
def finished(tiny_checkpoint, tiny_synth, devices, fp32_bytes, tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    budget = int(0.5 * fp32_bytes)
    res, lines = _fit(tiny_checkpoint, tiny_synth, root / "out", devices, root / "profiles",
                      budget_bytes=budget, budget_ms=1000.0)
    return res, lines, root, budget


def test_result_meets_the_budget_measured_on_the_device(finished):
    res, lines, root, budget = finished
    r = res.result["result"]
    assert r["size_bytes"] <= budget and r["latency_ms"] <= 1000.0
    assert (res.artifact / "manifest.json").is_file()
    manifest = json.loads((res.artifact / "manifest.json").read_text())
    assert manifest["metrics"]["model_bytes"] == r["size_bytes"]
    assert 0.0 <= r["ap"] <= 1.0 and r["ap"] == manifest["metrics"]["map"]["ap"]     # mAP through the runtime
    assert r["rounds"][-1]["passed"]


def test_every_measurement_is_in_the_profile_store(finished):
    res, _, root, _ = finished
    state = json.loads((res.out / STATE).read_text())
    ms = [m for m in state["measurements"] if "record" in m]
    assert len(ms) >= 6
    stored = {str(e.path) for e in ProfileStore(root / "profiles").list(device="local", backend="onnxruntime")
              if e.record.get("fit", {}).get("run") == state["run"]}
    assert {m["record"] for m in ms} <= stored
    assert state["checks"] and len(state["rounds"]) >= 1


def test_a_measurement_is_the_median_of_its_fresh_sessions(finished):
    res, _, _, _ = finished
    state = json.loads((res.out / STATE).read_text())
    for m in [m for m in state["measurements"] if "record" in m and not m.get("from_run")]:
        lat = json.loads(Path(m["record"]).read_text())["latency"]
        p50s = sorted(x["p50"] for x in lat["sessions"])
        assert len(p50s) == 2 and m["sessions_p50"] == [x["p50"] for x in lat["sessions"]]
        assert m["p50"] == lat["p50"] == p50s[1]             # the upper median of two: the record is that session
        assert lat["repeats"] == len(lat["samples_ms"])


def test_a_failed_session_fails_the_measurement(tmp_path):
    from edge_compress.fit.measure import MeasureJob, file_measurement

    job = MeasureJob("k", str(tmp_path / "a"), {}, {}, str(tmp_path / "store"), sessions=2)
    ok = {"key": "k", "record": {"latency": {"p50": 1.0}}}
    m = file_measurement(job, [ok, {"key": "k", "error": "RemoteError: the agent went away"}])
    assert m == {"key": "k", "error": "RemoteError: the agent went away"}
    assert not (tmp_path / "store").exists()                   # nothing filed


def test_sessions_are_interleaved_across_a_batch(tmp_path, monkeypatch):
    """Session 1 of every candidate, then session 2 of every one: a slow phase of the machine lands on
    one session of several candidates (the median drops it), not on every session of one."""
    import edge_compress.fit.measure as measure

    monkeypatch.setattr(measure, "file_measurement", lambda job, sessions: (job.key, [s["n"] for s in sessions]))
    jobs = [measure.MeasureJob(k, str(tmp_path / k), {}, {}, str(tmp_path / "store"), sessions=n)
            for k, n in (("a", 3), ("b", 3), ("c", 2))]
    ran = []

    def run_all(order):
        ran.extend(j.key for j in order)
        return [{"key": j.key, "n": i} for i, j in enumerate(order)]

    assert measure.interleaved(jobs, run_all) == [("a", [0, 3, 6]), ("b", [1, 4, 7]), ("c", [2, 5])]
    assert ran == ["a", "b", "c", "a", "b", "c", "a", "b"]
    assert measure.interleaved([], run_all) == []


def test_the_check_takes_the_least_pruned_uniform_candidate_in_budget(finished):
    """The short fine-tune check also scores the least pruned uniform int8 candidate within the budget, so
    the result is chosen against the baseline on real mAP, not only on the summed sensitivity estimate."""
    res, _, _, budget = finished
    state = json.loads((res.out / STATE).read_text())
    uniform = [m for m in state["measurements"] if m.get("candidate") and m.get("size_bytes") is not None
               and len(set(m["candidate"]["ratios"])) == 1 and all(m["candidate"]["int8"])
               and m["size_bytes"] <= budget]
    assert uniform
    assert min(uniform, key=lambda m: m["candidate"]["ratios"][0])["key"] in state["checks"]


def test_report_and_result_json(finished):
    res, _, _, _ = finished
    html = res.report.read_text()
    for needle in ('id="pareto"', 'id="latency-model"', 'id="layers"', 'id="summary"'):
        assert needle in html
    data = json.loads((res.out / "fit_result.json").read_text())
    lm = data["latency_model"]
    assert lm["n_fit"] + lm["n_heldout"] == len([c for c in data["candidates"]])
    # conv costs by layer, from the runtime's per-layer profiles of the unpruned model in fp32 and int8
    coef = lm["coefficients"]
    assert coef["features"][1:3] == ["profiled_ms[fp32]", "profiled_ms[int8]"]
    n_convs = len(data["layers"])
    assert coef["layer_costs"]["profiled"]["fp32"] == n_convs and coef["layer_costs"]["profiled"]["int8"] > 0
    # and each pruned conv's second point, from the uniformly pruned candidates' profiles (never held out)
    pruned = coef["layer_costs"]["pruned"]
    assert set(pruned) == {"fp32", "int8"} and len(pruned["fp32"]) > n_convs // 2
    full = coef["layer_costs"]["full_macs"]
    assert all(0 < macs < full[conv] and ms > 0 for pts in pruned.values() for conv, (macs, ms) in pts.items())
    state = json.loads((res.out / STATE).read_text())
    profiled = [m for m in state["measurements"] if len(set(m.get("candidate", {}).get("ratios", []))) == 1
                and m["candidate"]["ratios"][0] == 0.5 and len(set(m["candidate"]["int8"])) == 1]
    assert len({tuple(m["candidate"]["int8"]) for m in profiled}) == 2
    assert not {m["key"] for m in profiled} & {h["key"] for h in lm["heldout"]}
    assert len(data["layers"]) == len(res.result["layers"]) > 5
    assert {b["name"] for b in data["baselines"]} >= {"fp32", "int8 everywhere", "smallest (floor)"}


def test_a_finished_run_is_returned_not_redone(finished, tiny_checkpoint, tiny_synth, devices):
    res, _, root, budget = finished
    before = json.loads((res.out / STATE).read_text())
    again, lines = _fit(tiny_checkpoint, tiny_synth, res.out, devices, root / "profiles",
                        budget_bytes=budget, budget_ms=1000.0)
    assert any("finished already" in s for s in lines)
    assert json.loads((res.out / STATE).read_text())["measurements"] == before["measurements"]
    assert again.result["result"]["key"] == res.result["result"]["key"]


def test_interrupted_run_loses_no_measurement(tiny_checkpoint, tiny_synth, devices, fp32_bytes, tmp_path,
                                              monkeypatch):
    """Killed after the 5th measurement was filed in the store but before the state recorded it (with
    the rest of its batch, whose sessions are interleaved and filed together): the rerun recovers them
    from the store, in the order filed, and measures no candidate twice."""
    from edge_compress.fit import measure as measure_mod
    from edge_compress.fit.state import FitState

    real_file, filed = measure_mod.file_measurement, []

    def started_backwards(job, sessions):
        """Each record's median session started before the one filed before it's (interleaving can do
        that: CI once recovered a batch's measurements in that order)."""
        filed.append(job.key)
        for s in sessions:
            if "record" in s:
                s["record"]["created_utc"] = f"2000-01-01T{23 - len(filed) // 60:02d}:{59 - len(filed) % 60:02d}:00"
        return real_file(job, sessions)

    monkeypatch.setattr(measure_mod, "file_measurement", started_backwards)
    real, calls = FitState.add_measurement, []

    def dies_on_fifth(self, m):
        calls.append(m["key"])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, m)

    monkeypatch.setattr(FitState, "add_measurement", dies_on_fifth)
    kw = dict(budget_bytes=int(0.5 * fp32_bytes), budget_ms=1000.0)
    with pytest.raises(KeyboardInterrupt):
        _fit(tiny_checkpoint, tiny_synth, tmp_path / "out", devices, tmp_path / "profiles", **kw)
    state_path = tmp_path / "out" / STATE
    assert len(json.loads(state_path.read_text())["measurements"]) == 4
    monkeypatch.setattr(FitState, "add_measurement", real)
    res, lines = _fit(tiny_checkpoint, tiny_synth, tmp_path / "out", devices, tmp_path / "profiles", **kw)
    recovered = [int(re.search(r"(\d+) measurement\(s\) recovered", s).group(1)) for s in lines
                 if "recovered" in s]
    assert len(recovered) == 1 and recovered[0] >= 1
    final = json.loads(state_path.read_text())["measurements"]
    assert [m["key"] for m in final[:5]] == calls[:5]
    assert all(m.get("recovered") for m in final[4:4 + recovered[0]]) and not final[3].get("recovered")
    keys = [m["key"] for m in final]
    baseline_key = final[0]["key"]
    assert len([k for k in keys if k != baseline_key]) == len(set(k for k in keys if k != baseline_key))
    assert res.result["result"]["size_bytes"] <= kw["budget_bytes"]


def test_int8_everywhere_fit_searches_pruning_on_int8_models(tiny_checkpoint, tiny_synth, devices, fp32_bytes,
                                                             tmp_path):
    """``precision="int8"``: every candidate is int8 everywhere (no per-layer int8 sensitivity to take, no
    precision choice); the result is an int8 artifact within budget."""
    small = dict(initial_samples=2, max_measurements=6, search_rounds=1, batch=2, check_candidates=0,
                 measure_sessions=1)
    res, lines = _fit(tiny_checkpoint, tiny_synth, tmp_path / "out", devices, tmp_path / "profiles",
                      precision="int8", budget_bytes=int(0.3 * fp32_bytes), **small)
    assert any("every conv int8" in s for s in lines)
    state = json.loads((res.out / STATE).read_text())
    assert all(m["candidate"]["int8"] == [] for m in state["measurements"] if "candidate" in m)
    sens = json.loads((res.out / "sensitivity.json").read_text())
    assert sens["int8"] == {} and sens["prune"]
    manifest = json.loads((res.artifact / "manifest.json").read_text())
    assert "int8" in set(manifest["precision"].values())
    assert res.result["result"]["size_bytes"] <= int(0.3 * fp32_bytes)


def _typical_reference(run) -> float:
    """The reference's median over a fit's measurements of it so far (what its drift is measured against)."""
    import numpy as np

    return float(np.median([r["ms"] for r in run.state.data["references"]]))


def _is_verification(jobs) -> bool:
    """A result's verification (the round's artifact beside the reference), not a batch of candidates."""
    return Path(jobs[0].artifact).parent.name.startswith("round")


def _patch_verifications(monkeypatch, rewrite) -> list[int]:
    """``FitRun._on_device`` with each verification's [result, reference] measurements passed through
    ``rewrite(run, n, out)`` (n: 1 for the first verification); returns the numbers of those seen."""
    from edge_compress.fit import run as run_mod

    real, seen = run_mod.FitRun._on_device, []

    def on_device(self, jobs):
        out = real(self, jobs)
        if _is_verification(jobs):
            seen.append(len(seen) + 1)
            out = rewrite(self, seen[-1], out)
        return out

    monkeypatch.setattr(run_mod.FitRun, "_on_device", on_device)
    return seen


def test_a_miss_in_a_slow_phase_of_the_device_is_measured_again(tiny_checkpoint, tiny_synth, devices, tmp_path,
                                                                 monkeypatch):
    """The result is verified beside the reference (the uncompressed model, also measured at the start and
    beside every batch). Round 0: the result misses while the reference runs at its median: the miss counts
    at once and tightens the budget. Round 1: the result and the reference both run 2x slow (the device's
    slow phase): the pair is measured again, and the second try (the device back to speed) decides;
    nothing is tightened for it."""
    from edge_compress.fit import run as run_mod

    monkeypatch.setattr(run_mod, "DRIFT_PAUSE_S", 0.0)

    def rewrite(run, n, out):
        if n == 1:      # round 0: the result alone over the budget
            return [{**out[0], "p50": 2000.0}, {**out[1], "p50": _typical_reference(run)}]
        if n == 2:      # round 1, first try: everything 2x slow
            return [{**out[0], "p50": 2000.0}, {**out[1], "p50": 2 * _typical_reference(run)}]
        return [out[0], {**out[1], "p50": _typical_reference(run)}]      # the device back to speed

    verifications = _patch_verifications(monkeypatch, rewrite)
    small = dict(initial_samples=2, max_measurements=8, search_rounds=1, batch=2, check_candidates=0,
                 measure_sessions=1)
    res, lines = _fit(tiny_checkpoint, tiny_synth, tmp_path / "out", devices, tmp_path / "profiles",
                      budget_ms=1000.0, **small)
    rounds = json.loads((res.out / STATE).read_text())["rounds"]
    assert [r["passed"] for r in rounds] == [False, True] and len(verifications) == 3
    assert [t["drift"] for t in rounds[0]["reference"]] == [1.0]
    assert [t["drift"] for t in rounds[1]["reference"]] == [2.0, 1.0]
    assert rounds[1]["scale"]["latency_ms"] < 1.0          # tightened once, for round 0's miss only
    assert json.loads((res.out / STATE).read_text())["scale"] == rounds[1]["scale"]
    assert any("slow phase; measuring again" in s for s in lines)
    assert res.result["result"]["latency_ms"] <= 1000.0
    # the reference's re-measurements are in the store, tagged, and no later fit takes them for candidates
    stored = ProfileStore(tmp_path / "profiles").list(device="local", backend="onnxruntime")
    n_ref = sum(bool(e.record.get("fit", {}).get("reference")) for e in stored)
    assert n_ref == 3 + sum(1 for s in lines if s.startswith("  reference "))    # verifications + batches
    later = run_mod.FitRun(tiny_checkpoint, tiny_synth, FitConfig(**{**SMALL, **small, "budget_ms": 1000.0}),
                           tmp_path / "later", "local", "onnxruntime", devices, tmp_path / "profiles", lambda s: None)
    later._harvest_store()
    assert len(later.state.data["measurements"]) == len(stored) - n_ref


def test_a_batch_measured_in_a_slow_phase_counts_at_the_typical_speed(tiny_checkpoint, tiny_synth, devices,
                                                                       tmp_path, monkeypatch):
    """Every batch of candidates is measured beside the reference. The batch of initial samples runs while
    the device is 1.5x slow, the reference with it (1.5x its median so far): its latencies enter the latency
    model and the choice divided by 1.5, as measured in state.json and the store. The other batches'
    reference runs 2% slow, within the reference's own noise: their latencies count as measured."""
    from edge_compress.fit import run as run_mod

    real, batches = run_mod.FitRun._on_device, []

    def slow(m, f):
        return {**m, "p50": m["p50"] * f, "sessions_p50": [v * f for v in m["sessions_p50"]]}

    def on_device(self, jobs):
        out = real(self, jobs)
        if self.reference is None or _is_verification(jobs):
            return out                               # the probe, a verification
        assert jobs[-1].key == self.space.baseline().key() and jobs[-1].extra["reference"]
        batches.append([j.key for j in jobs[:-1]])
        f = 1.5 if len(jobs) >= 4 and not any(f == 1.5 for _, f in batches[:-1]) else 1.02
        batches[-1] = (batches[-1], f)
        return [slow(m, f) for m in out[:-1]] + [{**out[-1], "p50": f * _typical_reference(self)}]

    monkeypatch.setattr(run_mod.FitRun, "_on_device", on_device)
    res, lines = _fit(tiny_checkpoint, tiny_synth, tmp_path / "out", devices, tmp_path / "profiles",
                      budget_ms=1000.0, check_candidates=0, initial_samples=4, max_measurements=10)
    slow_keys = [keys for keys, f in batches if f == 1.5]
    assert len(slow_keys) == 1 and len(batches) >= 3
    state = json.loads((res.out / STATE).read_text())
    run = run_mod.FitRun(tiny_checkpoint, tiny_synth, FitConfig(**{**SMALL, "budget_ms": 1000.0, "check_candidates": 0,
                                                                    "initial_samples": 4, "max_measurements": 10}),
                         res.out, "local", "onnxruntime", devices, tmp_path / "profiles", lambda s: None)
    seen = 0
    for m in state["measurements"]:
        if m["key"] in slow_keys[0]:
            seen += 1
            assert m["drift"] == pytest.approx(1.5)
            assert run._value(m, "latency_ms") == pytest.approx(m["p50"] / 1.5)     # at the typical speed
        elif m.get("drift") is not None:
            assert m["drift"] == pytest.approx(1.02) and run._value(m, "latency_ms") == m["p50"]
    assert seen == len(slow_keys[0])
    assert sum("this batch's latencies count divided by that" in s for s in lines) == 1
    for h in res.result["latency_model"]["heldout"]:       # the error is reported both ways
        assert h["raw_ms"] == pytest.approx(h["measured_ms"] * h["speed"])
        assert min(abs(h["speed"] - 1.0), abs(h["speed"] - 1.5)) < 1e-9


def test_a_verification_round_after_a_miss_may_measure_a_batch_more(tiny_checkpoint, tiny_synth, devices,
                                                                    tmp_path, monkeypatch):
    """Round 0 spends every measurement (``max_measurements`` = the baselines and initial samples) and its
    result misses: the tightened budget may exclude every candidate measured so far, so round 1 measures
    up to one more batch before it chooses, and passes."""
    def rewrite(run, n, out):       # round 0: the result over the budget, the device at its speed
        return [{**out[0], "p50": 2000.0}, {**out[1], "p50": _typical_reference(run)}] if n == 1 else out

    _patch_verifications(monkeypatch, rewrite)
    small = dict(initial_samples=3, max_measurements=6, search_rounds=1, batch=2, check_candidates=0,
                 measure_sessions=1)
    res, lines = _fit(tiny_checkpoint, tiny_synth, tmp_path / "out", devices, tmp_path / "profiles",
                      budget_ms=1000.0, **small)
    rounds = json.loads((res.out / STATE).read_text())["rounds"]
    assert [r["passed"] for r in rounds] == [False, True]
    tightened = next(i for i, s in enumerate(lines) if s.startswith("tightened the search budget"))

    def searched(part):     # the search ran (and measured, or found every proposal measured already)
        return any(s.startswith("search round") or "the search has converged" in s for s in part)

    assert not searched(lines[:tightened]) and searched(lines[tightened:])      # no room in round 0; room in 1
    own = [m for m in json.loads((res.out / STATE).read_text())["measurements"] if not m.get("from_run")]
    assert 6 <= len(own) <= 6 + 2


def test_measurements_of_another_candidate_build_are_stale(finished, tiny_checkpoint, tiny_synth, devices, tmp_path):
    """Every fit measurement records how its candidate was built (``CANDIDATE_BUILD``): when that changes
    (the same key builds another graph), a later fit marks the stored measurements stale, saying why."""
    from edge_compress.fit import run as run_mod
    from edge_compress.fit.measure import CANDIDATE_BUILD

    res, _, root, budget = finished
    state = json.loads((res.out / STATE).read_text())
    assert {m["environment"]["candidate_build"] for m in state["measurements"] if "environment" in m} == \
        {CANDIDATE_BUILD}
    later = run_mod.FitRun(tiny_checkpoint, tiny_synth, FitConfig(**{**SMALL, "budget_ms": 1000.0,
                                                                      "budget_bytes": budget}),
                           tmp_path / "later", "local", "onnxruntime", devices, root / "profiles", lambda s: None)
    later._harvest_store()
    harvested = later.state.valid()
    assert harvested
    later._set_environment({**harvested[0]["environment"], "candidate_build": CANDIDATE_BUILD + 1})
    assert not later.state.valid()
    assert all(f"candidate_build {CANDIDATE_BUILD} -> {CANDIDATE_BUILD + 1}" in m["stale"]
               for m in later.state.data["measurements"])


def test_impossible_budget_names_the_floor(tiny_checkpoint, tiny_synth, devices, tmp_path):
    with pytest.raises(FitError, match=r"below the floor.*measures \d+") as e:
        _fit(tiny_checkpoint, tiny_synth, tmp_path / "out", devices, tmp_path / "p", budget_bytes=1000)
    assert "Raise the budget above" in str(e.value)


def test_backend_the_device_lacks_is_an_early_error(tiny_checkpoint, tiny_synth, devices, tmp_path):
    with pytest.raises(ConfigError, match=r"has backends \['onnxruntime'\]; 'openvino' is not among them"):
        _fit(tiny_checkpoint, tiny_synth, tmp_path / "out", devices, tmp_path / "p", budget_ms=5.0,
             backend="openvino")
    assert not (tmp_path / "out").exists()


def test_unreachable_device_is_an_early_error(tiny_checkpoint, tiny_synth, devices, tmp_path, monkeypatch):
    monkeypatch.setenv("EC_TEST_TOKEN", "t" * 40)
    with pytest.raises(RemoteError, match="does not answer"):
        _fit(tiny_checkpoint, tiny_synth, tmp_path / "out", devices, tmp_path / "p", budget_ms=5.0, device="board")
    assert not (tmp_path / "out").exists()


def test_out_is_never_overwritten_or_mixed(finished, tiny_checkpoint, tiny_synth, devices, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="not a fit run"):
        _fit(tiny_checkpoint, tiny_synth, tmp_path / "other", devices, tmp_path / "p", budget_ms=5.0)
    res, _, root, _ = finished
    with pytest.raises(ArtifactError, match="another setup"):
        _fit(tiny_checkpoint, tiny_synth, res.out, devices, root / "profiles", budget_ms=5.0,
             ratios=(0.0, 0.25))


def test_cli_exit_code_and_message(tiny_checkpoint, tiny_synth, devices, tmp_path, capsys):
    from edge_compress.cli.main import main

    rc = main(["fit", "--model", str(tiny_checkpoint), "--data", str(tiny_synth), "--backend", "openvino",
               "--devices", str(devices), "--budget-ms", "5", "--out", str(tmp_path / "o")])
    assert rc == 2 and "'openvino' is not among them" in capsys.readouterr().err
    rc = main(["fit", "--model", str(tiny_checkpoint), "--data", str(tiny_synth), "--backend", "onnxruntime",
               "--devices", str(devices), "--out", str(tmp_path / "o")])
    assert rc == 2 and "needs a budget" in capsys.readouterr().err
