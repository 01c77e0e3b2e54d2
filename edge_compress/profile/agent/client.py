"""The host side of the agent protocol: signed requests, uploads after ``100 Continue``.

``AgentClient(host, port, token).profile(artifact_dir, settings)`` packs the
folder, signs the request and returns the agent's profile record; a refusal
raises the ``AgentError`` subclass of its status with the agent's message.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
from pathlib import Path

from edge_compress.profile.agent import protocol
from edge_compress.profile.agent.archive import pack_folder
from edge_compress.profile.agent.protocol import AgentBusyError, AgentError, AgentUnreachableError

_CHUNK = 1 << 20


class AgentClient:
    """A client of one agent. ``timeout_s`` bounds every socket wait, including the profiling job itself."""

    def __init__(self, host: str, port: int, token: str | bytes, timeout_s: float = 900.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.token = protocol.check_token(token.encode() if isinstance(token, str) else token)

    def health(self) -> dict:
        return self.request("GET", "/v1/health", b"")

    def profile(self, artifact_dir: str | Path, settings, device: str | None = None,
                wait_busy_s: float = 0.0) -> dict:
        """Profile an artifact folder on the agent's device; ``settings`` is a ``ProfileSettings`` or its dict.

        A busy agent is retried every second for up to ``wait_busy_s`` seconds, then ``AgentBusyError``.
        """
        as_dict = settings if isinstance(settings, dict) else settings.to_dict()
        body = protocol.encode_job(as_dict, device, pack_folder(artifact_dir))
        deadline = time.monotonic() + wait_busy_s
        while True:
            try:
                return self.request("POST", "/v1/profile", body)
            except AgentBusyError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)

    def request(self, method: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> dict:
        """One signed request; ``headers`` are added after signing (tests use this to forge requests)."""
        signed = protocol.sign(self.token, method, path, protocol.sha256_hex(body))
        return send(self.host, self.port, method, path, body, signed | (headers or {}), self.timeout_s)


def send(host: str, port: int, method: str, path: str, body: bytes, headers: dict[str, str],
         timeout_s: float = 900.0, expect_continue: bool = True) -> dict:
    """Send one request as given (signed or not) and return its JSON answer; raise on any error status."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        all_headers = {"Content-Length": str(len(body))} | headers
        if body:
            all_headers |= {"Content-Type": protocol.JOB_CONTENT_TYPE}
            if expect_continue:
                all_headers["Expect"] = "100-continue"
        for k, v in all_headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body and (not expect_continue or _continued(conn.sock, timeout_s)):
            for i in range(0, len(body), _CHUNK):
                conn.send(body[i:i + _CHUNK])
        return _answer(conn.getresponse())
    except (ConnectionRefusedError, socket.gaierror) as e:
        raise AgentUnreachableError(f"no agent at {host}:{port} ({e}); is `edge-compress agent serve` running "
                                    "there, and is the port reachable from here?") from e
    except (OSError, http.client.HTTPException) as e:
        raise AgentError(f"the connection to the agent at {host}:{port} failed mid-request "
                         f"({type(e).__name__}: {e})") from e
    finally:
        conn.close()


def _continued(sock: socket.socket, timeout_s: float) -> bool:
    """Wait for the agent's interim answer: True on ``100 Continue`` (consumed), False on a final one (left)."""
    if not select.select([sock], [], [], timeout_s)[0]:
        raise AgentError(f"the agent did not answer the upload's headers within {timeout_s:g} s")
    while True:
        seen = sock.recv(4096, socket.MSG_PEEK)
        if not seen or (len(seen) >= 12 and seen[9:12] != b"100"):
            return False  # closed, or a refusal that getresponse() reads
        end = seen.find(b"\r\n\r\n")
        if end >= 0:
            sock.recv(end + 4)  # drop exactly the interim answer
            return True
        time.sleep(0.01)  # only part of the status line has arrived


def _answer(resp: http.client.HTTPResponse) -> dict:
    raw = resp.read()
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        payload = {"error": raw.decode(errors="replace").strip()[:500] or resp.reason}
    if resp.status == 200:
        return payload
    message = payload.get("error", str(payload)) if isinstance(payload, dict) else str(payload)
    raise protocol.error_for(resp.status, f"agent answered {resp.status}: {message}")
