"""The data order: which example each position of the endless training stream holds, as a pure function of the
seed and the position (so it is the same for every world size, and a resume needs only the step).

- One set of examples (one source, or several without weights): position ``s`` is example ``perm_e[s mod N]`` of
  epoch ``e = s // N``, ``perm_e`` a permutation keyed by (seed, epoch) (:class:`DataStream`).
- A weighted mixture of sources (:class:`MixtureStream`): the stream is cut into windows of ``W = 65,536``
  positions; source ``i`` gets ``n_i`` positions of every window, its weight's share of ``W`` (rounded by
  largest remainder, so the ``n_i`` sum to ``W``), and which positions is a permutation keyed by (seed, window).
  The ``j``-th position of source ``i`` in window ``w`` takes draw ``k = w n_i + j`` of that source's own stream,
  a :class:`DataStream` keyed by (seed, source): every example of a source is drawn once per pass over it, in a
  fresh order each pass, a small source repeating and a large one continuing where it left off. The realised
  mixture is exact in every window, not only on average.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from mdm_scale.core.noise import Stream, keyed_generator
from mdm_scale.data.examples import Concatenation


class DataStream:
    """Stream position -> example index, reshuffled each epoch with a permutation keyed by (seed, epoch) (and
    ``key``, the source's number inside a mixture). ``size`` positions make an epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, key: tuple[int, ...] = ()):
        self.size, self.seed, self.shuffle, self.key = size, seed, shuffle, key
        self._epoch, self._perm = -1, None

    def example_ids(self, positions: Iterable[int]) -> list[int]:
        return [self.example_id(s) for s in positions]

    def example_id(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            generator = keyed_generator(self.seed, Stream.DATA_ORDER, epoch, *self.key)
            self._perm = torch.randperm(self.size, generator=generator).numpy()
            self._epoch = epoch
        return int(self._perm[offset])


class MixtureStream:
    """A weighted mixture of sources of ``sizes`` examples (source ``i`` holds the examples from
    ``sum(sizes[:i])`` on); ``size`` is the window, which packing treats as its epoch."""

    WINDOW = 1 << 16

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        self.seed, self.size = seed, self.WINDOW
        self.quotas = largest_remainder(weights, self.WINDOW)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.sources = [DataStream(n, seed, key=(i,)) for i, n in enumerate(sizes)]
        self._window: tuple[int, np.ndarray, np.ndarray] | None = None

    def example_ids(self, positions: Iterable[int]) -> list[int]:
        out = []
        for s in positions:
            window, offset = divmod(s, self.size)
            labels, ranks = self._layout(window)
            source = int(labels[offset])
            draw = window * int(self.quotas[source]) + int(ranks[offset])
            out.append(int(self.starts[source]) + self.sources[source].example_id(draw))
        return out

    def _layout(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Each position's source in the window, and how many earlier positions of the window it already had."""
        if self._window is None or self._window[0] != window:
            order = torch.randperm(self.size, generator=keyed_generator(self.seed, Stream.DATA_MIX, window)).numpy()
            labels = np.repeat(np.arange(len(self.quotas)), self.quotas)[order]
            by_source = np.argsort(labels, kind="stable")
            ranks = np.empty(self.size, dtype=np.int64)
            ranks[by_source] = np.arange(self.size) - np.repeat(np.cumsum(self.quotas) - self.quotas, self.quotas)
            self._window = (window, labels, ranks)
        return self._window[1], self._window[2]


def largest_remainder(weights: Sequence[float], total: int) -> np.ndarray:
    """Integers proportional to ``weights`` that sum to ``total`` (Hamilton's method; ties to the first)."""
    exact = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[:total - int(counts.sum())]] += 1
    return counts


def data_stream(data, seed: int) -> DataStream | MixtureStream:
    """The stream of ``data``: a mixture when it is a weighted :class:`Concatenation` of several sources."""
    if isinstance(data, Concatenation) and data.weights is not None and len(data.parts) > 1:
        return MixtureStream(data.sizes, data.weights, seed)
    return DataStream(len(data), seed)
