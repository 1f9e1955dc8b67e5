"""Training objectives: turn a clean micro-batch into model inputs with per-token loss weights.

MDM (docs/spec.md section 1). For sequence b with eligible positions R_b (n_b = |R_b|), masking rate t_b ~ p with
importance weight w_b = 1/p(t_b), and corrupted rows r of b (one, or two for MIRROR) with row shares s_r:

    l_b  = w_b * sum_r s_r * (1/n_b) * sum_{i in R_b} M_ri * CE_ri / q_ri          (q_ri = P(M_ri = 1) = pi(t_b))
    loss = (1/B) * sum_b l_b

so each masked token enters the model's fused head with coefficient ``w_b s_r / (q_ri n_b B)``. Packed rows
(``data/packing.py``) give every record the same l_b, drawn on its own left-aligned view, and divide by the
batch's ``loss_denominator`` (the expected number of records) instead of B. Sequences with
no masked token contribute 0 and are still run (ZeRO-3 needs every rank in every forward). Everything here is
computed on the host from keyed noise (no device synchronisation) and moved to the device once.

ARM (the autoregressive baseline): the same data, causal attention, and the next-token loss
``(1/B) sum_b (1/n_b) sum_{i in R_b} CE(x_i | x_<i)``, with position i-1 predicting token i.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import cached_property

import torch

from mdm_scale.core.batch import Batch
from mdm_scale.core.noise import Stream
from mdm_scale.data.packing import record_view
from mdm_scale.diffusion.masks import BernoulliMasks
from mdm_scale.diffusion.t_samplers import TSampler


@dataclass
class NoisyBatch:
    """Model inputs (``MODEL_FIELDS``) plus what statistics need to map token losses back to sequences.

    R corrupted rows (one per sequence, two with MIRROR) are what the statistics see; the model sees them as
    R_model rows: the same rows unpacked, or packed rows holding several records each (``data/packing.py``).
    """

    input_ids: torch.Tensor  # (R_model, L); R_model = R unpacked
    attention_mask: torch.Tensor | None  # (R_model, L) bool, None when unpadded
    loss_positions: torch.Tensor  # (N,) flat indices into the (R_model, L) batch
    loss_targets: torch.Tensor  # (N,)
    loss_coef: torch.Tensor  # (N,) float32
    document_ids: torch.Tensor | None  # (R_model, L) packed rows only (data/packing.py)
    position_ids: torch.Tensor | None  # (R_model, L) packed rows only
    token_row: torch.Tensor  # (N,) corrupted row (one per sequence and mask copy) of each loss position
    token_scale: torch.Tensor  # (N,) 1 / (q n_b): row loss = sum over the row of token_scale * CE
    row_sample: torch.Tensor  # (R,) sequence of each row
    row_scale: torch.Tensor  # (R,) share of the sequence's loss carried by each row
    t: torch.Tensor  # (B,) masking rate (0 for ARM)
    weight: torch.Tensor  # (B,) importance weight, 0 for filler rows
    eligible_tokens: int
    rows: int

    MODEL_FIELDS = ("input_ids", "attention_mask", "loss_positions", "loss_targets", "loss_coef")
    PACKED_FIELDS = ("document_ids", "position_ids")

    def model_inputs(self) -> dict[str, torch.Tensor | None]:
        """The forward's keyword arguments; the packed-row fields only when set (built-in model only)."""
        inputs = {name: getattr(self, name) for name in self.MODEL_FIELDS}
        inputs.update({name: getattr(self, name) for name in self.PACKED_FIELDS if getattr(self, name) is not None})
        return inputs

    def to(self, device, non_blocking: bool = False) -> NoisyBatch:
        """Copy to ``device``; to a GPU through pinned memory, so that ``non_blocking`` copies do not wait for
        the work already queued on the device."""
        pin = non_blocking and torch.device(device).type == "cuda"
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = (value.pin_memory() if pin else value).to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return NoisyBatch(**moved)

    @property
    def masked_tokens(self) -> int:
        return int(self.loss_positions.numel())

    def row_losses(self, token_ce: torch.Tensor) -> torch.Tensor:
        """Unweighted loss of each row, sum_i M_i CE_i / (q_i n_b): the quantity whose mean over masks and t
        is the per-token NELBO. Shape (R,), on the device of ``token_ce``."""
        out = torch.zeros(self.rows, dtype=torch.float32, device=token_ce.device)
        return out.index_add_(0, self.token_row, token_ce * self.token_scale)

    def pair_sq_diff(self, row_loss: torch.Tensor) -> torch.Tensor | None:
        """MIRROR: (l_1 - l_2)^2 of each sequence's two rows (adjacent rows of the same sequence), shape (B,),
        NaN for a sequence with one row; None when no sequence has two rows. No host synchronisation."""
        if self.rows == len(self.t):
            return None
        same = self.row_sample[1:] == self.row_sample[:-1]
        diff = torch.where(same, (row_loss[1:] - row_loss[:-1]) ** 2, 0.0)
        out = torch.zeros(len(self.t), dtype=torch.float32, device=row_loss.device)
        pairs = torch.zeros_like(out)
        out.index_add_(0, self.row_sample[:-1], diff)  # at most one non-zero term per sequence: exact
        pairs.index_add_(0, self.row_sample[:-1], same.to(torch.float32))
        return torch.where(pairs > 0, out, float("nan"))

    def sample_grad_norms(self, token_ce: torch.Tensor) -> torch.Tensor:
        """A per-sequence gradient-norm proxy, shape (B,): the norm of the gradient of the unweighted sequence
        loss l with respect to the logits of its masked tokens, with ||softmax - onehot|| replaced by 1 - p_y =
        1 - exp(-CE) (the true norm lies between that and sqrt(2) times it). Logits of different tokens and rows
        are different coordinates, so |grad l|^2 = sum_r s_r^2 sum_i (token_scale_i (1 - exp(-CE_i)))^2; it
        needs no extra backward (``variance.t_sampler.target: grad``)."""
        per_token = (self.token_scale * (1.0 - torch.exp(-token_ce.float()))) ** 2
        rows = torch.zeros(self.rows, dtype=torch.float32, device=token_ce.device).index_add_(0, self.token_row,
                                                                                              per_token)
        out = torch.zeros(len(self.t), dtype=torch.float32, device=token_ce.device)
        return out.index_add_(0, self.row_sample, rows * self.row_scale**2).sqrt()

    def sample_losses(self, row_loss: torch.Tensor) -> torch.Tensor:
        """Unweighted loss of each sequence (its rows combined by ``row_scale``), shape (B,)."""
        out = torch.zeros(len(self.t), dtype=torch.float32, device=row_loss.device)
        return out.index_add_(0, self.row_sample, row_loss * self.row_scale)


