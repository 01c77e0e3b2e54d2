"""Which layers a compression step may touch, by their ``named_modules()`` names.

Shared by the unstructured pruner and the low-rank decomposer: the weight layers
(``Conv2d``/``Linear``), the detection head's output convs (left alone by default),
and the resolution of user-given names (a name matching nothing is an error that
lists close names, STYLE.md practice 7).
"""

from __future__ import annotations

import difflib
from typing import Iterable

import torch
from torch import nn

from edge_compress.errors import ConfigError

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``Conv2d``/``Linear`` of the model by its ``named_modules()`` name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)}


def _example_input(model: nn.Module) -> torch.Tensor:
    spec = getattr(model, "input_spec", None)
    if spec is None:
        raise ConfigError(f"{type(model).__name__} has no input_spec, so its head output layers cannot be found "
                          "by a forward; name the layers to compress explicitly (layers=(...))")
    return torch.zeros(1, spec.channels, spec.height, spec.width, requires_grad=True)


def output_layers(model: nn.Module, example: torch.Tensor | None = None) -> set[str]:
    """The head's output convs: the last weight layer on every path to the model's output.

    Found on the autograd graph of one forward, not by module names, so it holds for
    any head layout: a forward hook maps each weight layer's output ``grad_fn`` to the
    layer's name, then a walk from the output's ``grad_fn`` back through the plumbing
    (view, permute, cat, sigmoid, ...) stops at the first such node on every path. This
    is the torch-side twin of ``edge_compress.quant.qdq.output_convs`` on the ONNX graph.
    """
    x = _example_input(model) if example is None else example.detach().requires_grad_(True)
    node_to_name: dict[object, str] = {}
    def record(name):
        def hook(module, inputs, output) -> None:   # returns None: a hook's value would replace the output
            node_to_name.setdefault(output.grad_fn, name)
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in weight_layers(model).items()]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return _walk_to_layers([o.grad_fn for o in outs if o.grad_fn is not None], node_to_name)


def _walk_to_layers(roots: list, node_to_name: dict[object, str]) -> set[str]:
    found, seen, stack = set(), set(), list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in node_to_name:
            found.add(node_to_name[node])
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def check_names(names: Iterable[str], known: Iterable[str], what: str) -> None:
    """Raise ``ConfigError`` for names that match no layer, listing the closest real names."""
    known = list(known)
    bad = [n for n in names if n not in set(known)]
    if not bad:
        return
    hints = {n: difflib.get_close_matches(n, known, n=3, cutoff=0.5) for n in bad}
    hint = "; ".join(f"'{n}': did you mean {h}?" if h else f"'{n}': no close name" for n, h in hints.items())
    raise ConfigError(f"{what} name(s) {bad} match no Conv2d/Linear layer of the model ({hint}); "
                      "see `edge-compress zoo summary NAME --layers` for the layer names")


def choose_layers(model: nn.Module, explicit: tuple[str, ...], per_layer: Iterable[str], fields: tuple[str, str],
                  kept: str) -> tuple[dict[str, nn.Module], list[str], dict[str, str]]:
    """The layers a compression step touches: ``explicit`` names, or by default every weight layer
    but the head's output convs (reported as skipped with the reason ``kept``), plus the names keyed
    by its per-layer setting. ``fields`` names the two settings in errors ("sparsity.layers",
    "sparsity.per_layer"). Returns (all weight layers, chosen names, skipped name -> reason)."""
    layers = weight_layers(model)
    per_layer = list(per_layer)
    check_names(explicit, layers, fields[0])
    check_names(per_layer, layers, fields[1])
    skipped: dict[str, str] = {}
    if explicit:
        chosen = list(explicit)
    else:
        heads = output_layers(model)
        skipped.update({name: f"head output conv ({kept} by default)" for name in sorted(heads)})
        chosen = [name for name in layers if name not in heads]
    chosen += [name for name in per_layer if name not in chosen]
    return layers, chosen, skipped


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding ``name`` and the attribute under which it is held."""
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr
