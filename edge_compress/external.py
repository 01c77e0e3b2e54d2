"""Detectors that exist only as someone else's ONNX file (a YOLOv8n, a PicoDet exported by
PaddleDetection, ...), wrapped with an input spec and a decoder type so they can be run,
scored, int8-quantized, converted and profiled like zoo members.

The wrapper checks the file against the spec before anything else: the graph must
have one float image input whose shape is ``(1, 3, H, W)`` of the spec (symbolic
dimensions are fixed to the spec's values; a different fixed size is an error)
and one output whose shape fits the decoder. Its fp32 reference is ONNX Runtime
on the user's file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_compress.artifact import sha256_file
from edge_compress.errors import ArtifactError, ConfigError
from edge_compress.models.base import InputSpec
from edge_compress.models.postprocess import DECODED_HEADS, HEADS, PostProcessConfig, make_priors

DECODERS = {
    "yolo_af": "anchor-free YOLO, boxes decoded in the graph (YOLOv8/YOLO11 as exported by Ultralytics)",
    "yolo": "anchor-based YOLO (YOLOv5-style tx, ty, tw, th, objectness, class logits; needs --anchors)",
    "gfl": "GFL/DFL head (PP-PicoDet style: class logits then 4 x (reg_max + 1) distribution logits)",
    "ssd": "SSD default boxes (dx, dy, dw, dh, background logit, class logits; needs --anchors)",
    "raw": "already decoded: x1, y1, x2, y2 in input pixels, then class probabilities",
}


@dataclass
class ExternalDetector:
    path: Path
    input_spec: InputSpec
    class_names: tuple[str, ...]
    post: PostProcessConfig
    family: str = "external"

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def sha256(self) -> str:
        return sha256_file(self.path)

    def config(self) -> dict[str, Any]:
        return {"onnx_file": self.path.name, "decoder": self.post.head, "source_sha256": self.sha256}

    def write_onnx(self, target: Path) -> Path:
        """The user's graph with symbolic input dims fixed to the spec, checked, at ``target``."""
        import onnx

        from edge_compress.backends.onnx_export import check_onnx, simplify_onnx

        model = _fixed_input(check_onnx(self.path), self.path, self.input_spec)
        onnx.save(model, str(target))
        simplify_onnx(target)
        check_onnx(target)
        return Path(target)

    def reference(self, x: np.ndarray) -> np.ndarray:
        from edge_compress.backends.ort import OrtRunner

        if not hasattr(self, "_ref"):
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                self._ref = OrtRunner(self.write_onnx(Path(d) / "ref.onnx"))
        return self._ref(x)


def load_external(path: str | os.PathLike, decoder: str, class_names: Sequence[str], input_size: int | tuple[int, int],
                  strides: Sequence[int] = (8, 16, 32), anchors: Sequence[Sequence[tuple[float, float]]] | None = None,
                  reg_max: int = 7, channels_first: bool | None = None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                  pad_value: int = 114) -> ExternalDetector:
    """Wrap the ONNX file at ``path``; raises naming the file and the mismatch when it does not fit."""
    path = Path(path)
    if decoder not in DECODERS:
        raise ConfigError(f"unknown decoder '{decoder}'; choose one of: " +
                          "; ".join(f"{k} ({v})" for k, v in DECODERS.items()))
    if not class_names:
        raise ConfigError("an external detector needs its class names (--classes a.txt or --num-classes N)")
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    spec = InputSpec(height=h, width=w, mean=tuple(mean), std=tuple(std), pad_value=pad_value)
    if decoder in ("yolo", "ssd") and not anchors:
        raise ConfigError(f"decoder '{decoder}' needs the anchors per stride (w, h in input pixels)")
    if decoder == "raw":
        strides, anchors = (), ()
    elif anchors is None:
        anchors = tuple(((float(s), float(s)),) for s in strides)
    if decoder not in DECODED_HEADS and decoder not in HEADS:
        raise ConfigError(f"decoder '{decoder}' is not supported")
    proto = _check_input(path, spec)
    out_shape = _output_shape(proto, path)
    post0 = PostProcessConfig(head=decoder, num_classes=len(class_names), strides=tuple(int(s) for s in strides),
                              anchors=tuple(tuple((float(a), float(b)) for a, b in lvl) for lvl in anchors),
                              reg_max=reg_max)
    if channels_first is None and len(out_shape) == 3:   # infer the layout from the output shape
        k = post0.channels   # the axis that equals K; else the shorter one (boxes outnumber channels)
        channels_first = out_shape[2] != k and (out_shape[1] == k or out_shape[1] < out_shape[2])
    post = PostProcessConfig(**{**post0.__dict__, "channels_first": bool(channels_first)})
    _check_output(out_shape, post, spec, path)
    return ExternalDetector(path, spec, tuple(class_names), post)


