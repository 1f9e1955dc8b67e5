"""Which examples each rank trains on, and how they become padded tensors.

The data is one endless stream: stream position ``s`` is example ``perm_e[s mod N]`` of epoch ``e = s // N``,
with ``perm_e`` a permutation keyed by (seed, epoch). Optimiser step ``k`` consumes positions
``[k G, (k+1) G)`` with ``G = micro x accumulation x world``, split into ``accumulation x world`` groups of
``micro``: micro-step ``a`` of rank ``r`` takes group ``a W + r``. The groups are consecutive positions, or, with
``group_by_length``, the step's samples sorted by length (ties by position), so that a micro-batch holds
sequences of similar length and little padding. The stream position is also the sample's noise key
(``core/noise.py``), so the set of (example, noise) pairs per step, and its split into groups, is the same
for every world size with the same global batch, and a resume only needs the step number.

``set_micro_batch`` changes the sequences per micro-batch from a given step on (``variance.masks: auto`` halves
them while MIRROR is on): stream positions stay consecutive, so step k starts where step k - 1 ended, and the
layout (the list of changes, which the trainer restores from its checkpoint) fixes every step's positions.
"""

from __future__ import annotations

import math

import torch

from mdm_scale.core.batch import Batch
from mdm_scale.core.noise import Stream, keyed_generator
from mdm_scale.data.dataset import TokenizedData
from mdm_scale.data.packing import PackedStream, collate_packed


class DataStream:
    """Stream position -> example index, reshuffled each epoch with a permutation keyed by (seed, epoch)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self._epoch, self._perm = -1, None

    def example_ids(self, positions: range) -> list[int]:
        out = []
        for s in positions:
            epoch, offset = divmod(s, self.size)
            if not self.shuffle:
                out.append(offset)
                continue
            if epoch != self._epoch:
                self._perm = torch.randperm(self.size, generator=keyed_generator(self.seed, Stream.DATA_ORDER,
                                                                                 epoch)).tolist()
                self._epoch = epoch
            out.append(self._perm[offset])
        return out


def collate(data: TokenizedData, example_ids: list[int], sample_index: list[int], pad_id: int,
            pad_to_multiple_of: int, seq_len: int) -> Batch:
    examples = [data.example(i) for i in example_ids]
    longest = max(len(ids) for ids, _ in examples)
    width = min(seq_len, math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of) if longest < seq_len \
        else longest
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    real = torch.zeros((len(examples), width), dtype=torch.bool)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.from_numpy(ids)
        real[row, :len(ids)] = True
        loss_mask[row, prompt_len:len(ids)] = True
    return Batch(input_ids=input_ids, loss_mask=loss_mask, sample_index=torch.tensor(sample_index),
                 attention_mask=None if bool(real.all()) else real)


class TrainLoader:
    """Micro-batches of the training stream for one rank (``packing``: rows of packed records,
    ``data/packing.py``)."""

    def __init__(self, data: TokenizedData, seed: int, rank: int, world: int, micro_batch: int, grad_accum: int,
                 pad_id: int, pad_to_multiple_of: int, seq_len: int, group_by_length: bool = False,
                 packing: bool = False):
        self.data, self.rank, self.world = data, rank, world
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.pad_id, self.pad_to_multiple_of, self.seq_len = pad_id, pad_to_multiple_of, seq_len
        self.group_by_length = group_by_length
        self.stream = DataStream(len(data), seed)
        self.packed = PackedStream(self.stream, data.offsets[1:] - data.offsets[:-1], seq_len) if packing else None
        self._step_plan: tuple[int, list[int], list[int]] | None = None
        self._layout = [(0, 0, micro_batch)]  # (first step, its first stream position, sequences per micro-batch)

    def set_micro_batch(self, from_step: int, micro_batch: int) -> None:
        """Micro-batches of ``micro_batch`` sequences from optimiser step ``from_step`` (0-based) on."""
        first_step, first_position, current = self._layout[-1]
        if from_step < first_step:
            raise ValueError(f"micro-batch changes must come in step order ({from_step} < {first_step})")
        if micro_batch != current:
            start = first_position + (from_step - first_step) * current * self.grad_accum * self.world
            self._layout.append((from_step, start, micro_batch))
            self._step_plan = None

    def _span(self, step: int) -> tuple[int, int]:
        """(first stream position, sequences per micro-batch) of optimiser step ``step``."""
        for first_step, first_position, micro in reversed(self._layout):
            if step >= first_step:
                return first_position + (step - first_step) * micro * self.grad_accum * self.world, micro
        raise ValueError(f"step {step} < 0")

    def micro_batch_at(self, step: int, micro: int) -> Batch:
        group = micro * self.world + self.rank
        if self.packed is not None:
            first = (step * self.grad_accum * self.world + group) * self.micro_batch
            rows, per_row = zip(*self.packed.rows(first, first + self.micro_batch))
            examples = [self.stream.example_ids(row) for row in rows]
            return collate_packed(self.data, list(rows), examples, list(per_row), self.pad_id, self.seq_len)
        positions, examples = self._plan(step)
        size = self._span(step)[1]
        start = group * size
        mine = slice(start, start + size)
        return collate(self.data, examples[mine], positions[mine], self.pad_id, self.pad_to_multiple_of,
                       self.seq_len)

    def _plan(self, step: int) -> tuple[list[int], list[int]]:
        """The step's stream positions and example ids in group order (computed once per step)."""
        if self._step_plan is None or self._step_plan[0] != step:
            first, micro = self._span(step)
            size = micro * self.grad_accum * self.world
            positions = list(range(first, first + size))
            examples = self.stream.example_ids(range(positions[0], positions[-1] + 1))
            if self.group_by_length:
                lengths = self.data.offsets[1:] - self.data.offsets[:-1]
                order = sorted(range(size), key=lambda j: (int(lengths[examples[j]]), j))
                positions, examples = [positions[j] for j in order], [examples[j] for j in order]
            self._step_plan = (step, positions, examples)
        return self._step_plan[1], self._step_plan[2]


def eval_batches(data: TokenizedData, rank: int, world: int, micro_batch: int, max_samples: int, pad_id: int,
                 pad_to_multiple_of: int, seq_len: int):
    """This rank's share of the first ``max_samples`` eval examples (all if 0), in fixed order.

    Every rank runs the same number of micro-batches (ZeRO-3 needs every rank in every forward), so the last
    ones are filled by wrapping around and marked ``valid = False``.
    """
    total = len(data) if max_samples == 0 else min(max_samples, len(data))
    per_round = micro_batch * world
    for round_ in range(math.ceil(total / per_round)):
        start = round_ * per_round + rank * micro_batch
        positions = list(range(start, start + micro_batch))
        batch = collate(data, [p % total for p in positions], positions, pad_id, pad_to_multiple_of, seq_len)
        batch.valid = torch.tensor([p < total for p in positions])
        yield batch
