"""profile_on_device over each connection: local, agent (real HTTP), and SSH / ADB through fake
``ssh``/``scp``/``adb`` programs first on PATH that log their argv and do the work locally, so the
exact commands and the whole round trip are checked without a device."""

from __future__ import annotations

import json
import shlex
import sys
import threading

import pytest

from edge_compress.errors import ConfigError
from edge_compress.profile.agent import AgentServer
from edge_compress.profile.devices import LOCAL, DeviceConfig
from edge_compress.profile.profiler import ProfileSettings
from edge_compress.profile.remote import RemoteError, TransportUnavailableError, profile_on_device

TOKEN = "remote-test-token-" + "q" * 32
SETTINGS = ProfileSettings(warmup=1, min_repeats=3, max_repeats=5, max_seconds=2.0, per_layer=False, energy="none")

_LOG = "import json, os, sys\nopen(os.environ['FAKE_LOG'], 'a').write(json.dumps([{name!r}, *sys.argv[1:]]) + '\\n')\n"
FAKES = {
    "ssh": """import subprocess
args, i = sys.argv[1:], 0
while args[i].startswith("-"):
    i += 2 if args[i] in ("-o", "-p", "-i", "-l", "-F") else 1
sys.exit(subprocess.run(["sh", "-c", " ".join(args[i + 1:])]).returncode)  # what sshd does with the rest
""",
    "scp": """import shutil
args, i = sys.argv[1:], 0
while args[i].startswith("-"):
    i += 2 if args[i] in ("-o", "-P", "-i", "-F") else 1
src, dst = args[i:]
shutil.copytree(src, dst.rsplit("]:", 1)[-1] if "]:" in dst else dst.split(":", 1)[1])
""",
    "adb": """import shutil, subprocess
args = sys.argv[3:] if sys.argv[1] == "-s" else sys.argv[1:]
if args[0] == "push":
    shutil.copytree(args[1], args[2])
    print(args[1] + ": 2 files pushed")
    sys.exit(0)
sys.exit(subprocess.run(["sh", "-c", " ".join(args[1:])]).returncode)  # adb shell joins its words
""",
}