class TrainedMicroBatch:
    """A corrupted micro-batch and the model's token losses on it: what the noise services observe (``service.py``).
    Each per-row and per-sequence quantity is computed on first use, once, on the device of ``token_ce``."""

    def __init__(self, noisy: NoisyBatch, token_ce: torch.Tensor):
        self.noisy, self.token_ce = noisy, token_ce

    @property
    def t(self) -> torch.Tensor:
        return self.noisy.t

    @cached_property
    def row_loss(self) -> torch.Tensor:
        """(R,) unweighted loss of each row (``NoisyBatch.row_losses``)."""
        return self.noisy.row_losses(self.token_ce)

    @cached_property
    def sample_loss(self) -> torch.Tensor:
        """(B,) unweighted loss of each sequence."""
        return self.noisy.sample_losses(self.row_loss)

    @cached_property
    def pair_sq_diff(self) -> torch.Tensor | None:
        """(B,) MIRROR's (l_1 - l_2)^2 per sequence (NaN without a pair), None without MIRROR."""
        return self.noisy.pair_sq_diff(self.row_loss)

    @cached_property
    def sample_grad_norm(self) -> torch.Tensor:
        """(B,) the per-sequence gradient-norm proxy (``NoisyBatch.sample_grad_norms``)."""
        return self.noisy.sample_grad_norms(self.token_ce)


def stack_rows(parts: list[NoisyBatch]) -> NoisyBatch:
    """The rows of several corruptions of the same clean sequences (equal widths) as one batch for one forward:
    part k's sequences become sequences k B .. (k + 1) B - 1. The loss coefficients are kept, so the stacked
    loss is the sum of the parts' losses (the online variance probe uses only the token losses)."""
    if any(p.document_ids is not None for p in parts):
        raise ValueError("stack_rows takes unpacked rows (one sequence per row)")
    width = parts[0].input_ids.shape[1]
    row_offsets = [0]
    for part in parts[:-1]:
        row_offsets.append(row_offsets[-1] + part.rows)
    seq_offsets = [k * len(parts[0].t) for k in range(len(parts))]

    def cat(name: str, shift=None) -> torch.Tensor:
        return torch.cat([getattr(p, name) + (0 if shift is None else shift[k]) for k, p in enumerate(parts)])

    masks = [p.attention_mask for p in parts]
    return NoisyBatch(cat("input_ids"), None if masks[0] is None else torch.cat(masks),
                      cat("loss_positions", [o * width for o in row_offsets]), cat("loss_targets"), cat("loss_coef"),
                      None, None, cat("token_row", row_offsets), cat("token_scale"), cat("row_sample", seq_offsets),
                      cat("row_scale"), cat("t"), cat("weight"), sum(p.eligible_tokens for p in parts),
                      sum(p.rows for p in parts))


