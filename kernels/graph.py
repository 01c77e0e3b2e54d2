"""A lowered graph: ops in topological order + named weight arrays, and its two files.

On disk (a ``kernels`` artifact): ``graph.json`` holds the format version, the graph's
input/output names and shapes, every tensor's static shape, the ops (type, inputs,
outputs, attributes, weight keys) and the sha256 of ``weights.npz``; ``weights.npz``
holds the arrays (``np.savez``, loaded with ``allow_pickle=False``). Loading checks
everything it can before anything runs: the JSON parses, the version is known, the
weights file is the one the graph was written with (sha256), every op type is known
with its attributes, every weight exists with the dtype and shape its op needs, and
each input is produced before it is read. Errors name the file and the op.

A leaf module: NumPy only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edge_compress.errors import ArtifactError

FORMAT_VERSION = 1
GRAPH_FILE = "graph.json"
WEIGHTS_FILE = "weights.npz"


@dataclass(frozen=True)
class OpSpec:
    """What an op type needs: input count (None: one or more), attributes, weights (role -> dtype, ndim)."""

    inputs: int | None
    attrs: tuple[str, ...] = ()
    weights: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    precision: str | None = None      # set for the compute (conv) ops: what the manifest reports


_CONV = ("stride", "pads", "dilation")
OP_SPECS: dict[str, OpSpec] = {
    "conv": OpSpec(1, _CONV + ("group",), {"W": ("float32", 4), "B": ("float32", 1)}, "fp32"),
    "conv_int8": OpSpec(1, _CONV + ("group", "x_scale", "x_zp", "y_scale", "y_zp", "qmin", "qmax"),
                        {"W": ("int8", 4), "B": ("int32", 1), "multiplier": ("int32", 1), "shift": ("int32", 1)},
                        "int8"),
    "conv_binary": OpSpec(1, ("stride", "pads", "dilation", "in_channels", "kernel"),
                          {"W": ("uint64", 4), "scale": ("float32", 1), "B": ("float32", 1)}, "binary"),
    "conv_sparse_csr": OpSpec(1, _CONV + ("in_channels", "kernel", "shape"),
                              {"indptr": ("int32", 1), "indices": ("int32", 1), "values": ("float32", 1),
                               "B": ("float32", 1)}, "sparse_csr"),
    "conv_sparse_2_4": OpSpec(1, _CONV + ("in_channels", "kernel", "shape", "n", "m"),
                              {"values": ("float32", 2), "indices": ("uint8", 2), "B": ("float32", 1)}, "sparse_2_4"),
    "add": OpSpec(2), "mul": OpSpec(2),
    "concat": OpSpec(None, ("axis",)),
    "slice": OpSpec(1, ("starts", "ends", "axes", "steps")),
    "reshape": OpSpec(1, ("shape",)),
    "transpose": OpSpec(1, ("perm",)),
    "pad": OpSpec(1, ("pads", "value")),
    "resize_nearest": OpSpec(1, ("scale_h", "scale_w")),
    "maxpool": OpSpec(1, ("kernel", "stride", "pads", "ceil_mode")),
    "global_avgpool": OpSpec(1),
    "relu": OpSpec(1), "sigmoid": OpSpec(1), "hard_swish": OpSpec(1), "binarize": OpSpec(1),
    "clip": OpSpec(1, ("min", "max")),
    "leaky_relu": OpSpec(1, ("alpha",)),
    "hard_sigmoid": OpSpec(1, ("alpha", "beta")),
}


# Attribute -> (kind, length for lists): checked on load so an edited value fails there, not mid-run.
_INT, _NUM, _INTS = "an integer", "a number", "a list of integers"
ATTR_KINDS: dict[str, tuple[str, tuple[int, ...]]] = {
    "stride": (_INTS, (2,)), "dilation": (_INTS, (2,)), "kernel": (_INTS, (2,)), "pads": (_INTS, (4, 8)),
    "shape": (_INTS, ()), "perm": (_INTS, ()), "starts": (_INTS, ()), "ends": (_INTS, ()), "axes": (_INTS, ()),
    "steps": (_INTS, ()), "group": (_INT, ()), "in_channels": (_INT, ()), "x_zp": (_INT, ()), "y_zp": (_INT, ()),
    "qmin": (_INT, ()), "qmax": (_INT, ()), "n": (_INT, ()), "m": (_INT, ()), "axis": (_INT, ()),
    "scale_h": (_INT, ()), "scale_w": (_INT, ()), "ceil_mode": (_INT, ()), "x_scale": (_NUM, ()),
    "y_scale": (_NUM, ()), "alpha": (_NUM, ()), "beta": (_NUM, ()), "value": (_NUM, ()),
}


def _attr_ok(value, kind: str, lengths: tuple[int, ...]) -> bool:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if kind == _INT:
        return is_int(value)
    if kind == _NUM:
        return is_int(value) or isinstance(value, float)
    return isinstance(value, list) and all(is_int(v) for v in value) and (not lengths or len(value) in lengths)


@dataclass(frozen=True)
class Op:
    """One lowered op; ``name`` is the ONNX node it came from (the profiler's layer name)."""

    name: str
    type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)   # role -> key in LoweredGraph.weights

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "inputs": list(self.inputs), "outputs": list(self.outputs),
                "attrs": self.attrs, "weights": self.weights}