def _check_input(path: Path, spec: InputSpec):
    from edge_compress.backends.onnx_export import check_onnx

    proto = check_onnx(path)
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ArtifactError(f"'{path}' has {len(inputs)} inputs ({[i.name for i in inputs]}); a detector takes "
                            "one image tensor")
    return _fixed_input(proto, path, spec)


def _fixed_input(proto, path: Path, spec: InputSpec):
    import onnx

    inp = proto.graph.input[0]
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ArtifactError(f"'{path}' input '{inp.name}' is not float32; export the model with a float input")
    dims = inp.type.tensor_type.shape.dim
    want = (1, spec.channels, spec.height, spec.width)
    got = tuple(x.dim_value if x.HasField("dim_value") else x.dim_param for x in dims)
    if len(dims) != 4:
        raise ArtifactError(f"'{path}' input '{inp.name}' has rank {len(dims)}; expected NCHW {want}")
    for d, v, axis in zip(dims, want, "NCHW"):
        if d.HasField("dim_value") and d.dim_value != v:
            raise ArtifactError(f"'{path}' input '{inp.name}' has shape {got} but the given input spec needs {want} "
                                f"(axis {axis}); pass --input-size matching the model, or re-export it")
        d.Clear()
        d.dim_value = v
    for o in proto.graph.output:   # stale symbolic output dims are re-inferred from the fixed input
        for d in o.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
    return onnx.shape_inference.infer_shapes(proto)


def _output_shape(proto, path: Path) -> tuple[int, ...]:
    """The output's shape, from running the fixed-input graph once on zeros (symbolic output
    dims that shape inference leaves open are settled this way)."""
    import onnxruntime as ort

    outs = proto.graph.output
    if len(outs) != 1:
        raise ArtifactError(f"'{path}' has {len(outs)} outputs ({[o.name for o in outs]}); the wrapper expects one "
                            "(N, P, K) or (N, K, P) head tensor: concatenate the heads when exporting")
    inp = proto.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, {inp.name: np.zeros(shape, np.float32)})[0]
    except Exception as e:  # ORT's own exception types
        raise ArtifactError(f"'{path}' does not run in ONNX Runtime with input {tuple(shape)} "
                            f"({type(e).__name__}: {str(e)[:200]})") from e
    return tuple(out.shape)


def _check_output(shape: tuple[int, ...], post: PostProcessConfig, spec: InputSpec, path: Path) -> None:
    if len(shape) != 3:
        raise ArtifactError(f"'{path}' outputs rank {len(shape)} {shape}; expected (N, P, K) or (N, K, P)")
    k = shape[1] if post.channels_first else shape[2]
    p = shape[2] if post.channels_first else shape[1]
    if k != -1 and k != post.channels:
        raise ArtifactError(f"'{path}' outputs {k} channels per box; decoder '{post.head}' with {post.num_classes} "
                            f"classes needs {post.channels}: check --decoder and the class list")
    if post.head != "raw" and p != -1:
        priors = len(make_priors(post, spec.height, spec.width))
        if p != priors:
            raise ArtifactError(f"'{path}' outputs {p} boxes; strides {post.strides} at {spec.height}x{spec.width} "
                                f"give {priors}: check --strides and --input-size")
