"""Counter-based random numbers keyed by (seed, global sample index, stream, position).

Every random draw of the diffusion objective (t, masks, ...) is a pure function of its key, never of the rank
or of how many draws happened before. So a sample gets the same noise on 1 or 64 GPUs, after a resume, and
on CPU or GPU (the hash is integer arithmetic, identical on every device). docs/spec.md section 8 describes the
per-rank seeding of the official code that this replaces.

The hash is Wellons' ``lowbias32`` integer finaliser, chained over the key words in int64 tensors whose values
stay below 2^32 (so products stay below 2^63 and nothing overflows). Uniforms are taken on the midpoint grid
``(k + 0.5) / 2^24``, which makes ``u`` and ``1 - u`` exactly equally distributed: MIRROR's two masks
``{u < pi}`` and ``{u > 1 - pi}`` then have exactly the same marginal probability.
"""

from __future__ import annotations

from enum import IntEnum

import torch

_M32 = 0xFFFFFFFF


class Stream(IntEnum):
    """Independent random streams per sample. Add new members at the end: values are part of the noise key."""

    T = 1  # masking rate t
    MASK = 2  # per-token mask uniforms
    EVAL_T = 3
    EVAL_MASK = 4
    DATA_ORDER = 5  # epoch permutations of the data stream
    PPOTS_MASK = 6  # masks of the P-POTS offline estimate (training/ppots_estimate.py)
    PROBE_SELECT = 7  # which sequences the online variance probe measures (diffusion/online_variance.py)
    PROBE_MASK = 8  # the probe's independent second mask at the training t
    PROBE_T = 9  # the probe's independent second masking rate
    PROBE_T_MASK = 10  # the probe's mask at that second rate
    DATA_MIX = 11  # which source each stream position of a weighted mixture draws from (data/stream.py)
    HELDOUT = 12  # which records data.eval_fraction holds out (data/cache.py)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijection of [0, 2^32) with strong avalanche. ``x`` is int64 with values < 2^32."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _absorb(h: torch.Tensor, word) -> torch.Tensor:
    return mix32(h ^ word)


def key_hash(seed: int, sample_index: torch.Tensor, stream: int) -> torch.Tensor:
    """One 32-bit state per sample from (seed, sample index, stream); ``sample_index`` is int64 (B,)."""
    idx = sample_index.to(torch.int64)
    h = torch.full_like(idx, 0x9E3779B9)
    for word in (seed & _M32, (seed >> 32) & _M32, stream & _M32):
        h = _absorb(h, word)
    h = _absorb(h, idx & _M32)
    return _absorb(h, (idx >> 32) & _M32)


def keyed_uniform(seed: int, sample_index: torch.Tensor, stream: int, width: int | None = None) -> torch.Tensor:
    """Uniform(0, 1) float32 draws: shape (B,) if ``width`` is None, else (B, width), one per position."""
    h = key_hash(seed, sample_index, stream)
    if width is None:
        return _to_unit(mix32(h ^ 0x68E31DA4))
    positions = torch.arange(width, dtype=torch.int64, device=h.device)
    return _to_unit(mix32(mix32(h[:, None] ^ positions[None, :]) ^ 0x1B56C4E9))


def _to_unit(h: torch.Tensor) -> torch.Tensor:
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def keyed_generator(seed: int, *words: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from a key (for permutations, which need a sequential RNG)."""
    h = torch.tensor([0x9E3779B9], dtype=torch.int64)
    for word in (seed & _M32, (seed >> 32) & _M32, *words):
        h = _absorb(h, word & _M32)
    return torch.Generator().manual_seed(int(h.item()))
