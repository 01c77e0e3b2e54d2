"""Profile an artifact on the device a devices.yaml entry names, over its connection.

``profile_on_device(device, artifact, settings)`` picks the transport by
``device.connection``:

* ``local``: ``profile_artifact`` in this process;
* ``agent``: ``AgentClient`` to the device's ``edge-compress agent serve``, the
  token read from the environment variable ``device.token_env`` names;
* ``ssh``: ``scp`` the folder into a fresh job folder under ``remote_dir``, run
  ``python3 -m edge_compress.profile.agent oneshot`` there over ``ssh``
  (``BatchMode``: never a password prompt), read the record from its stdout,
  remove the job folder;
* ``adb``: the same with ``adb push`` and ``adb shell``.

On the device the one-shot runs under ``timeout -s KILL`` (coreutils / toybox),
so a stuck job dies there, not only the host's connection to it. Every record
gets the device's name and registry entry (``attach_device``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import uuid
import warnings
from pathlib import Path

from edge_compress.errors import ConfigError, EdgeCompressError
from edge_compress.profile.devices import DeviceConfig
from edge_compress.profile.profiler import ProfileSettings, attach_device

_SAFE_DIR = re.compile(r"^[A-Za-z0-9_./+-]+$")
HOST_SIDE_SENSORS = ("android", "usb_meter")  # read by this machine (adb, the meter's CSV), not by the device
DEFAULT_REMOTE_DIRS = {"ssh": "/tmp", "adb": "/data/local/tmp"}
INSTALL_HINTS = {"ssh": "the OpenSSH client (apt install openssh-client)",
                 "scp": "the OpenSSH client (apt install openssh-client)",
                 "adb": "Android platform-tools (apt install adb, or platform-tools from the Android SDK)"}


class RemoteError(EdgeCompressError, RuntimeError):
    """Copying to, running on or cleaning up a device failed; the message has the device's own words."""


class TransportUnavailableError(EdgeCompressError, RuntimeError):
    """The program a connection needs (ssh, scp, adb) is not installed here."""


def profile_on_device(device: DeviceConfig, artifact: str | Path, settings: ProfileSettings,
                      timeout_s: float | None = None) -> dict:
    """Profile ``artifact`` on ``device`` and return its record (with the device attached).

    ``timeout_s`` bounds the job on the device (default: three times
    ``settings.max_seconds`` plus five minutes for loading and per-layer runs).
    """
    from edge_compress.artifact import load_artifact

    artifact = Path(artifact)
    load_artifact(artifact)  # a damaged artifact fails here, with a local path, before anything is sent
    if device.connection != "local" and settings.energy in HOST_SIDE_SENSORS:
        raise ConfigError(f"device '{device.name}': energy '{settings.energy}' is read on the host while the model "
                          f"runs on the device, which the {device.connection} transport does not do yet; profile "
                          "with --energy estimate (labelled an estimate) or --energy none")
    limit = timeout_s if timeout_s is not None else settings.max_seconds * 3 + 300
    transports = {"local": _local, "agent": _agent, "ssh": _ssh, "adb": _adb}
    return attach_device(transports[device.connection](device, artifact, settings, limit), device)


def _local(device: DeviceConfig, artifact: Path, settings: ProfileSettings, timeout_s: float) -> dict:
    from edge_compress.profile.profiler import profile_artifact, sensor_for_device

    return profile_artifact(artifact, settings, device=device.name, sensor=sensor_for_device(device, settings.energy))


def _agent(device: DeviceConfig, artifact: Path, settings: ProfileSettings, timeout_s: float) -> dict:
    from edge_compress.profile.agent.client import AgentClient

    token = os.environ.get(device.token_env or "", "").strip()
    if not token:
        raise ConfigError(f"device '{device.name}': environment variable {device.token_env} (its token_env) is "
                          f"not set; export {device.token_env}=<the agent's token> (the one in the file its "
                          "`edge-compress agent serve --token-file` reads)")
    client = AgentClient(device.host, device.effective_port, token, timeout_s=timeout_s + 60)
    return client.profile(artifact, settings, device=device.name)


def _ssh(device: DeviceConfig, artifact: Path, settings: ProfileSettings, timeout_s: float) -> dict:
    ssh, scp = _need("ssh"), _need("scp")
    _no_option(device, "host", device.host)
    _no_option(device, "user", device.user)
    target = f"{device.user}@{device.host}" if device.user else device.host
    opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
    if device.key_file:
        opts += ["-i", device.key_file, "-o", "IdentitiesOnly=yes"]
    port = str(device.effective_port)
    shell = [ssh, *opts, "-p", port, target]
    job = _job_dir(device)
    host = f"[{device.host}]" if ":" in device.host else device.host  # an IPv6 address needs brackets in scp
    dest = f"{device.user + '@' if device.user else ''}{host}:{job}/artifact"
    return _run_job(device, shell, [scp, *opts, "-P", port, "-r", "-q", str(artifact), dest], job, settings,
                    timeout_s)


def _adb(device: DeviceConfig, artifact: Path, settings: ProfileSettings, timeout_s: float) -> dict:
    adb = _need("adb")
    _no_option(device, "serial", device.serial)
    base = [adb, "-s", device.serial]
    job = _job_dir(device)
    return _run_job(device, [*base, "shell"], [*base, "push", str(artifact), f"{job}/artifact"], job, settings,
                    timeout_s)


