"""One error hierarchy for the toolchain.

Every message names the value that was wrong, what was expected, and how to fix
it. The CLI turns an ``EdgeCompressError`` into a one-line message and exit code 2
instead of a traceback.
"""

from __future__ import annotations


class EdgeCompressError(Exception):
    """Base class of every error the toolchain raises on purpose."""


class ConfigError(EdgeCompressError, ValueError):
    """A config, CLI option or YAML field has a bad value or an unknown key."""


class DataError(EdgeCompressError, ValueError):
    """A dataset file (COCO json, image) is missing, malformed or inconsistent."""


class UnknownNameError(EdgeCompressError, KeyError):
    """A registry lookup (model, backend, device, layer) matched nothing."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(EdgeCompressError, RuntimeError):
    """A backend's runtime or SDK is not installed or cannot run here; the message says how to install it."""


class ArtifactError(EdgeCompressError, ValueError):
    """An artifact (or a model file inside it) is missing, corrupt, tampered with or already exists."""


class ExportValidationError(EdgeCompressError, RuntimeError):
    """An exported model disagrees with the source model beyond the tolerance; nothing was written."""


def require_known_keys(cls, d, what: str = "key", source: str | None = None) -> None:
    """Raise ``ConfigError`` when mapping ``d`` has keys that are not fields of dataclass ``cls``
    (every config's ``from_dict``: unknown keys are rejected, never ignored)."""
    from dataclasses import fields

    known = sorted(f.name for f in fields(cls))
    unknown = sorted(set(d) - set(known))
    if unknown:
        prefix = f"{source}: " if source else ""
        raise ConfigError(f"{prefix}unknown {what}(s) {unknown}; known {what}s: {known}")
