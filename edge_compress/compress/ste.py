"""Pieces shared by the weight/activation quantizers (QAT, binary, ternary, k-means).

Straight-through estimator (STE; Bengio et al. 2013, "Estimating or propagating
gradients through stochastic neurons"; used by XNOR-Net, TWN and QAT alike): the
forward uses the quantized value, the backward treats the quantizer as the identity
(see ``ste``), so the float "latent" weights keep
accumulating small updates that a rounding step would otherwise swallow.

Size accounting: every method reports the bytes its compressed layers would take
in the format it stands for (1 bit, 2 bits, ``bits`` + codebook, 8 bits) plus the
float32 bytes of every other parameter and buffer that a deployment stores
(BatchNorm statistics included), so a benchmark compares like with like.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

FP32_BYTES = 4


def ste(quantized: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward, the identity's gradient to ``latent`` in the backward.

    Written as ``quantized + (latent - latent.detach())``: the added term is exactly 0, so the
    forward values are bit-identical to ``quantized`` (``latent + (quantized - latent)`` is not)."""
    return quantized.detach() + (latent - latent.detach())


def sign(x: torch.Tensor) -> torch.Tensor:
    """+1 where ``x >= 0``, -1 elsewhere (0 maps to +1: a sign bit has no zero)."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class _ClippedSign(torch.autograd.Function):
    """sign(x) with the clipped STE of XNOR-Net / BinaryNet (Hubara et al. 2016): ``grad * (|x| <= 1)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


def binary_activation(x: torch.Tensor) -> torch.Tensor:
    """``torch.where(x >= 0, 1.0, -1.0)``; with autograd on, the clipped STE gradient.

    Without autograd (inference, ONNX export) it is the plain ``where``, so the exported graph
    is exactly ``Where(GreaterOrEqual(x, 0), 1, -1)`` (the pattern the binary lowering reads)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ClippedSign.apply(x)
    return torch.where(x >= 0, 1.0, -1.0)


def float_bytes(model: nn.Module, exclude: Iterable[str] = ()) -> int:
    """float32 bytes of every parameter and persistent buffer of ``model`` whose state_dict key
    does not start with one of the ``exclude`` prefixes (the layers accounted separately)."""
    prefixes = tuple(f"{p}." for p in exclude)
    return sum(FP32_BYTES * t.numel() for k, t in model.state_dict().items()
               if not k.startswith(prefixes) and t.is_floating_point())


def layer_bytes(module: nn.Module, weight_bits: float, extra_floats: int) -> int:
    """Bytes of one compressed layer: its weights at ``weight_bits`` each (rounded up to whole
    bytes), ``extra_floats`` float32 values (scales, codebook) and its bias in float32."""
    n = module.weight.numel()
    bias = getattr(module, "bias", None)
    return -(-int(n * weight_bits) // 8) + FP32_BYTES * (extra_floats + (bias.numel() if bias is not None else 0))


class FrozenWeight:
    """Mixin for a ``Conv2d``/``Linear`` subclass whose weight is computed from parameters
    (a quantizer with an STE): ``layer_weight()`` gives the differentiable ``effective_weight()``
    while autograd is on, else ``frozen_weight()``, the same values cached as a plain tensor.

    Why the cache: an ONNX trace records the computation of a weight from a parameter as graph
    ops; the legacy exporter does not fold them and onnxscript's optimizer folds only inputs of
    at most 8192 elements, so the exported Conv would get a computed weight instead of an
    initializer (which runtimes, the int8 quantizer and the lowering read). The cached tensor is
    a constant to the tracer. It is refreshed whenever a source parameter changed (its version
    counter, storage or device) and on ``eval()``, which the exporter calls before tracing."""

    def effective_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def weight_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,)

    def frozen_weight(self) -> torch.Tensor:
        key = tuple((t._version, t.data_ptr(), str(t.device)) for t in self.weight_sources())
        if self.__dict__.get("_frozen_key") != key:
            with torch.no_grad():
                self.__dict__["_frozen"] = self.effective_weight().detach()
            self.__dict__["_frozen_key"] = key
        return self.__dict__["_frozen"]

    def layer_weight(self) -> torch.Tensor:
        if torch.is_grad_enabled() and any(t.requires_grad for t in self.weight_sources()):
            return self.effective_weight()
        return self.frozen_weight()

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self.frozen_weight()
        return self