def take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` along the first dimension. The host-side corruption gathers through ``index_select``:
    CPU advanced indexing (``values[index]``, ``aten::index``) runs through a parallel kernel that costs
    milliseconds per call on a busy host, tens of milliseconds per micro-batch (docs/benchmarks.md)."""
    return values.index_select(0, index)


def _flat_loss_tokens(input_ids: torch.Tensor, selected: torch.Tensor, target_ids: torch.Tensor):
    rows, cols = selected.nonzero(as_tuple=True)
    positions = rows * input_ids.shape[1] + cols
    return rows, positions, take(target_ids.reshape(-1), positions)


class MDMObjective:
    """Masked-diffusion loss with pluggable t-sampler and mask generator (docs/spec.md sections 1-3)."""

    def __init__(self, t_sampler: TSampler, masks: BernoulliMasks, mask_token_id: int):
        self.t_sampler, self.masks, self.mask_token_id = t_sampler, masks, mask_token_id

    def corrupt(self, batch: Batch, t_stream: int = Stream.T, mask_stream: int = Stream.MASK,
                t_sampler: TSampler | None = None) -> NoisyBatch:
        sampler = t_sampler or self.t_sampler
        t, weight = sampler.sample(batch.sample_index, t_stream)
        if batch.valid is not None:
            weight = weight * batch.valid
        packed = batch.document_ids is not None
        ids, eligible = record_view(batch) if packed else (batch.input_ids, batch.loss_mask)
        draw = self.masks.draw(batch.sample_index, t, eligible, mask_stream, ids)
        source = draw.row_sample
        rows, cols = draw.masked.nonzero(as_tuple=True)
        sample_of_token = take(source, rows)
        targets = take(ids.reshape(-1), sample_of_token * ids.shape[1] + cols)
        n_eligible = eligible.sum(1).clamp(min=1).to(torch.float32)
        token_scale = 1.0 / (draw.inclusion.masked_select(draw.masked) * take(n_eligible, sample_of_token))
        denominator = torch.full((len(weight),), float(len(weight))) if batch.loss_denominator is None \
            else batch.loss_denominator
        coef = take(weight, sample_of_token) * take(draw.row_scale, rows) * token_scale / take(denominator,
                                                                                       sample_of_token)
        model = _packed_rows(batch, source) if packed else _ModelRows(
            torch.arange(len(source)), torch.zeros(len(source), dtype=torch.int64), take(batch.input_ids, source),
            None if batch.attention_mask is None else take(batch.attention_mask, source), None, None)
        positions = take(model.row, rows) * model.input_ids.shape[1] + take(model.offset, rows) + cols
        noisy_ids = model.input_ids.clone()
        noisy_ids.view(-1).index_fill_(0, positions, self.mask_token_id)
        return NoisyBatch(noisy_ids, model.attention_mask, positions, targets, coef, model.document_ids,
                          model.position_ids, rows, token_scale, source, draw.row_scale, t, weight,
                          int(eligible.sum()), len(source))


@dataclass
class _ModelRows:
    """Where corrupted row r' of the objective lives in the model's input: row ``row[r']``, from column
    ``offset[r']``; and the clean model input (rows repeated for MIRROR's copies)."""

    row: torch.Tensor
    offset: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    document_ids: torch.Tensor | None
    position_ids: torch.Tensor | None


def _packed_rows(batch: Batch, source: torch.Tensor) -> _ModelRows:
    """Packed rows: every packed row is repeated once per corrupted copy of its records (MIRROR: 2; a record
    with fewer copies, mirror_plus, leaves its tokens clean in the extra row, where nothing scores them)."""
    copy = torch.arange(len(source)) - torch.searchsorted(source, source)  # rows of one record are adjacent
    copies = int(copy.max()) + 1 if len(source) else 1

    def repeat(x):
        return None if x is None else x.repeat_interleave(copies, dim=0)

    return _ModelRows(take(batch.record_row, source) * copies + copy, take(batch.record_offset, source),
                      repeat(batch.input_ids), repeat(batch.attention_mask), repeat(batch.document_ids),
                      repeat(batch.position_ids))


class ARMObjective:
    """Next-token loss on the eligible positions (run with ``causal = True``)."""

    def corrupt(self, batch: Batch, *_, **__) -> NoisyBatch:
        ids = batch.input_ids
        predicts = torch.zeros_like(batch.loss_mask)
        predicts[:, :-1] = batch.loss_mask[:, 1:]  # position i-1 predicts token i
        shifted = torch.zeros_like(ids)
        shifted[:, :-1] = ids[:, 1:]
        rows, positions, targets = _flat_loss_tokens(ids, predicts, shifted)
        n_targets = predicts.sum(1).clamp(min=1).to(torch.float32)
        valid = torch.ones(len(ids)) if batch.valid is None else batch.valid.to(torch.float32)
        token_scale = 1.0 / n_targets[rows]
        coef = take(valid, rows) * token_scale / len(ids)
        return NoisyBatch(ids, batch.attention_mask, positions, targets, coef, None, None, rows, token_scale,
                          torch.arange(len(ids)), torch.ones(len(ids)), torch.zeros(len(ids)), valid,
                          int(predicts.sum()), len(ids))
