"""Profile one artifact in this process and return the record: what the agent's job process, SSH and ADB run.

``python -m edge_compress.profile.agent oneshot ARTIFACT --settings JSON`` prints
the record as one JSON document on stdout and nothing else: anything the
runtime writes to stdout meanwhile (even from C) is sent to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from edge_compress.errors import ConfigError


def run_oneshot(artifact: str | Path, settings_json: str = "{}", device: str | None = None) -> dict:
    from edge_compress.profile.profiler import ProfileSettings, profile_artifact

    try:
        d = json.loads(settings_json)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--settings is not valid JSON ({e}); give ProfileSettings fields, "
                          'e.g. \'{"warmup": 5, "min_repeats": 20}\'') from e
    if not isinstance(d, dict):
        raise ConfigError(f"--settings is {type(d).__name__}; expected a JSON object of ProfileSettings fields")
    settings = ProfileSettings.from_dict(d)
    with stdout_to_stderr():
        return profile_artifact(artifact, settings, device=device or "local")


@contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr for the block, so only our JSON reaches stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
