"""Packed SFT rows (``data.packing``): several records per row of ``seq_len`` tokens, none split.

**Which records share a row.** The data stream (``data/stream.py``: one keyed permutation per epoch; for a
weighted mixture of sources an "epoch" here is one of its windows) is cut into rows epoch by epoch by first-fit
over a window of ``window`` open rows: each record, in stream order, goes to the first open row with room; when
none has room, the oldest open row is emitted and a new one opened; the epoch's last open rows are emitted at
its end. Row ``j`` of the packed stream is therefore a pure function of (seed, data, j): a resume needs only the
step, and every world size sees the same rows.
Optimiser step ``k`` takes rows ``[k R, (k + 1) R)`` with ``R = micro x accumulation x world`` (micro-batch =
rows), and micro-step ``a`` of rank ``r`` the ``micro`` rows of group ``a W + r``, as unpacked batches do.

**What a record keeps.** Its stream position stays its noise key, so it gets the same t, masks and importance
weight as unpacked; it attends only to itself (document ids, ``models/modeling_mdm.build_attention_mask``);
rotary positions restart at 0; and its loss keeps its own answer-length normalisation 1/n_b. So every
per-record loss l_b equals the unpacked one (``tests/test_packing.py``).

**The batch mean.** Unpacked, a step's loss is (1/G) sum_b l_b over its G records. A packed step holds a
variable number N_k of records (more when they are short), and (1/N_k) sum_b l_b would be biased: the records
of crowded steps would weigh less. Instead each record is divided by the *expected* number of records per
micro-batch of its epoch, ``micro x n_e`` with ``n_e = N_e / P_e`` the records per row of its epoch e (N_e records in
P_e rows): the micro-batch loss is sum_b l_b / (micro n_e). DeepSpeed averages over accumulation and ranks,
so step k's gradient is (1/(R n_e)) sum_{b in step k} grad l_b, and the sum over the P_e / R steps of an
epoch is (P_e / (R N_e)) sum_b grad l_b = (number of steps) x the mean gradient over the epoch's records:
each record counts exactly once with weight 1/N_e, so a uniformly chosen step is an unbiased estimate of the
same objective, the mean of l over sequences.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mdm_scale.core.batch import Batch
from mdm_scale.data.examples import Examples


def pack_rows(lengths: list[int], seq_len: int, window: int) -> list[list[int]]:
    """First-fit over ``window`` open rows: lists of indices into ``lengths`` (in placement order)."""
    open_rows: list[tuple[list[int], list[int]]] = []  # ([used tokens], members)
    emitted: list[list[int]] = []
    for index, length in enumerate(lengths):
        for used, members in open_rows:
            if used[0] + length <= seq_len:
                used[0] += length
                members.append(index)
                break
        else:
            if len(open_rows) == window:
                emitted.append(open_rows.pop(0)[1])
            open_rows.append(([length], [index]))
    return emitted + [members for _, members in open_rows]


class PackedStream:
    """Packed row ``j`` -> (stream positions of its records, records per row of its epoch); ``lengths`` maps
    example ids to their lengths."""

    def __init__(self, stream, lengths: Callable[[list[int]], np.ndarray], seq_len: int, window: int = 8):
        self.stream, self.lengths, self.seq_len, self.window = stream, lengths, seq_len, window
        self._first_row = [0]  # first packed row of each epoch packed so far
        self._epoch: tuple[int, list[list[int]], float] | None = None

    def rows(self, start: int, stop: int) -> list[tuple[list[int], float]]:
        return [self._row(j) for j in range(start, stop)]

    def _row(self, j: int) -> tuple[list[int], float]:
        while self._first_row[-1] <= j:  # pack epochs until row j is inside one
            self._pack(len(self._first_row) - 1)
        epoch = int(np.searchsorted(self._first_row, j, side="right")) - 1
        _, rows, per_row = self._pack(epoch)
        return rows[j - self._first_row[epoch]], per_row

    def _pack(self, epoch: int) -> tuple[int, list[list[int]], float]:
        if self._epoch is None or self._epoch[0] != epoch:
            size = self.stream.size
            positions = range(epoch * size, (epoch + 1) * size)
            examples = self.stream.example_ids(positions)
            rows = pack_rows(self.lengths(examples).tolist(), self.seq_len, self.window)
            self._epoch = (epoch, [[positions[i] for i in row] for row in rows], size / len(rows))
            if epoch == len(self._first_row) - 1:
                self._first_row.append(self._first_row[-1] + len(rows))
        return self._epoch


def collate_packed(data: Examples, rows: list[list[int]], example_ids: list[list[int]], per_row: list[float],
                   pad_id: int, seq_len: int):
    """A packed micro-batch: rows of exactly ``seq_len`` tokens (fixed shapes), records left-aligned one after
    the other, the rest padding. ``rows[i]`` are the stream positions (noise keys) of row i's records and
    ``example_ids[i]`` their examples; ``per_row[i]`` is the records per row of row i's epoch."""
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((len(rows), seq_len), dtype=torch.bool)
    document_ids = torch.full((len(rows), seq_len), -1, dtype=torch.int64)
    position_ids = torch.zeros((len(rows), seq_len), dtype=torch.int64)
    sample_index, record_row, record_offset, record_length = [], [], [], []
    for row, (positions, examples) in enumerate(zip(rows, example_ids)):
        offset = 0
        for position, example in zip(positions, examples):
            ids, scored = data.example(example)
            stop = offset + len(ids)
            input_ids[row, offset:stop] = torch.from_numpy(ids)
            loss_mask[row, offset:stop] = torch.from_numpy(scored)
            document_ids[row, offset:stop] = len(sample_index)
            position_ids[row, offset:stop] = torch.arange(len(ids))
            sample_index.append(position)
            record_row.append(row)
            record_offset.append(offset)
            record_length.append(len(ids))
            offset = stop
    real = document_ids >= 0
    return Batch(input_ids=input_ids, loss_mask=loss_mask, sample_index=torch.tensor(sample_index),
                 attention_mask=None if bool(real.all()) else real, document_ids=document_ids,
                 position_ids=position_ids, record_row=torch.tensor(record_row),
                 record_offset=torch.tensor(record_offset), record_length=torch.tensor(record_length),
                 loss_denominator=len(rows) * torch.tensor(per_row, dtype=torch.float32)[torch.tensor(record_row)])


def record_view(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each record of a packed batch as its own left-aligned row: ids and loss mask ``(N, W)``, W the longest
    record (what the unpacked collate gives, up to padding width)."""
    width = int(batch.record_length.max())
    cols = torch.arange(width)
    inside = cols[None, :] < batch.record_length[:, None]
    length = batch.input_ids.shape[1]
    flat = (batch.record_row[:, None] * length + (batch.record_offset[:, None] + cols[None, :]).clamp(max=length - 1)
            ).reshape(-1)

    def view(x: torch.Tensor) -> torch.Tensor:  # index_select: see diffusion/objective.py's take
        return x.reshape(-1).index_select(0, flat).view(inside.shape)

    return view(batch.input_ids).masked_fill(~inside, 0), view(batch.loss_mask) & inside