@dataclass(frozen=True)
class LoweredGraph:
    """Ops in execution order, the weights they reference, and every tensor's static shape."""

    ops: tuple[Op, ...]
    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]
    weights: dict[str, np.ndarray] = field(repr=False)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)   # provenance: source graph, lowering config

    def __post_init__(self):
        check_graph(self, "<in memory>")

    def precision(self) -> dict[str, str]:
        """Compute op (ONNX node name) -> fp32 | int8 | binary | sparse_csr | sparse_2_4."""
        return {op.name: OP_SPECS[op.type].precision for op in self.ops if OP_SPECS[op.type].precision}

    def save(self, folder: str | Path) -> Path:
        """Write ``graph.json`` + ``weights.npz`` into ``folder``; returns the graph.json path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        wpath = folder / WEIGHTS_FILE
        with open(wpath, "wb") as f:
            np.savez(f, **self.weights)
        doc = {"format_version": FORMAT_VERSION, "weights_file": WEIGHTS_FILE, "weights_sha256": _sha256(wpath),
               "inputs": {k: list(v) for k, v in self.inputs.items()},
               "outputs": {k: list(v) for k, v in self.outputs.items()},
               "shapes": {k: list(v) for k, v in self.shapes.items()},
               "meta": self.meta, "ops": [op.to_dict() for op in self.ops]}
        gpath = folder / GRAPH_FILE
        gpath.write_text(json.dumps(doc, indent=1) + "\n")
        return gpath


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- loading


def load_graph(folder: str | Path) -> LoweredGraph:
    """Read and check a lowered graph folder; any defect is an ``ArtifactError`` naming file and op."""
    folder = Path(folder)
    gpath = folder / GRAPH_FILE
    doc = _read_json(gpath)
    if doc.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{gpath}: format_version {doc.get('format_version')!r} is not the supported "
                            f"{FORMAT_VERSION}; lower the model again with this version")
    for key in ("weights_file", "weights_sha256", "inputs", "outputs", "shapes", "ops"):
        if key not in doc:
            raise ArtifactError(f"{gpath}: missing key '{key}'; the file was edited or truncated: export it again")
    weights = _read_weights(folder / str(doc["weights_file"]), str(doc["weights_sha256"]), gpath)
    try:
        ops = tuple(Op(str(o["name"]), str(o["type"]), tuple(o["inputs"]), tuple(o["outputs"]),
                       dict(o.get("attrs", {})), dict(o.get("weights", {}))) for o in doc["ops"])
        shapes = {k: tuple(int(d) for d in v) for k, v in doc["shapes"].items()}
        ins = {k: tuple(int(d) for d in v) for k, v in doc["inputs"].items()}
        outs = {k: tuple(int(d) for d in v) for k, v in doc["outputs"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{gpath}: malformed op or shape entry ({type(e).__name__}: {e}); the file was "
                            "edited: export it again") from e
    g = object.__new__(LoweredGraph)   # check with the file's name in the messages, then freeze
    for k, v in dict(ops=ops, inputs=ins, outputs=outs, weights=weights, shapes=shapes,
                     meta=dict(doc.get("meta", {}))).items():
        object.__setattr__(g, k, v)
    check_graph(g, str(gpath))
    return g


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"lowered graph file '{path}' does not exist")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); the file is truncated or edited: export it again") from e
    if not isinstance(doc, dict):
        raise ArtifactError(f"{path} holds a {type(doc).__name__}, not a lowered graph object")
    return doc


def _read_weights(path: Path, sha: str, gpath: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ArtifactError(f"weights file '{path}' named by {gpath} does not exist")
    actual = _sha256(path)
    if actual != sha:
        raise ArtifactError(f"{path}: sha256 {actual[:16]}... does not match {sha[:16]}... recorded in {gpath}; "
                            "the weights were modified, truncated or belong to another graph: export it again")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (object arrays), OSError
        raise ArtifactError(f"{path} cannot be read as an .npz of plain arrays ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------- checks


def check_graph(g: LoweredGraph, where: str) -> None:
    """Every op known and complete, weights present and well-typed, inputs produced before use."""
    available = set(g.inputs)
    names = [op.name for op in g.ops]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ArtifactError(f"{where}: op name(s) {dup[:5]} occur more than once (per-op timers need unique names)")
    for op in g.ops:
        spec = OP_SPECS.get(op.type)
        if spec is None:
            raise ArtifactError(f"{where}: op '{op.name}' has unknown type '{op.type}'; known: {sorted(OP_SPECS)}")
        _check_op(op, spec, g.weights, where)
        missing = [t for t in op.inputs if t not in available]
        if missing:
            raise ArtifactError(f"{where}: op '{op.name}' reads {missing}, which no earlier op produces "
                                "(ops out of order or edited)")
        available.update(op.outputs)
        _check_conv_shapes(op, g, where)
    absent = [t for t in g.outputs if t not in available]
    if absent:
        raise ArtifactError(f"{where}: graph output(s) {absent} are produced by no op")


def _check_op(op: Op, spec: OpSpec, weights: Mapping[str, np.ndarray], where: str) -> None:
    if spec.inputs is not None and len(op.inputs) != spec.inputs or not op.inputs or len(op.outputs) != 1:
        raise ArtifactError(f"{where}: op '{op.name}' ({op.type}) has {len(op.inputs)} input(s) and "
                            f"{len(op.outputs)} output(s); it takes {spec.inputs or 'one or more'} and gives 1")
    absent = [a for a in spec.attrs if a not in op.attrs]
    if absent:
        raise ArtifactError(f"{where}: op '{op.name}' ({op.type}) lacks attribute(s) {absent}")
    for name in spec.attrs:
        kind, lengths = ATTR_KINDS.get(name, (None, ()))
        if kind is not None and not _attr_ok(op.attrs[name], kind, lengths):
            size = f" of length {' or '.join(map(str, lengths))}" if lengths else ""
            raise ArtifactError(f"{where}: op '{op.name}' ({op.type}) attribute {name}={op.attrs[name]!r} must be "
                                f"{kind}{size}")
    for role, (dtype, ndim) in spec.weights.items():
        key = op.weights.get(role)
        if key is None or key not in weights:
            raise ArtifactError(f"{where}: op '{op.name}' ({op.type}) needs weight '{role}' "
                                f"({'no key' if key is None else repr(key)} in the weights file)")
        w = weights[key]
        if w.dtype != np.dtype(dtype) or w.ndim != ndim:
            raise ArtifactError(f"{where}: weight '{key}' of op '{op.name}' is {w.dtype} with {w.ndim} dims; "
                                f"{op.type} needs {dtype} with {ndim}")


def _check_conv_shapes(op: Op, g: LoweredGraph, where: str) -> None:
    """The weights agree with the recorded input/output channels of the conv op."""
    if OP_SPECS[op.type].precision is None or op.inputs[0] not in g.shapes or op.outputs[0] not in g.shapes:
        return
    c_in, c_out = g.shapes[op.inputs[0]][1], g.shapes[op.outputs[0]][1]
    w = {role: g.weights[key] for role, key in op.weights.items()}
    want: dict[str, tuple[int, ...]] = {"B": (c_out,)}
    if op.type in ("conv", "conv_int8"):
        grp = int(op.attrs["group"])
        if w["W"].shape[0] != c_out or w["W"].shape[1] * grp != c_in:
            raise ArtifactError(f"{where}: op '{op.name}' weight W has shape {w['W'].shape}; input has {c_in} "
                                f"channels, output {c_out}, group {grp}")
        if op.type == "conv_int8":
            want.update(multiplier=(c_out,), shift=(c_out,))
    elif op.type == "conv_binary":
        kh, kw = op.attrs["kernel"]
        want.update(W=(c_out, kh, kw, (int(op.attrs["in_channels"]) + 63) // 64), scale=(c_out,))
    else:
        o, k = op.attrs["shape"]
        kh, kw = op.attrs["kernel"]
        if o != c_out or k != c_in * kh * kw:
            raise ArtifactError(f"{where}: op '{op.name}' sparse shape {(o, k)} does not fit {c_in} -> {c_out} "
                                f"channels with a {kh}x{kw} kernel")
        if op.type == "conv_sparse_csr":
            want.update(indptr=(c_out + 1,))
        else:
            kept = (c_out, k // int(op.attrs["m"]) * int(op.attrs["n"]))
            want.update(values=kept, indices=kept)
    for role, shape in want.items():
        if w[role].shape != tuple(shape):
            raise ArtifactError(f"{where}: weight '{op.weights[role]}' of op '{op.name}' has shape "
                                f"{w[role].shape}; {op.type} needs {tuple(shape)}")
