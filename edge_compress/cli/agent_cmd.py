"""``edge-compress agent serve | token | oneshot``: the device agent's command line.

``add_parsers(verbs)`` adds the ``agent`` verb to the main CLI; ``main()`` is the
same commands as ``python -m edge_compress.profile.agent`` for a device that has
only the agent installed. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from edge_compress.errors import EdgeCompressError


def add_parsers(verbs) -> None:
    """Add ``agent`` to the main CLI's subparsers."""
    agent = verbs.add_parser("agent", help="the device agent: profile artifacts sent over the network")
    add_agent_verbs(agent.add_subparsers(dest="agent_verb", required=True, metavar="VERB"))


def add_agent_verbs(sub) -> None:
    p = sub.add_parser("serve", help="run the agent: profile artifacts that signed requests upload",
                       description="Serve GET /v1/health and POST /v1/profile. Requests must be signed with the "
                                   "shared token (HMAC-SHA256, replay refused); one profiling job at a time, a "
                                   "second gets 409 busy. Plain HTTP: the signature guards integrity, not "
                                   "secrecy; bind beyond 127.0.0.1 only on a network you trust.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0: any free port)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--token-file", type=Path, help="file holding the shared token (mode 600)")
    tok.add_argument("--token-env", metavar="NAME", help="environment variable holding the shared token")
    p.add_argument("--work-dir", type=Path, help="where job folders go (default: a fresh temporary folder)")
    p.add_argument("--max-upload-mb", type=float, default=256, help="largest upload accepted (default 256)")
    p.add_argument("--max-extract-mb", type=float, default=1024, help="largest extracted artifact (default 1024)")
    p.add_argument("--job-timeout", type=float, default=600, metavar="S",
                   help="seconds a profiling job may run before it is killed (default 600)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("token", help="print a fresh random token (32 bytes) to put in a file")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("oneshot", help="profile one artifact here and print the record as JSON (SSH/ADB run this)")
    p.add_argument("artifact", type=Path, help="an artifact folder")
    p.add_argument("--settings", default="{}", help="ProfileSettings as a JSON object (default: the defaults)")
    p.add_argument("--device", help="device name to record (default local)")
    p.set_defaults(func=cmd_oneshot)


def cmd_serve(a) -> int:
    from edge_compress.profile.agent.protocol import load_token
    from edge_compress.profile.agent.server import AgentLimits, AgentServer

    token = load_token(a.token_file, a.token_env)
    limits = AgentLimits(max_upload_bytes=int(a.max_upload_mb * 2**20), max_extract_bytes=int(a.max_extract_mb * 2**20),
                         job_timeout_s=a.job_timeout)
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="edge-compress-agent-"))
    server = AgentServer((a.host, a.port), token, work, limits, token_env=a.token_env)
    print(f"edge-compress agent listening on {server.url} (work dir {server.work_dir}; uploads up to "
          f"{a.max_upload_mb:g} MiB, jobs up to {a.job_timeout:g} s, one at a time)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_token(a) -> int:
    from edge_compress.profile.agent.protocol import new_token

    print(new_token())
    return 0


def cmd_oneshot(a) -> int:
    from edge_compress.profile.agent.oneshot import run_oneshot

    record = run_oneshot(a.artifact, a.settings, a.device)
    print(json.dumps(record))
    return 0


def main(argv: list[str] | None = None, prog: str = "edge-compress-agent") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="The edge-compress device agent.")
    add_agent_verbs(parser.add_subparsers(dest="agent_verb", required=True, metavar="VERB"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EdgeCompressError as e:
        print(f"edge-compress: error: {e}", file=sys.stderr)
        return 2
