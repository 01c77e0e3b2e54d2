"""A flat registry of zoo detectors: ``create_detector("picodet_s")``, ``list_detectors("ssd*")``."""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any, Callable

from edge_compress.errors import UnknownNameError


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    factory: Callable[..., Any]
    defaults: dict[str, Any]
    description: str


_REGISTRY: dict[str, ZooEntry] = {}


def register_detector(name: str, family: str, factory: Callable[..., Any], description: str,
                      **defaults: Any) -> None:
    """Register ``factory(**defaults, **overrides)`` under ``name``; warns on overwrite."""
    if name in _REGISTRY:
        warnings.warn(f"zoo entry '{name}' is registered twice; the later one wins", stacklevel=2)
    _REGISTRY[name] = ZooEntry(name, family, factory, dict(defaults), description)


def _load_families() -> None:
    # Importing the family modules registers their entries.
    from edge_compress.models import picodet, ssdlite, yolo_tiny  # noqa: F401


def list_detectors(pattern: str = "*") -> list[str]:
    _load_families()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def zoo_entry(name: str) -> ZooEntry:
    _load_families()
    if name not in _REGISTRY:
        close = [n for n in _REGISTRY if name.split("_")[0] in n]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownNameError(
            f"unknown model '{name}'{hint}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_detector(name: str, **overrides: Any):
    """Build a zoo detector by name. Common overrides: ``num_classes`` or
    ``class_names``, ``input_size`` (int or (h, w)), ``width_mult``."""
    entry = zoo_entry(name)
    kwargs = {**entry.defaults, **overrides}
    model = entry.factory(name=name, **kwargs)
    model.build_kwargs = {k: v for k, v in kwargs.items()}
    return model
