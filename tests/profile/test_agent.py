"""The device agent over real HTTP on 127.0.0.1: a real profile end to end, and every refusal.

After each refused request nothing was written outside the agent's work folder
(the folder around it is snapshotted before and after) and the work folder
holds no leftovers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from edge_compress.errors import ConfigError
from edge_compress.profile.agent import (AgentAuthError, AgentBusyError, AgentClient, AgentJobTimeoutError,
                                         AgentLimits, AgentPayloadTooLargeError, AgentRequestError, AgentServer,
                                         AgentUnreachableError, protocol)
from edge_compress.profile.agent.archive import pack_folder
from edge_compress.profile.agent.client import send

TOKEN = "test-token-" + "k" * 32
FAST = {"warmup": 1, "min_repeats": 3, "max_repeats": 5, "max_seconds": 2.0, "per_layer": False, "energy": "none"}
SLOW = {"warmup": 0, "min_repeats": 10**6, "max_repeats": 10**6, "max_seconds": 600.0, "per_layer": False,
        "energy": "none"}


@pytest.fixture(scope="module")
def artifact(ort_artifact):
    return ort_artifact


@pytest.fixture
def start_agent(tmp_path):
    """``start_agent(**limits)`` -> (server, client); the work folder is ``tmp_path / "work"``."""
    servers = []

    def start(**limits) -> tuple[AgentServer, AgentClient]:
        server = AgentServer(("127.0.0.1", 0), TOKEN.encode(), tmp_path / "work", AgentLimits(**limits))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server, AgentClient("127.0.0.1", server.server_address[1], TOKEN, timeout_s=60)

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def snapshot(root: Path, skip: Path) -> dict[str, str]:
    """Every path under ``root`` except ``skip``, with its content hash (or 'dir' / 'link')."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p == skip or skip in p.parents:
            continue
        kind = "link" if p.is_symlink() else "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(p.relative_to(root))] = kind
    return out


@pytest.fixture
def untouched(tmp_path):
    """Asserts, after the test, that nothing appeared outside tmp_path/work and that work/ is empty."""
    work = tmp_path / "work"
    before = snapshot(tmp_path, work)
    yield
    assert snapshot(tmp_path, work) == before
    assert not work.exists() or list(work.iterdir()) == []


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def job(archive: bytes, settings: dict | None = None, **header) -> bytes:
    head = {"settings": FAST if settings is None else settings} | header
    return json.dumps(head).encode() + b"\n" + archive


# --- the real thing ----------------------------------------------------------------------------

def test_profile_through_the_agent_returns_a_real_record(start_agent, artifact, untouched):
    server, client = start_agent()
    health = client.health()
    assert health["busy"] is False and health["protocol"] == protocol.PROTOCOL_VERSION
    assert "onnxruntime" in health["runtimes"]

    record = client.profile(artifact, FAST | {"per_layer": True}, device="pi5")

    lat = record["latency"]
    assert record["backend"] == "onnxruntime" and record["device"] == "pi5"
    assert lat["method"] == "measured" and 3 <= lat["repeats"] == len(lat["samples_ms"]) <= 5
    assert all(s > 0 for s in lat["samples_ms"]) and lat["p50"] > 0
    assert record["per_layer"]["method"] == "measured" and record["per_layer"]["layers"]
    assert record["settings"]["min_repeats"] == 3
    assert client.health()["busy"] is False


