"""A seeded random projection of the full gradient: a signed bucket sum, computed parameter by parameter.

Gradient element i of parameter p goes to bucket b(p, i) = (o_p + i) mod d with a keyed offset o_p, multiplied
by a random sign s(p, i) in {-1, +1}: S(g)_b = sum_{(p, i) in bucket b} s(p, i) g_{p,i}. The signs of p are
drawn by a torch generator on the gradient's device seeded from (seed, name of p), so they are the same on
every rank and world size (GPU and CPU generators differ, so a CPU and a GPU run use different projections). Because the
signs are independent with mean 0, E_s <S(x), S(y)> = <x, y> for any fixed x, y whatever the buckets are, so
squared norms and variances (traces) of sketched gradients are unbiased for those of the full gradient; their
relative error is about sqrt(2/d) when no bucket holds much of the energy (consecutive elements of a row land
in different buckets; a prime d spreads matrix columns). docs/spec.md section 2.1 suggests d ~ 1e3-1e4. Buckets are
contiguous, so the sketch is one sign draw and a dense reshape-and-sum per chunk, with no scattered atomic adds.

The sketch is taken in tensor hooks on the parameters, which see each parameter's gradient of *this rank's*
backward pass before DeepSpeed reduces it across ranks. Under ZeRO-3 the hook receives the gathered (full)
parameter's gradient, so each rank sketches the gradient of its own samples with no extra communication and the
whole gradient never exists at once; only the d-vector sketches are all-gathered. Offsets and signs depend on
the parameter's name, so the projection is the same on every rank, world size and ZeRO stage.
"""

from __future__ import annotations

import functools
import zlib

import torch
from torch import nn

from mdm_scale.core.noise import mix32

_M32 = 0xFFFFFFFF
_CHUNK = 1 << 22


class GradientSketch:
    """Accumulates S(grad) over every backward pass run while ``active``; ``take()`` returns and resets it."""

    def __init__(self, model: nn.Module, dim: int, seed: int, device: torch.device):
        self.dim, self.seed, self.device = dim, seed, device
        self.sketch = torch.zeros(dim, dtype=torch.float64, device=device)
        self.active = False
        self._handles = [param.register_hook(self._hook(name)) for name, param in model.named_parameters()
                         if param.requires_grad]

    def _hook(self, name: str):
        def add(grad: torch.Tensor) -> None:
            if self.active:
                self.add(name, grad)

        return add

    @torch.no_grad()
    def add(self, name: str, grad: torch.Tensor) -> None:
        """Add S(grad) for the gradient ``grad`` of the parameter called ``name``."""
        key = _parameter_key(name, self.seed)
        generator = torch.Generator(device=grad.device).manual_seed(key)
        flat = grad.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            part = flat[start:start + _CHUNK]
            sign = torch.randint(0, 2, part.shape, generator=generator, device=part.device, dtype=torch.int8)
            shift = (key + start) % self.dim
            width = -(-(shift + part.numel()) // self.dim) * self.dim
            padded = torch.zeros(width, dtype=torch.float64, device=part.device)
            padded[shift:shift + part.numel()] = part.to(torch.float64) * (sign.to(torch.float64) * 2.0 - 1.0)
            self.sketch += padded.view(-1, self.dim).sum(0).to(self.device)

    def take(self) -> torch.Tensor:
        out, self.sketch = self.sketch, torch.zeros_like(self.sketch)
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@functools.cache
def _parameter_key(name: str, seed: int) -> int:
    """The keyed sign stream and bucket offset of parameter ``name`` (computed once per name, not per backward)."""
    return int(mix32(torch.tensor(zlib.crc32(name.encode()) ^ (seed & _M32))).item())
