"""Tokenized examples as the loader reads them: token ids, and which of them are scored (masked and predicted).

Three views share one interface (``len``, ``example(i) -> (ids, scored)``, ``lengths(ids)``, ``num_tokens``,
``counts``, ``fingerprint()``):

- :class:`TokenizedData`: SFT examples, example ``i`` = ``tokens[offsets[i]:offsets[i + 1]]`` with its ``scored``
  flags (response and EOS, or assistant turns; the rest is prompt, never masked);
- :class:`TokenBlocks`: pretraining, block ``i`` = ``tokens[i T:(i + 1) T]`` of one token stream, every token
  scored; the incomplete tail is dropped and counted;
- :class:`Concatenation`: several sources' examples one after another, with their mixture weights.

Token ids live in a :class:`TokenArray`: pieces (memory-mapped shard files of a token store, ``data/store.py``, or
arrays) read by slices, so nothing is loaded until a batch asks for it, and every rank of a node reads the same
pages of the page cache.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


class TokenArray:
    """One sequence stored as consecutive pieces; ``read(start, stop)`` copies a slice out (across pieces)."""

    def __init__(self, pieces: Sequence[np.ndarray]):
        self.pieces = [p for p in pieces if len(p)]
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.pieces], dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        piece = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            lo = start - int(self.starts[piece])
            hi = min(stop, int(self.starts[piece + 1])) - int(self.starts[piece])
            parts.append(np.asarray(self.pieces[piece][lo:hi]))
            start += hi - lo
            piece += 1
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def digest(self) -> str:
        h = hashlib.sha256()
        for piece in self.pieces:
            h.update(str(piece.dtype).encode())
            h.update(memoryview(np.ascontiguousarray(piece)).cast("B"))
        return h.hexdigest()


@dataclass
class TokenizedData:
    """SFT examples; ``identity`` names the stored data (a token store's key), so ranks can compare it cheaply."""

    tokens: TokenArray
    offsets: np.ndarray
    scored: TokenArray
    counts: Counter = field(default_factory=Counter)
    identity: str | None = None

    @classmethod
    def from_arrays(cls, tokens: np.ndarray, offsets: np.ndarray, scored: np.ndarray,
                    counts: Counter | None = None) -> TokenizedData:
        return cls(TokenArray([np.asarray(tokens)]), np.asarray(offsets, dtype=np.int64),
                   TokenArray([np.asarray(scored, dtype=bool)]), counts or Counter())

    @classmethod
    def from_prompt_lens(cls, tokens: np.ndarray, offsets: np.ndarray, prompt_lens: Sequence[int],
                         counts: Counter | None = None) -> TokenizedData:
        """Examples whose first ``prompt_lens[i]`` tokens are prompt and the rest scored."""
        offsets = np.asarray(offsets, dtype=np.int64)
        position = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], np.diff(offsets))
        return cls.from_arrays(tokens, offsets, position >= np.repeat(np.asarray(prompt_lens), np.diff(offsets)),
                               counts)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (int64) and scored flags (bool) of example ``i``."""
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens.read(start, stop).astype(np.int64), self.scored.read(start, stop).astype(bool)

    def lengths(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return self.offsets[ids + 1] - self.offsets[ids]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def fingerprint(self) -> str:
        if self.identity is not None:
            return self.identity
        return hashlib.sha256(f"{self.tokens.digest()}/{self.scored.digest()}/".encode()
                              + np.asarray(self.offsets, dtype=np.int64).tobytes()).hexdigest()


@dataclass
class TokenBlocks:
    """Pretraining blocks of ``seq_len`` tokens cut from one token stream; the tail is dropped and counted."""

    tokens: TokenArray
    seq_len: int
    counts: Counter = field(default_factory=Counter)
    identity: str | None = None

    def __post_init__(self):
        self.counts = Counter(self.counts)
        self.counts["tail tokens dropped"] += len(self.tokens) - len(self) * self.seq_len

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.tokens.read(i * self.seq_len, (i + 1) * self.seq_len).astype(np.int64)
        return ids, np.ones(len(ids), dtype=bool)

    def lengths(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return np.full(len(ids), self.seq_len, dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len

    def fingerprint(self) -> str:
        return f"{self.identity or self.tokens.digest()}/{self.seq_len}"


class Concatenation:
    """Several sources' examples one after another: source ``s`` holds examples ``[starts[s], starts[s + 1])``.
    ``weights`` are the sources' mixture weights (``data/stream.py``), or None: one set, each example once per
    epoch."""

    def __init__(self, parts: Sequence[TokenizedData | TokenBlocks], weights: Sequence[float] | None = None):
        self.parts, self.weights = list(parts), None if weights is None else [float(w) for w in weights]
        self.sizes = [len(p) for p in self.parts]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        return part, i - int(self.starts[part])

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        part, j = self._locate(i)
        return self.parts[part].example(j)

    def lengths(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        part = np.searchsorted(self.starts, ids, side="right") - 1
        out = np.zeros(len(ids), dtype=np.int64)
        for p in np.unique(part):
            chosen = part == p
            out[chosen] = self.parts[p].lengths(ids[chosen] - self.starts[p])
        return out

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)

    @property
    def counts(self) -> Counter:
        return sum((Counter(p.counts) for p in self.parts), Counter())

    def fingerprint(self) -> str:
        return hashlib.sha256("|".join([p.fingerprint() for p in self.parts] + [str(self.weights)]).encode()
                              ).hexdigest()


Examples = TokenizedData | TokenBlocks | Concatenation
