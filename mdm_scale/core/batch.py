"""The clean micro-batch that data loading produces and the diffusion objective corrupts."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """A micro-batch of clean sequences.

    ``loss_mask`` marks eligible positions (response and EOS for SFT, everything for pretraining blocks);
    ``attention_mask`` is None when no row is padded; ``valid`` is False for filler rows (eval only).
    Packed rows (``data/packing.py``) also carry, per position, ``document_ids`` (the record's number in
    ``sample_index``, -1 for padding) and ``position_ids`` (position inside the record), per record its
    ``record_row``, ``record_offset`` and ``record_length``, and ``loss_denominator``: what each record's loss
    is divided by (None: the number of sequences, as unpacked).
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    sample_index: torch.Tensor
    attention_mask: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    record_row: torch.Tensor | None = None
    record_offset: torch.Tensor | None = None
    record_length: torch.Tensor | None = None
    loss_denominator: torch.Tensor | None = None

    def to(self, device) -> Batch:
        return Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                        for f in fields(self)})
