"""The lowering config: which kernel each conv runs on. One frozen dataclass, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from edge_compress.errors import ConfigError, require_known_keys

# fp32: im2col + BLAS / depthwise loop; int8: integer-only conv (kernels.int8); binary: XNOR-popcount
# (kernels.binary); sparse_csr / sparse_2_4: sparse-weight convs (kernels.sparse).
CHOICES = ("fp32", "int8", "binary", "sparse_csr", "sparse_2_4")


@dataclass(frozen=True)
class LoweringConfig:
    """``default`` goes to every conv that can take it (the others stay fp32 and the lowered graph
    records why); ``layers`` sets single convs by zoo module name (``backbone.stem.0.conv``) or ONNX
    node name, and there a choice the layer cannot take is an error. ``layers`` is given as a
    mapping and kept as sorted ``(name, choice)`` pairs so the config stays hashable."""

    default: str = "fp32"
    layers: Any = ()

    def __post_init__(self):
        _check_choice(self.default, "lowering.default")
        pairs = self.layers.items() if isinstance(self.layers, Mapping) else self.layers
        try:
            pairs = tuple(sorted((str(k), str(v)) for k, v in pairs))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"lowering.layers must map layer names to choices, got {self.layers!r}") from e
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"lowering.layers names a layer twice: {twice}")
        for name, choice in pairs:
            _check_choice(choice, f"lowering.layers['{name}']")
        object.__setattr__(self, "layers", pairs)

    def layer_map(self) -> dict[str, str]:
        return dict(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"default": self.default, "layers": self.layer_map()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> "LoweringConfig":
        require_known_keys(cls, d, what="lowering setting", source=source)
        return cls(**d)


def _check_choice(choice: str, where: str) -> None:
    if choice not in CHOICES:
        raise ConfigError(f"{where}='{choice}' is not a kernel choice; choose one of: {', '.join(CHOICES)}")
