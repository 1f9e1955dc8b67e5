"""The elementwise pieces of a transformer block as pure functions, run eagerly or fused by ``torch.compile``.

    rms_norm(x, w)        = x / sqrt(mean(x^2) + eps) * w        (computed in fp32, returned in x's dtype)
    rotary(q, k, cos, sin) = (q cos + rotate_half(q) sin, k cos + rotate_half(k) sin)
    swiglu(g, u)          = silu(g) * u

Eagerly each is several passes over activation memory (RMSNorm alone reads and writes its input about ten
times in fp32); compiled, each is one fused kernel in forward and one in backward. They take parameters as
arguments, so ZeRO-3's module hooks, which gather parameters around module forwards, are not traced.
``model.fused_kernels`` picks the variant (on by default with CUDA).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class Kernels:
    rms_norm: Callable
    rotary: Callable
    swiglu: Callable


EAGER = Kernels(rms_norm, rotary, swiglu)


@functools.cache
def fused() -> Kernels:
    """Compiled once per process, lazily (the first call compiles for the shapes it sees)."""
    return Kernels(*(torch.compile(fn) for fn in (rms_norm, rotary, swiglu)))


@contextlib.contextmanager
def eager_kernels(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s modules with the ``EAGER`` kernels inside the block, and give them back what they had
    after. For one-off no-grad forwards whose shapes training never runs (the P-POTS offline estimate): compiling
    the fused kernels for them (~10 s on an H200, ``tools/bench/ppots_start.py``) costs more than the forwards.
    A model without these kernels (any other Hugging Face model) is left as it is."""
    saved = {module: module.kernels for module in model.modules() if isinstance(getattr(module, "kernels", None),
                                                                                 Kernels)}
    for module in saved:
        module.kernels = EAGER
    try:
        yield
    finally:
        for module, kernels in saved.items():
            module.kernels = kernels