def _run_job(device: DeviceConfig, shell: list[str], copy: list[str], job: str, settings: ProfileSettings,
             timeout_s: float) -> dict:
    """mkdir the job folder, copy the artifact in, run the one-shot, always remove the folder."""
    _call(device, [*shell, f"mkdir -p {shlex.quote(job)}"], "create the job folder")
    try:
        _call(device, copy, "copy the artifact")
        limit = str(max(1, math.ceil(timeout_s)))
        cmd = " ".join(shlex.quote(a) for a in (
            "timeout", "-s", "KILL", limit, device.python, "-m", "edge_compress.profile.agent", "oneshot",
            f"{job}/artifact", "--settings", json.dumps(settings.to_dict()), "--device", device.name))
        out = _call(device, [*shell, cmd], "profile", timeout_s=timeout_s + 60)
    finally:
        _call(device, [*shell, f"rm -rf {shlex.quote(job)}"], "remove the job folder", warn=True)
    return _record(device, out)


def _call(device: DeviceConfig, argv: list[str], step: str, timeout_s: float = 300, warn: bool = False) -> str:
    """Run one ssh/scp/adb command; a failure raises (or, with ``warn``, only warns: cleanup must not mask)."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        failure = None if p.returncode == 0 else _why(device, p.returncode, p.stderr)
    except subprocess.TimeoutExpired:
        p, failure = None, f"{Path(argv[0]).name} did not finish within {timeout_s:.0f} s and was stopped"
    if failure is None:
        return p.stdout
    message = f"device '{device.name}' ({device.connection}): could not {step}: {failure}"
    if not warn:
        raise RemoteError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return ""


def _why(device: DeviceConfig, rc: int, stderr: str) -> str:
    last = (stderr.strip().splitlines() or [f"exit status {rc}"])[-1]
    if rc == 137:
        return f"the job ran past its time limit on the device and was killed ({last})"
    if rc == 255 and device.connection == "ssh":
        return f"ssh could not connect or log in ({last}); check host, port, user and key_file"
    if rc == 127 or "No module named" in last:
        return (f"{last}; is edge-compress (the [agent] extra) installed for '{device.python}' on the device? "
                "set the device's 'python' field to that interpreter")
    return last


def _record(device: DeviceConfig, stdout: str) -> dict:
    try:
        record = json.loads(stdout)
    except json.JSONDecodeError as e:
        head = stdout.strip()[:200] or "nothing"
        raise RemoteError(f"device '{device.name}': the one-shot printed no JSON record ({e}); its stdout began "
                          f"with: {head}") from e
    if not isinstance(record, dict):
        raise RemoteError(f"device '{device.name}': the one-shot printed {type(record).__name__}, not a record")
    return record


def _job_dir(device: DeviceConfig) -> str:
    root = (device.remote_dir or DEFAULT_REMOTE_DIRS[device.connection]).rstrip("/") or "/"
    if not _SAFE_DIR.match(root) or root.startswith("-"):
        raise ConfigError(f"device '{device.name}': field 'remote_dir' is {device.remote_dir!r}; use a plain path "
                          "(letters, digits, '_', '.', '/', '+', '-'; no '~', spaces or quotes)")
    return f"{root.rstrip('/')}/edge-compress-job-{uuid.uuid4().hex[:12]}"


def _no_option(device: DeviceConfig, field: str, value: str | None) -> None:
    if value is not None and (value.startswith("-") or any(c.isspace() for c in value)):
        raise ConfigError(f"device '{device.name}': field '{field}' is {value!r}; it may not start with '-' or "
                          "hold spaces (it would be read as an option)")


def _need(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise TransportUnavailableError(f"'{program}' is not on PATH; install {INSTALL_HINTS[program]}")
    return found


def check_reachable(device: DeviceConfig, timeout_s: float = 15.0) -> None:
    """Raise ``RemoteError`` (with the transport's own words) unless ``device`` answers now.

    ``local`` always does; an agent must answer its health check, an ssh host a
    ``true``, an adb serial ``get-state`` with ``device``. Long jobs (``fit``) call
    this first, so a board that is off fails in seconds, not after an hour of building.
    """
    if device.connection == "local":
        return
    if device.connection == "agent":
        _agent_health(device, timeout_s)
    elif device.connection == "ssh":
        target = f"{device.user}@{device.host}" if device.user else device.host
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout_s))}"]
        if device.key_file:
            opts += ["-i", device.key_file, "-o", "IdentitiesOnly=yes"]
        _call(device, [_need("ssh"), *opts, "-p", str(device.effective_port), target, "true"], "reach the host",
              timeout_s=timeout_s + 5)
    else:
        state = _call(device, [_need("adb"), "-s", device.serial, "get-state"], "reach the phone",
                      timeout_s=timeout_s).strip()
        if state != "device":
            raise RemoteError(f"device '{device.name}' (adb): state is '{state}', not 'device'; unlock it and "
                              "accept the USB debugging prompt")


def _agent_health(device: DeviceConfig, timeout_s: float) -> None:
    from edge_compress.profile.agent.client import AgentClient
    from edge_compress.profile.agent.protocol import AgentUnreachableError

    token = os.environ.get(device.token_env or "", "").strip()
    if not token:
        raise ConfigError(f"device '{device.name}': environment variable {device.token_env} (its token_env) is "
                          f"not set; export {device.token_env}=<the agent's token>")
    try:
        AgentClient(device.host, device.effective_port, token, timeout_s=timeout_s).health()
    except (OSError, AgentUnreachableError) as e:
        raise RemoteError(f"device '{device.name}' (agent at {device.host}:{device.effective_port}) does not "
                          f"answer: {type(e).__name__}: {e}; is `edge-compress agent serve` running there and "
                          "the address right in devices.yaml?") from e
