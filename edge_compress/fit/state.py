"""The resumable state of one ``fit`` run: ``OUT/state.json``, rewritten atomically after every step.

It holds the run's identity (model, data, device, backend, search space, the
settings that decide what is measured) and everything measured so far: every
device measurement (with its profile record's id and path, and the environment
it was measured in), the short fine-tune checks, the verification rounds. A run
started again with the same ``--out`` continues from it; a different identity is
an error naming what changed (results are never mixed or overwritten).

Measurements are also filed in the profile store the moment they are taken, tagged
with the run's id, so one that finished after the last state write (a kill at the
wrong moment) is recovered from the store on resume.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from edge_compress.errors import ArtifactError
from edge_compress.io import write_json_atomic

SCHEMA = 1
STATE = "state.json"


class FitState:
    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    @classmethod
    def open(cls, out: Path, identity: dict[str, Any]) -> "FitState":
        out = Path(out)
        path = out / STATE
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("schema") != SCHEMA:
                raise ArtifactError(f"{path} has state schema {data.get('schema')}, this version writes {SCHEMA}; "
                                    "use a new --out")
            changed = sorted(k for k in set(identity) | set(data["identity"])
                             if identity.get(k) != data["identity"].get(k))
            if changed:
                raise ArtifactError(f"{out} holds a fit of another setup ({', '.join(changed)} differ: "
                                    f"{[(k, data['identity'].get(k), identity.get(k)) for k in changed][:3]}); "
                                    "resume with the same arguments or choose a new --out")
            return cls(path, data)
        if out.exists() and any(out.iterdir()):
            raise ArtifactError(f"{out} exists and is not a fit run (no {STATE}); choose a new --out (nothing "
                                "is ever overwritten)")
        out.mkdir(parents=True, exist_ok=True)
        state = cls(path, {"schema": SCHEMA, "run": secrets.token_hex(6), "identity": identity,
                           "measurements": [], "builds_failed": {}, "checks": {}, "rounds": [],
                           "scale": {}, "references": [], "result": None})
        state.save()
        return state

    @property
    def resumed(self) -> bool:
        return bool(self.data["measurements"])

    @property
    def run_id(self) -> str:
        return self.data["run"]

    def save(self) -> None:
        write_json_atomic(self.path, self.data, indent=1)

    def add_measurement(self, m: dict[str, Any]) -> None:
        self.data["measurements"].append(m)
        self.save()

    def valid(self) -> list[dict[str, Any]]:
        return [m for m in self.data["measurements"] if "error" not in m and not m.get("stale")]

    def measured_keys(self) -> set[str]:
        return {m["key"] for m in self.valid()} | set(self.data["builds_failed"])

    def known_records(self) -> set[str]:
        return {m["record"] for m in self.data["measurements"] if "record" in m}