@pytest.fixture(scope="module")
def artifact(ort_artifact):
    return ort_artifact


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """Puts fake ssh, scp and adb first on PATH; returns a function reading the argv each was given."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        f = bin_dir / name
        f.write_text(f"#!{sys.executable}\n" + _LOG.format(name=name) + body)
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_LOG", str(log))
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _check_record(record: dict, device: DeviceConfig) -> None:
    lat = record["latency"]
    assert record["device"] == device.name and record["device_config"] == device.to_dict()
    assert 3 <= lat["repeats"] == len(lat["samples_ms"]) <= 5 and all(s > 0 for s in lat["samples_ms"])


def test_ssh_copies_runs_the_oneshot_and_cleans_up(fakes, artifact, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    key = tmp_path / "id_ed25519"
    dev = DeviceConfig(name="jetson", connection="ssh", host="jetson.local", user="nvidia", port=2222,
                       key_file=str(key), remote_dir=str(remote), python=sys.executable, energy_sensor="none")

    record = profile_on_device(dev, artifact, SETTINGS, timeout_s=120)

    _check_record(record, dev)
    assert list(remote.iterdir()) == []  # the job folder is gone
    opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-i", str(key), "-o", "IdentitiesOnly=yes"]
    ssh = ["ssh", *opts, "-p", "2222", "nvidia@jetson.local"]
    mkdir, scp, run, rm = fakes()
    job = shlex.split(mkdir[-1])[-1]
    assert job.startswith(f"{remote}/edge-compress-job-")
    assert mkdir == [*ssh, f"mkdir -p {job}"]
    assert scp == ["scp", *opts, "-P", "2222", "-r", "-q", str(artifact), f"nvidia@jetson.local:{job}/artifact"]
    assert run[:-1] == ssh and shlex.split(run[-1]) == [
        "timeout", "-s", "KILL", "120", sys.executable, "-m", "edge_compress.profile.agent", "oneshot",
        f"{job}/artifact", "--settings", json.dumps(SETTINGS.to_dict()), "--device", "jetson"]
    assert rm == [*ssh, f"rm -rf {job}"]


def test_adb_pushes_runs_the_oneshot_and_cleans_up(fakes, artifact, tmp_path):
    remote = tmp_path / "sdcard"
    remote.mkdir()
    dev = DeviceConfig(name="pixel", connection="adb", serial="emulator-5554", remote_dir=str(remote),
                       python=sys.executable, energy_sensor="none")

    record = profile_on_device(dev, artifact, SETTINGS, timeout_s=120)

    _check_record(record, dev)
    assert list(remote.iterdir()) == []
    mkdir, push, run, rm = fakes()
    job = shlex.split(mkdir[-1])[-1]
    adb = ["adb", "-s", "emulator-5554"]
    assert mkdir == [*adb, "shell", f"mkdir -p {job}"]
    assert push == [*adb, "push", str(artifact), f"{job}/artifact"]
    assert run[:-1] == [*adb, "shell"] and shlex.split(run[-1])[4:9] == [
        sys.executable, "-m", "edge_compress.profile.agent", "oneshot", f"{job}/artifact"]
    assert rm == [*adb, "shell", f"rm -rf {job}"]


def test_a_failure_on_the_device_is_reported_in_its_words_and_still_cleaned_up(fakes, artifact, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    dev = DeviceConfig(name="pi", connection="ssh", host="pi.local", remote_dir=str(remote),
                       python="/nonexistent/python3", energy_sensor="none")
    with pytest.raises(RemoteError, match=r"device 'pi' \(ssh\): could not profile: .*No such file.*is edge-compress "
                                          r"\(the \[agent\] extra\) installed for '/nonexistent/python3'"):
        profile_on_device(dev, artifact, SETTINGS)
    assert list(remote.iterdir()) == [] and fakes()[-1][-1].startswith("rm -rf ")


def test_missing_ssh_or_adb_says_what_to_install(artifact, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with pytest.raises(TransportUnavailableError, match="'ssh' is not on PATH; install the OpenSSH client"):
        profile_on_device(DeviceConfig(name="j", connection="ssh", host="h"), artifact, SETTINGS)
    with pytest.raises(TransportUnavailableError, match="'adb' is not on PATH; install Android platform-tools"):
        profile_on_device(DeviceConfig(name="p", connection="adb", serial="s"), artifact, SETTINGS)


@pytest.mark.parametrize("field, value", [("host", "-oProxyCommand=touch /tmp/x"), ("remote_dir", "~/jobs"),
                                          ("remote_dir", "/tmp/a b")])
def test_values_that_would_become_options_or_shell_words_are_refused(fakes, artifact, field, value):
    dev = DeviceConfig(**{"name": "j", "connection": "ssh", "host": "h", field: value})
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        profile_on_device(dev, artifact, SETTINGS)
    assert fakes() == []  # refused before anything ran


def test_host_side_energy_sensors_are_refused_for_remote_devices(fakes, artifact):
    dev = DeviceConfig(name="pixel", connection="adb", serial="s", energy_sensor="android")
    with pytest.raises(ConfigError, match="energy 'android' is read on the host"):
        profile_on_device(dev, artifact, ProfileSettings(energy="android"))
    assert fakes() == []


def test_agent_connection_profiles_through_the_agent(artifact, tmp_path, monkeypatch):
    server = AgentServer(("127.0.0.1", 0), TOKEN.encode(), tmp_path / "work")
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        dev = DeviceConfig(name="pi5", connection="agent", host="127.0.0.1", port=server.server_address[1],
                           token_env="EC_TEST_PI5_TOKEN", energy_sensor="none")
        monkeypatch.delenv("EC_TEST_PI5_TOKEN", raising=False)
        with pytest.raises(ConfigError, match="environment variable EC_TEST_PI5_TOKEN .* is not set"):
            profile_on_device(dev, artifact, SETTINGS)
        monkeypatch.setenv("EC_TEST_PI5_TOKEN", TOKEN)
        _check_record(profile_on_device(dev, artifact, SETTINGS), dev)
    finally:
        server.shutdown()
        server.server_close()


def test_local_connection_profiles_in_this_process(artifact):
    record = profile_on_device(LOCAL, artifact, SETTINGS)
    _check_record(record, LOCAL)
