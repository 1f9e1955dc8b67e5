"""A seeded random projection of the full gradient: a signed bucket sum, computed parameter by parameter.

Gradient element i of parameter p goes to bucket b(p, i) = (o_p + i) mod d with a keyed offset o_p, multiplied
by a keyed random sign s(p, i) in {-1, +1}: S(g)_b = sum_{(p, i) in bucket b} s(p, i) g_{p,i}. Because the
signs are independent with mean 0, E_s <S(x), S(y)> = <x, y> for any fixed x, y whatever the buckets are, so
squared norms and variances (traces) of sketched gradients are unbiased for those of the full gradient; their
relative error is about sqrt(2/d) when no bucket holds much of the energy (consecutive elements of a row land
in different buckets; a prime d spreads matrix columns). SPEC section 2.1 suggests d ~ 1e3-1e4. Buckets are
contiguous, so the sketch is a dense reshape-and-sum with no scattered atomic adds (fast on GPU).

The sketch is taken in tensor hooks on the parameters, which see each parameter's gradient of *this rank's*
backward pass before DeepSpeed reduces it across ranks. Under ZeRO-3 the hook receives the gathered (full)
parameter's gradient, so each rank sketches the gradient of its own samples with no extra communication and the
whole gradient never exists at once; only the d-vector sketches are all-gathered. Offsets and signs depend on
the parameter's name, so the projection is the same on every rank, world size and ZeRO stage.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from mdm_scale.diffusion.noise import mix32

_M32 = 0xFFFFFFFF
_CHUNK = 1 << 22


class GradientSketch:
    """Accumulates S(grad) over every backward pass run while ``active``; ``take()`` returns and resets it."""

    def __init__(self, model: nn.Module, dim: int, seed: int, device: torch.device):
        self.dim, self.device = dim, device
        self.sketch = torch.zeros(dim, dtype=torch.float64, device=device)
        self.active = False
        self._handles = []
        for name, param in model.named_parameters():
            if param.requires_grad:
                key = int(mix32(torch.tensor(zlib.crc32(name.encode()) ^ (seed & _M32))).item())
                self._handles.append(param.register_hook(self._hook(key, key % dim)))

    def _hook(self, key: int, offset: int):
        def add(grad: torch.Tensor) -> None:
            if self.active:
                self.add(key, offset, grad)

        return add

    @torch.no_grad()
    def add(self, key: int, offset: int, grad: torch.Tensor) -> None:
        flat = grad.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start:start + _CHUNK]
            index = torch.arange(start, start + part.numel(), dtype=torch.int64, device=part.device)
            sign = (mix32(mix32(index ^ key) ^ 0x2C1B3C6D) >> 31).to(torch.float64) * 2.0 - 1.0
            shift = (offset + start) % self.dim
            width = -(-(shift + part.numel()) // self.dim) * self.dim
            padded = torch.zeros(width, dtype=torch.float64, device=part.device)
            padded[shift:shift + part.numel()] = part.to(torch.float64) * sign
            self.sketch += padded.view(-1, self.dim).sum(0).to(self.device)

    def take(self) -> torch.Tensor:
        out, self.sketch = self.sketch, torch.zeros_like(self.sketch)
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
