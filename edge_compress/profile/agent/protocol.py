"""The agent's wire protocol: request signing, the job body, and the errors a client sees.

Every request carries four headers::

    X-EC-Timestamp       unix time in whole seconds
    X-EC-Nonce           32 hex characters, never reused
    X-EC-Content-SHA256  sha256 (hex) of the body ("e3b0..." for an empty one)
    X-EC-Signature       hex HMAC-SHA256(token, METHOD \\n PATH \\n TIMESTAMP \\n NONCE \\n CONTENT-SHA256)

The signature covers the body's hash rather than the body, so the agent can
refuse a forged request from its headers alone, before reading an upload; it then
hashes the body as it streams in and refuses a mismatch (a tampered body). A
timestamp more than ``WINDOW_S`` away from the agent's clock, or a nonce already
seen within that window, is refused (replay).

``POST /v1/profile`` has ``Content-Type: application/vnd.edge-compress.job``:
one line of JSON (``{"settings": {...}, "device": "NAME"}``, at most
``MAX_JOB_HEADER`` bytes) ending in ``\\n``, followed by a gzip tar of the
artifact folder's contents (regular files and folders only, names relative to
the folder). Every answer is JSON; an error is ``{"error": "..."}``.

Standard library only: a device runs this without torch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from pathlib import Path

from edge_compress.errors import ConfigError, EdgeCompressError

PROTOCOL_VERSION = 1
WINDOW_S = 60
MIN_TOKEN_BYTES = 32
MAX_JOB_HEADER = 64 * 1024
JOB_CONTENT_TYPE = "application/vnd.edge-compress.job"
H_TIMESTAMP, H_NONCE, H_CONTENT, H_SIGNATURE = ("X-EC-Timestamp", "X-EC-Nonce", "X-EC-Content-SHA256",
                                                "X-EC-Signature")
_NONCE = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class AgentError(EdgeCompressError, RuntimeError):
    """The agent refused a request or its job failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class AgentUnreachableError(AgentError):
    """No agent answered at that address."""


class AgentAuthError(AgentError):
    """401: missing or bad signature, wrong token, stale timestamp, replayed nonce or tampered body."""


class AgentRequestError(AgentError):
    """400/404/405/411/422: a malformed request, an unsafe archive, bad settings or a damaged artifact."""


class AgentBusyError(AgentError):
    """409: the agent is running another profiling job (it answers busy rather than queueing)."""


class AgentPayloadTooLargeError(AgentError):
    """413: the upload, its extracted size or its member count is over the agent's limit."""


class AgentJobTimeoutError(AgentError):
    """504: the profiling job ran past the agent's time limit and was killed."""


ERRORS_BY_STATUS = {401: AgentAuthError, 409: AgentBusyError, 413: AgentPayloadTooLargeError,
                    504: AgentJobTimeoutError}


def error_for(status: int, message: str) -> AgentError:
    cls = ERRORS_BY_STATUS.get(status, AgentRequestError if 400 <= status < 500 else AgentError)
    return cls(message, status)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def signature(token: bytes, method: str, path: str, timestamp: str, nonce: str, content_sha256: str) -> str:
    message = "\n".join((method.upper(), path, timestamp, nonce, content_sha256)).encode()
    return hmac.new(token, message, hashlib.sha256).hexdigest()


def sign(token: bytes, method: str, path: str, content_sha256: str, now: float | None = None) -> dict[str, str]:
    """The four auth headers of one request."""
    ts, nonce = str(int(time.time() if now is None else now)), secrets.token_hex(16)
    return {H_TIMESTAMP: ts, H_NONCE: nonce, H_CONTENT: content_sha256,
            H_SIGNATURE: signature(token, method, path, ts, nonce, content_sha256)}


class Verifier:
    """Checks request signatures and remembers nonces for the replay window.

    Not thread-safe on its own: the server calls it under its lock.
    """

    def __init__(self, token: bytes, window_s: int = WINDOW_S, clock=time.time) -> None:
        check_token(token)
        self.token, self.window_s, self.clock = token, window_s, clock
        self._seen: dict[str, float] = {}  # nonce -> when it may be forgotten

    def verify(self, method: str, path: str, headers) -> str:
        """Return the signed body sha256, or raise ``AgentAuthError`` saying what was wrong."""
        ts, nonce, content, sig = (headers.get(h) for h in (H_TIMESTAMP, H_NONCE, H_CONTENT, H_SIGNATURE))
        missing = [h for h, v in zip((H_TIMESTAMP, H_NONCE, H_CONTENT, H_SIGNATURE), (ts, nonce, content, sig))
                   if not v]
        if missing:
            raise AgentAuthError(f"unsigned request: header(s) {', '.join(missing)} missing; sign requests "
                                 "with the agent's shared token (AgentClient does)", 401)
        if not ts.isdigit() or not _NONCE.fullmatch(nonce) or not _HEX64.fullmatch(content):
            raise AgentAuthError(f"malformed auth headers: {H_TIMESTAMP} must be unix seconds, {H_NONCE} 32 "
                                 f"lowercase hex characters, {H_CONTENT} 64", 401)
        expected = signature(self.token, method, path, ts, nonce, content)
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            raise AgentAuthError("bad signature: the request was not signed with this agent's token, or its "
                                 "method, path or headers were altered", 401)
        now = self.clock()
        if abs(now - int(ts)) > self.window_s:
            raise AgentAuthError(f"stale request: its timestamp is {now - int(ts):+.0f} s from the agent's clock "
                                 f"(allowed +-{self.window_s} s); sync the clocks (NTP) and sign it again", 401)
        self._forget_expired(now)
        if nonce in self._seen:
            raise AgentAuthError("replayed request: this nonce was already used; every request needs a "
                                 "fresh nonce", 401)
        self._seen[nonce] = int(ts) + self.window_s + 1
        return content

    def _forget_expired(self, now: float) -> None:
        for n in [n for n, until in self._seen.items() if until < now]:
            del self._seen[n]


def check_token(token: bytes) -> bytes:
    if len(token) < MIN_TOKEN_BYTES:
        raise ConfigError(f"the agent token is {len(token)} bytes; at least {MIN_TOKEN_BYTES} are required: "
                          "make one with `edge-compress agent token`")
    return token


def new_token() -> str:
    return secrets.token_urlsafe(32)  # 43 characters from 32 random bytes


def load_token(token_file: str | os.PathLike | None = None, token_env: str | None = None) -> bytes:
    """The shared token from a file (owner-only permissions) or an environment variable, never argv."""
    if (token_file is None) == (token_env is None):
        raise ConfigError("give exactly one of --token-file FILE or --token-env NAME (a token on the command "
                          "line would show in `ps`)")
    if token_env is not None:
        value = os.environ.get(token_env, "").strip()
        if not value:
            raise ConfigError(f"environment variable {token_env} is not set or empty; put the agent's shared "
                              "token in it (make one with `edge-compress agent token`)")
        return check_token(value.encode())
    path = Path(token_file)
    if not path.is_file():
        raise ConfigError(f"token file '{path}' does not exist; write one with "
                          f"`edge-compress agent token > {path} && chmod 600 {path}`")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"token file '{path}' is readable by other users (mode {mode:o}); "
                          f"run `chmod 600 {path}`")
    return check_token(path.read_bytes().strip())


def encode_job(settings: dict, device: str | None, archive: bytes) -> bytes:
    header = {"settings": settings} | ({"device": device} if device else {})
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + archive
