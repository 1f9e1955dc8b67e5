"""Block-wise approximate key/value cache for masked-diffusion decoding (Fast-dLLM, Wu et al. 2025, arXiv 2505.22618).

Decoding fills the answer window block by block (``generation/sampler.py``), and every step of a block used to
run the model on the whole sequence although only the current block changes. The cache records, at the first
step of a block (the *refresh*: an ordinary full forward), every layer's keys and values (rotary applied, before
any grouped-query repetition) at every position. The block's later steps forward only a slice of positions
[s, e) (``query_start = s``); in every layer l, attention then uses

    K_l(j) = K_l(j) of this forward       for s <= j < e   (computed from the current tokens)
             K_l(j) of the refresh        otherwise       (the same for V)

for all positions j of the recorded sequence, and the slice's queries attend over all of them. The slice's fresh
keys and values are written into the recorded tensors in place (the slice is recomputed at every step, so what
was there is never read again), which costs no copy of the cached part.

The sampler picks the slice: the *prefix cache* forwards [a, L) (the block from a and everything after it,
reusing the prefix [0, a)); the *dual cache* forwards only the block [a, b) and reuses the suffix [b, L) too.
The refresh also keeps the rotary tables of the recorded positions, which the slices' forwards cut instead of
building them again.

The cache serves forwards without autograd (``torch.no_grad()``): with it, each slice's in-place write would hang
that forward's graph, with every activation it saved, on the recorded tensors until the cache is dropped, so the
memory of a block's steps would add up. ``exchange`` refuses keys or values that require grad.

The cache is approximate: in a bidirectional model the hidden state of a prefix position, hence its keys and
values from the second layer on, depends on every position, including the block that the steps change. It is
exact where the reused keys and values cannot have changed since the refresh: at the refresh itself, and in a
model of one layer, whose keys and values at a position are a function of that position's token alone (the
prompt never changes, and the suffix stays [MASK] while a block is decoded). ``tests/test_generation.py``
checks both, and checks a cached forward of a deep model against the semantics above computed without the cache.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer at every position of one recorded forward, ``(B, H_kv, L, head_dim)``.

    Built empty; the forward that receives an empty cache records into it (``recording``). A later forward with
    ``query_start = s`` and a slice of n input positions calls ``exchange`` in every layer, which writes the
    slice's keys and values over positions [s, s + n) and returns the whole recorded keys and values.
    """

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        """cos/sin tables of the recorded positions (set by the recording forward, ``MDMModel.forward``)."""
        self.query_start = 0
        self.recording = True

    @property
    def length(self) -> int:
        """Positions recorded (0 while empty)."""
        return self.keys[0].shape[2] if self.keys else 0

    def begin(self, query_start: int, query_length: int) -> None:
        """Called by the model before a forward of positions [query_start, query_start + query_length)."""
        if self.recording and self.keys:
            self.recording = False
        if self.recording:
            if query_start != 0:
                raise ValueError(f"an empty KVCache records a full forward: query_start must be 0, got {query_start}")
        elif query_start + query_length > self.length:
            raise ValueError(f"positions [{query_start}, {query_start + query_length}) outside the {self.length} "
                             f"recorded positions")
        self.query_start = query_start

    def exchange(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values that layer ``layer``'s queries attend to, given the forwarded positions' own."""
        if k.requires_grad or v.requires_grad:
            raise ValueError("the decoding KV cache serves forwards without autograd: run them under torch.no_grad()")
        if self.recording:
            self.keys.append(k.contiguous())
            self.values.append(v.contiguous())
            return k, v
        keys, values = self.keys[layer], self.values[layer]
        end = self.query_start + k.shape[2]
        keys[:, :, self.query_start:end] = k
        values[:, :, self.query_start:end] = v
        return keys, values
