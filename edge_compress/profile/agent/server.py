"""The device agent: an HTTP service that profiles uploaded artifacts, one job at a time.

``GET /v1/health`` and ``POST /v1/profile`` (see ``protocol`` for the wire
format). A request is admitted in this order, each step answering before the
next one reads anything more: signature (401), Content-Length against the
upload cap (411/413), the one-job slot (409). A client that sends
``Expect: 100-continue`` (``AgentClient`` does) hears that answer before it
uploads a byte. The upload then streams into a fresh job folder under the work
dir while it is hashed (a body that does not match its signed hash: 401), is
extracted safely (``archive``), verified against its manifest's sha256s, and
profiled by ``python -m edge_compress.profile.agent oneshot`` in its own process
group under a time limit (504, killed, on expiry). The job folder is removed
whatever happens.

A second job while one runs gets 409 with the running job's age rather than a
place in a queue: the host decides whether to wait, and a queue of uploads on a
small board would hold disk and memory for work that may never be wanted.

Standard library only (plus the artifact reader and the profiler in the job's
process): no torch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import edge_compress
from edge_compress.errors import ConfigError, EdgeCompressError
from edge_compress.profile.agent import archive, protocol
from edge_compress.profile.agent.protocol import AgentError

JOB_PREFIX = "job-"
RUNTIMES = ("onnxruntime", "openvino", "ai_edge_litert", "tflite_runtime", "tensorrt", "numba", "numpy")


@dataclass(frozen=True)
class AgentLimits:
    """What one request may cost the device."""

    max_upload_bytes: int = 256 << 20
    max_extract_bytes: int = 1 << 30
    max_members: int = 10_000
    job_timeout_s: float = 600.0
    socket_timeout_s: float = 60.0   # a client that stalls mid-upload is dropped

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_extract_bytes", "max_members", "job_timeout_s", "socket_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"agent limit {name}={getattr(self, name)} must be positive")


class _Job:
    def __init__(self) -> None:
        self.id, self.started = uuid.uuid4().hex[:12], time.monotonic()

    @property
    def age_s(self) -> float:
        return time.monotonic() - self.started


class AgentServer(ThreadingHTTPServer):
    """``AgentServer((host, port), token, work_dir)``; ``serve_forever()`` runs it."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], token: bytes, work_dir: str | os.PathLike,
                 limits: AgentLimits = AgentLimits(), token_env: str | None = None) -> None:
        self.verifier = protocol.Verifier(token)
        self.limits, self.token_env = limits, token_env
        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _remove_stale_jobs(self.work_dir)
        self.lock = threading.Lock()        # guards verifier and job
        self.job: _Job | None = None
        self.last_job_pid: int | None = None  # for tests and logs: the last profiling process
        super().__init__(address, AgentHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def try_start_job(self) -> _Job:
        with self.lock:
            if self.job is not None:
                raise protocol.AgentBusyError(
                    f"busy: profiling job {self.job.id} has been running for {self.job.age_s:.1f} s; this agent "
                    "runs one job at a time and does not queue: retry when it is done", 409)
            self.job = _Job()
            return self.job

    def end_job(self, job: _Job) -> None:
        with self.lock:
            if self.job is job:
                self.job = None

    def health(self) -> dict:
        with self.lock:
            job = self.job
        return {"agent_version": edge_compress.__version__, "protocol": protocol.PROTOCOL_VERSION,
                "python": sys.version.split()[0], "platform": sys.platform, "runtimes": available_runtimes(),
                "busy": job is not None, "job_age_s": None if job is None else round(job.age_s, 3),
                "limits": {"max_upload_bytes": self.limits.max_upload_bytes,
                           "job_timeout_s": self.limits.job_timeout_s}}


def available_runtimes() -> dict[str, str]:
    """Installed runtimes and their versions, read from package metadata without importing them."""
    import importlib.metadata
    import importlib.util

    dists = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}
    out = {}
    for mod in RUNTIMES:
        if importlib.util.find_spec(mod) is None:
            continue
        try:
            out[mod] = importlib.metadata.version(dists.get(mod, mod))
        except importlib.metadata.PackageNotFoundError:
            out[mod] = "unknown"
    return out


def _remove_stale_jobs(work_dir: Path) -> None:
    """Job folders a killed agent left behind (only ours: named ``job-*``)."""
    for p in work_dir.glob(JOB_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True)


class AgentHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # needed for Expect: 100-continue
    server: AgentServer

    def setup(self) -> None:
        self.timeout = self.server.limits.socket_timeout_s
        super().setup()

    def parse_request(self) -> bool:
        self._job: _Job | None = None
        self._signed_sha256: str | None = None
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        """Admit (or refuse) a profile upload from its headers, before the client sends the body."""
        if self.command == "POST":
            try:
                self._check_route()
                self._admit()
            except AgentError as e:
                self._send_error(e)
                return False
        try:
            return super().handle_expect_100()
        except BaseException:  # the client went away: free the slot do_POST will never free
            self._end_job()
            raise

    def do_GET(self) -> None:
        self._serve()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _serve(self) -> None:
        try:
            try:
                self._check_route()
                if self.command == "GET":
                    self._send_json(200, self._health())
                    return
                if self._job is None:  # no Expect: 100-continue, so not admitted yet
                    self._admit()
                self._send_json(200, self._profile())
            finally:
                self._end_job()
        except AgentError as e:
            self._send_error(e)
        except (ConnectionError, TimeoutError) as e:  # the client vanished or stalled mid-upload: no one to answer
            self.log_error("dropped %s %s: %r", self.command, self.path, e)
            self.close_connection = True
        except Exception as e:  # a bug, not a refusal: say so without a traceback on the wire
            self.log_error("internal error: %r", e)
            self._send_error(AgentError(f"internal agent error: {type(e).__name__}: {e}", 500))

    def _end_job(self) -> None:
        if self._job is not None:
            self.server.end_job(self._job)
            self._job = None

    def _check_route(self) -> None:
        method = {"/v1/health": "GET", "/v1/profile": "POST"}.get(self.path)
        if method is None:
            raise protocol.AgentRequestError(f"no such endpoint {self.path!r}; the agent serves GET /v1/health "
                                             "and POST /v1/profile", 404)
        if method != self.command:
            raise protocol.AgentRequestError(f"{self.command} is not allowed on {self.path}; use {method}", 405)

    def _admit(self) -> None:
        """Signature, then size, then the job slot; nothing of the body has been read yet."""
        self._signed_sha256 = self._verify()
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None or not length.isdigit():
            raise protocol.AgentRequestError("a profile upload needs a Content-Length (no chunked encoding)", 411)
        if int(length) > self.server.limits.max_upload_bytes:
            raise protocol.AgentPayloadTooLargeError(
                f"upload of {int(length)} bytes is over this agent's limit of {self.server.limits.max_upload_bytes} "
                "bytes; restart the agent with a larger --max-upload-mb if the artifact is genuine", 413)
        self._job = self.server.try_start_job()

    def _verify(self) -> str:
        with self.server.lock:
            return self.server.verifier.verify(self.command, self.path, self.headers)

    def _health(self) -> dict:
        digest = self._verify()
        if digest != protocol.sha256_hex(b"") or self.headers.get("Content-Length", "0") != "0":
            raise protocol.AgentAuthError("a health request has an empty body; this one's hash does not match", 401)
        return self.server.health()

    def _profile(self) -> dict:
        job_dir = Path(tempfile.mkdtemp(prefix=f"{JOB_PREFIX}{self._job.id}-", dir=self.server.work_dir))
        try:
            upload, art = job_dir / "upload.tar.gz", job_dir / "artifact"
            settings, device = _parse_job_header(self._receive(upload))
            art.mkdir()
            lim = self.server.limits
            archive.extract_archive(upload, art, archive.ExtractLimits(lim.max_extract_bytes, lim.max_members))
            upload.unlink()
            _verify_artifact(art)
            return self._run_job(art, settings, device, job_dir)
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)

    def _receive(self, upload: Path) -> bytes:
        """Stream the body into ``upload`` (the archive) while hashing it; return the job header line."""
        left, h, head = int(self.headers["Content-Length"]), hashlib.sha256(), bytearray()
        header = None
        with open(upload, "wb") as f:
            while left:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    raise protocol.AgentRequestError(f"the body ended {left} bytes short of its Content-Length", 400)
                left -= len(chunk)
                h.update(chunk)
                if header is None:
                    head += chunk
                    header, chunk = _split_header(head)
                f.write(chunk)
        if not hmac.compare_digest(h.hexdigest(), self._signed_sha256):  # authentication before any other verdict
            raise protocol.AgentAuthError(f"tampered body: its sha256 does not match the signed {protocol.H_CONTENT}",
                                          401)
        if not header:
            raise protocol.AgentRequestError(f"the body does not start with a job header line (JSON of at most "
                                             f"{protocol.MAX_JOB_HEADER} bytes, then a newline)", 400)
        return header

    def _run_job(self, art: Path, settings: dict, device: str | None, job_dir: Path) -> dict:
        cmd = [sys.executable, "-m", "edge_compress.profile.agent", "oneshot", str(art),
               "--settings", json.dumps(settings)] + (["--device", device] if device else [])
        env = {k: v for k, v in os.environ.items() if k != self.server.token_env}
        proc = subprocess.Popen(cmd, cwd=job_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.server.last_job_pid = proc.pid
        limit = self.server.limits.job_timeout_s
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise protocol.AgentJobTimeoutError(
                f"profiling job {self._job.id} ran past this agent's time limit of {limit:g} s and was killed; "
                "lower max_seconds/max_repeats in the settings or restart the agent with a longer --job-timeout",
                504) from None
        except BaseException:  # the agent is stopping: take the job down with it
            _kill_group(proc)
            raise
        return _job_result(proc.returncode, out, err)

    def _send_json(self, status: int, obj: dict) -> None:
        body = (json.dumps(obj) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")  # one request per connection: an early refusal leaves a body unread
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _send_error(self, e: AgentError) -> None:
        self.log_message("refused %s %s: %d %s", self.command, self.path, e.status or 500, e)
        self._send_json(e.status or 500, {"error": str(e)})


def _split_header(head: bytearray) -> tuple[bytes | None, bytes]:
    """(header line, archive bytes after it) once ``head`` holds a newline; (None, b"") while it may still come;
    (b"", b"") once the header is too long to be one (the body is still read, so its hash can be checked)."""
    nl = head.find(b"\n", 0, protocol.MAX_JOB_HEADER + 1)
    if nl >= 0:
        return bytes(head[:nl]), bytes(head[nl + 1:])
    return (b"", b"") if len(head) > protocol.MAX_JOB_HEADER else (None, b"")


def _parse_job_header(line: bytes) -> tuple[dict, str | None]:
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise protocol.AgentRequestError(f"the job header is not valid JSON ({e})", 400) from e
    if not isinstance(header, dict) or "settings" not in header or set(header) - {"settings", "device"}:
        found = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise protocol.AgentRequestError(f"the job header must be an object with 'settings' (and optionally "
                                         f"'device'); found {found}", 400)
    device = header.get("device")
    if device is not None and not isinstance(device, str):
        raise protocol.AgentRequestError(f"job header 'device' is {device!r}; expected a device name", 400)
    from edge_compress.profile.profiler import ProfileSettings

    try:
        return ProfileSettings.from_dict(header["settings"]).to_dict(), device
    except (EdgeCompressError, TypeError, ValueError) as e:
        raise protocol.AgentRequestError(f"bad profile settings: {e}", 400) from e


def _verify_artifact(art: Path) -> None:
    from edge_compress.artifact import load_artifact

    try:
        load_artifact(art)
    except EdgeCompressError as e:  # the message names the agent's job folder: say "the upload" instead
        message = str(e).replace(f"'{art}'", "the upload").replace(str(art), "<upload>")
        raise protocol.AgentRequestError(f"the uploaded artifact failed verification: {message}", 422) from e


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the job's whole process group, then reap it. Called only before the leader is reaped, so
    the group id cannot have been reused by an unrelated process."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _job_result(returncode: int, out: bytes, err: bytes) -> dict:
    tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {returncode}"]
    if returncode == 2:  # an EdgeCompressError: the profiler's own message (no backend, bad device, ...)
        raise protocol.AgentRequestError(f"profiling failed: {tail[0]}", 422)
    if returncode != 0:
        raise AgentError(f"the profiling process crashed (exit status {returncode}): {tail[0]}", 500)
    try:
        return json.loads(out)
    except json.JSONDecodeError as e:
        raise AgentError(f"the profiling process printed no JSON record ({e})", 500) from e