def test_agent_process_imports_no_torch(tmp_path, artifact):
    script = f"""
import sys, threading
from edge_compress.profile.agent import AgentClient, AgentServer
from edge_compress.profile.agent.oneshot import run_oneshot
server = AgentServer(("127.0.0.1", 0), {TOKEN.encode()!r}, {str(tmp_path / 'work')!r})
threading.Thread(target=server.serve_forever, daemon=True).start()
rec = AgentClient("127.0.0.1", server.server_address[1], {TOKEN!r}).profile({str(artifact)!r}, {FAST!r})
assert rec["latency"]["repeats"] >= 3
run_oneshot({str(artifact)!r}, {json.dumps(FAST)!r})  # what the job process runs, here in the server's process
print("torch" in sys.modules, "edge_compress.quant" in sys.modules, "edge_compress.train" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-3:] == ["False", "False", "False"]


def test_serve_command_binds_loopback_and_prints_where_it_listens(tmp_path):
    env = os.environ | {"EC_TEST_AGENT_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "edge_compress.profile.agent", "serve", "--port", "0",
           "--token-env", "EC_TEST_AGENT_TOKEN", "--work-dir", str(tmp_path / "work")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert AgentClient("127.0.0.1", port, TOKEN).health()["busy"] is False
        assert TOKEN not in " ".join(cmd)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_token_command_prints_a_fresh_32_byte_token(capsys):
    from edge_compress.cli.agent_cmd import main

    assert main(["token"]) == 0 and main(["token"]) == 0
    a, b = capsys.readouterr().out.split()
    assert a != b and len(a) >= 43


def test_agent_verb_plugs_into_the_main_parser():
    import argparse

    from edge_compress.cli.agent_cmd import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="verb"))
    a = parser.parse_args(["agent", "serve", "--token-file", "t", "--max-upload-mb", "8", "--job-timeout", "5"])
    assert (a.host, a.port, a.max_upload_mb, a.job_timeout) == ("127.0.0.1", 8765, 8, 5)
    with pytest.raises(SystemExit):  # a token is required, and only from a file or an env var
        parser.parse_args(["agent", "serve"])


# --- authentication ----------------------------------------------------------------------------

def _health_headers(token: str = TOKEN, now: float | None = None) -> dict[str, str]:
    return protocol.sign(token.encode(), "GET", "/v1/health", protocol.sha256_hex(b""), now=now)


@pytest.mark.parametrize("case, expect", [
    ("unsigned", "unsigned request"),
    ("wrong token", "bad signature"),
    ("altered signature", "bad signature"),
    ("signed for another path", "bad signature"),
    ("stale", "stale request"),
    ("from the future", "stale request"),
    ("malformed nonce", "malformed auth headers"),
])
def test_bad_auth_is_refused_401(start_agent, untouched, case, expect):
    server, _ = start_agent()
    now = time.time()
    headers = {
        "unsigned": {},
        "wrong token": _health_headers("another-token-" + "z" * 32),
        "altered signature": (h := _health_headers()) | {protocol.H_SIGNATURE: h[protocol.H_SIGNATURE][::-1]},
        "signed for another path": protocol.sign(TOKEN.encode(), "GET", "/v1/profile", protocol.sha256_hex(b"")),
        "stale": _health_headers(now=now - 120),
        "from the future": _health_headers(now=now + 120),
        "malformed nonce": _health_headers() | {protocol.H_NONCE: "not-hex"},
    }[case]
    with pytest.raises(AgentAuthError, match=expect) as e:
        send("127.0.0.1", server.server_address[1], "GET", "/v1/health", b"", headers)
    assert e.value.status == 401


def test_replayed_request_is_refused(start_agent, untouched):
    server, _ = start_agent()
    headers = _health_headers()
    assert send("127.0.0.1", server.server_address[1], "GET", "/v1/health", b"", headers)["busy"] is False
    with pytest.raises(AgentAuthError, match="replayed request") as e:
        send("127.0.0.1", server.server_address[1], "GET", "/v1/health", b"", headers)
    assert e.value.status == 401


def test_tampered_body_is_refused_and_nothing_is_kept(start_agent, artifact, untouched):
    server, _ = start_agent()
    body = job(pack_folder(artifact))
    headers = protocol.sign(TOKEN.encode(), "POST", "/v1/profile", protocol.sha256_hex(body))
    tampered = body[:-100] + bytes(b ^ 0xFF for b in body[-100:])
    with pytest.raises(AgentAuthError, match="tampered body") as e:
        send("127.0.0.1", server.server_address[1], "POST", "/v1/profile", tampered, headers, expect_continue=False)
    assert e.value.status == 401


def test_unsigned_upload_is_refused_before_its_body_is_read(start_agent, untouched):
    server, _ = start_agent()
    with pytest.raises(AgentAuthError, match="unsigned") as e:
        send("127.0.0.1", server.server_address[1], "POST", "/v1/profile", b"x" * 10_000, {})
    assert e.value.status == 401


def test_tokens_are_long_and_never_read_from_world_readable_files(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="at least 32"):
        AgentClient("127.0.0.1", 1, "short")
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        protocol.load_token(token_file=f)
    f.chmod(0o600)
    assert protocol.load_token(token_file=f) == TOKEN.encode()
    monkeypatch.delenv("EC_NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="EC_NO_SUCH_TOKEN"):
        protocol.load_token(token_env="EC_NO_SUCH_TOKEN")


# --- size limits -------------------------------------------------------------------------------

def test_oversized_upload_gets_413_before_the_client_sends_it(start_agent, artifact, untouched):
    server, client = start_agent(max_upload_bytes=64 * 1024)
    with pytest.raises(AgentPayloadTooLargeError, match="over this agent's limit of 65536 bytes") as e:
        client.profile(artifact, FAST)
    assert e.value.status == 413

    # headers alone, announcing 10 GiB: the agent answers at once and never waits for the body
    headers = protocol.sign(TOKEN.encode(), "POST", "/v1/profile", "0" * 64)
    lines = ["POST /v1/profile HTTP/1.1", "Host: x", f"Content-Length: {10 << 30}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(server.server_address, timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        chunks = []
        while chunk := s.recv(4096):   # the agent closes the connection after answering
            chunks.append(chunk)
        answer = b"".join(chunks).decode()
    assert answer.startswith("HTTP/1.1 413") and "over this agent's limit" in answer


@pytest.mark.parametrize("limits, members, expect", [
    ({"max_extract_bytes": 1000}, [member("manifest.json", b"\0" * 5000)], "extracts to more than 1000 bytes"),
    ({"max_members": 5}, [member(f"f{i}") for i in range(10)], "more than 5 members"),
])
def test_archive_over_the_extraction_caps_gets_413(start_agent, untouched, limits, members, expect):
    _, client = start_agent(**limits)
    with pytest.raises(AgentPayloadTooLargeError, match=expect) as e:
        client.request("POST", "/v1/profile", job(tar_of(*members)))
    assert e.value.status == 413


# --- unsafe archives ---------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../x", "../../../../escape.txt", "ABSOLUTE", "symlink /etc/passwd",
                                 "symlink ../../outside", "hardlink /etc/passwd", "hardlink inside",
                                 "char device", "fifo", "dir/../../x"])
def test_path_traversing_or_linking_archives_are_refused(start_agent, tmp_path, untouched, bad):
    _, client = start_agent()
    ok = member("manifest.json", b"{}")
    evil = {
        "../x": member("../x"),
        "../../../../escape.txt": member("../../../../escape.txt"),
        "ABSOLUTE": member(str(tmp_path / "abs-escape.txt")),
        "symlink /etc/passwd": member("passwd", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        "symlink ../../outside": member("out", kind=tarfile.SYMTYPE, link="../../outside"),
        "hardlink /etc/passwd": member("passwd", kind=tarfile.LNKTYPE, link="/etc/passwd"),
        "hardlink inside": member("copy.json", kind=tarfile.LNKTYPE, link="manifest.json"),
        "char device": member("null", kind=tarfile.CHRTYPE),
        "fifo": member("pipe", kind=tarfile.FIFOTYPE),
        "dir/../../x": member("dir/../../x"),
    }[bad]
    with pytest.raises(AgentRequestError, match="unsafe archive") as e:
        client.request("POST", "/v1/profile", job(tar_of(ok, evil)))
    assert e.value.status == 400 and evil[0].name in str(e.value)


def test_damaged_artifact_is_refused_422_by_its_manifest_hashes(start_agent, artifact, tmp_path, untouched):
    _, client = start_agent()
    files = sorted(p for p in artifact.iterdir())
    members = [member(p.name, p.read_bytes() + (b"tampered" if p.suffix == ".onnx" else b"")) for p in files]
    with pytest.raises(AgentRequestError, match="failed verification: .*sha256 of 'model.onnx'") as e:
        client.request("POST", "/v1/profile", job(tar_of(*members)))
    assert e.value.status == 422


@pytest.mark.parametrize("body, expect", [
    (job(b"", settings=FAST | {"repeatz": 3}), r"bad profile settings: .*unknown key\(s\) \['repeatz'\]"),
    (job(b"", owner="me"), "must be an object with 'settings'"),
    (b"no header line", "job header line"),
    (b'{"settings": {}}\nnot a gzip', "not a readable gzip tar"),
])
def test_malformed_jobs_are_refused_400(start_agent, untouched, body, expect):
    _, client = start_agent()
    with pytest.raises(AgentRequestError, match=expect) as e:
        client.request("POST", "/v1/profile", body)
    assert e.value.status == 400


def test_unknown_endpoint_404_and_wrong_method_405(start_agent):
    _, client = start_agent()
    with pytest.raises(AgentRequestError, match="no such endpoint") as e:
        client.request("GET", "/v1/nothing", b"")
    assert e.value.status == 404
    with pytest.raises(AgentRequestError, match="use POST") as e:
        client.request("GET", "/v1/profile", b"")
    assert e.value.status == 405


def test_unreachable_agent_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: nothing answers
    with pytest.raises(AgentUnreachableError, match=f"no agent at 127.0.0.1:{port}"):
        AgentClient("127.0.0.1", port, TOKEN, timeout_s=5).health()


# --- one job at a time, time limits ------------------------------------------------------------

def _wait_busy(client: AgentClient, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not client.health()["busy"]:
        assert time.monotonic() < deadline, "the first job never started"
        time.sleep(0.02)


def test_a_second_job_while_one_runs_gets_409_busy(start_agent, artifact, untouched):
    server, client = start_agent(job_timeout_s=3.0)
    first: list = []
    t = threading.Thread(target=lambda: first.append(pytest.raises(AgentJobTimeoutError, client.profile,
                                                                  artifact, SLOW)))
    t.start()
    _wait_busy(client)
    t0 = time.monotonic()
    with pytest.raises(AgentBusyError, match=r"busy: profiling job \w+ has been running for [\d.]+ s") as e:
        client.profile(artifact, FAST)
    assert e.value.status == 409 and time.monotonic() - t0 < 2.0  # answered at once, not queued
    t.join(30)
    assert first and first[0].value.status == 504
    assert client.health()["busy"] is False


def test_a_job_over_the_time_limit_is_killed_with_504(start_agent, artifact, untouched):
    server, client = start_agent(job_timeout_s=1.0)
    with pytest.raises(AgentJobTimeoutError, match="ran past this agent's time limit of 1 s and was killed") as e:
        client.profile(artifact, SLOW)
    assert e.value.status == 504
    pid = server.last_job_pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of its process group either
    assert client.health()["busy"] is False
