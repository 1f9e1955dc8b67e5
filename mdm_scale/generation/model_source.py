"""The model a generation command decodes with, from whatever ``--checkpoint`` names (a training output
directory, a checkpoint directory or a Hugging Face directory), read by ``training/run_reader.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from mdm_scale.training.run_reader import read_run


@dataclass
class GenerationModel:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    mask_token_id: int | None
    causal: bool
    """ARM checkpoint (causal attention): decoded greedily left to right."""
    chat_template: bool
    """Prompts are wrapped in the tokenizer's chat template (as in training)."""
    source: str
    """The checkpoint step directory or the Hugging Face directory the weights came from."""


def load_generation_model(path: str | Path, device: torch.device, dtype: torch.dtype,
                          trust_remote_code: bool = False) -> GenerationModel:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    source = read_run(path)
    model, tokenizer, mask_id = source.load_model(trust_remote_code)
    _eager(model)
    model.to(device=device, dtype=dtype).eval()
    return GenerationModel(model, tokenizer, mask_id, source.causal, source.chat_template, str(source.path))


def _eager(model: nn.Module) -> None:
    """Plain (uncompiled) kernels: decoding shapes change every call, and a checkpoint and its export must run
    the same arithmetic."""
    from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion

    if isinstance(model, MDMForMaskedDiffusion):
        model.set_kernels(False)
