"""Load a model for generation from a training checkpoint or from a Hugging Face directory.

``--checkpoint`` may name:
- a training output directory (it holds ``run.json``): its newest complete checkpoint is used;
- its ``checkpoints`` directory, or one ``checkpoints/step_*`` directory;
- a Hugging Face directory (``config.json`` and weights): an ``mdm-scale export``, any local masked LM, or LLaDA
  (``trust_remote_code`` only when asked).

A training checkpoint holds DeepSpeed shards (ZeRO-3 partitions every parameter over the ranks that wrote it).
They are consolidated into one fp32 state dict with DeepSpeed's ``zero_to_fp32`` utilities, which read the
files directly (no engine, no process group, any number of writing ranks); stage 0 checkpoints hold the whole
module already. The model is then rebuilt exactly as the run built it (``run.json``'s configuration and the
run's saved tokenizer) and the weights are loaded strictly: a missing or extra parameter is an error.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerBase

from mdm_scale.training.checkpoint import CheckpointError, resolve_checkpoint

EXPORT_INFO = "mdm_scale_export.json"
"""Written by ``mdm-scale export`` next to the weights: how prompts are encoded, and where the weights came from."""


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


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / name).exists() for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                            "pytorch_model.bin.index.json"))


def load_generation_model(path: str | Path, device: torch.device, dtype: torch.dtype,
                          trust_remote_code: bool = False) -> GenerationModel:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such directory")
    loaded = _from_hf_dir(path, trust_remote_code) if is_hf_dir(path) else _from_training_checkpoint(path)
    _eager(loaded.model)
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def training_run_config(path: Path):
    """The :class:`~mdm_scale.config.schema.Config` of the run that wrote the training checkpoint at ``path``,
    and that checkpoint's step directory."""
    from mdm_scale.config.loader import from_dict
    from mdm_scale.config.schema import Config

    step_dir = resolve_checkpoint(path)
    run_file = step_dir.parent.parent / "run.json"
    if not run_file.is_file():
        raise CheckpointError(f"--checkpoint {path}: {run_file} is missing (the run's configuration)")
    return from_dict(Config, json.loads(run_file.read_text())["config"]), step_dir


def _from_training_checkpoint(path: Path) -> GenerationModel:
    from mdm_scale.models.loading import build_model, load_hf_config, resolve_mask_token_id

    cfg, step_dir = training_run_config(path)
    run_dir = step_dir.parent.parent
    tokenizer_dir = run_dir / "tokenizer"  # the run's own copy, whatever data.tokenizer named
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise CheckpointError(f"--checkpoint {path}: the run's tokenizer {tokenizer_dir} is missing")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf_config = load_hf_config(cfg)
    mask_id = resolve_mask_token_id(cfg, tokenizer, hf_config)
    model = build_model(cfg, tokenizer, mask_id, hf_config, {"zero_optimization": {"stage": 0}}, cfg.seed)
    model.load_state_dict(consolidated_state_dict(step_dir, cfg.train.zero_stage), strict=True)
    return GenerationModel(model, tokenizer, mask_id, cfg.train.objective == "arm", cfg.data.chat_template,
                           str(step_dir))


def consolidated_state_dict(step_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every parameter of the checkpoint, full size, fp32 (frozen ones, e.g. a LoRA run's base, included)."""
    if zero_stage == 0:
        states = step_dir / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise CheckpointError(f"{step_dir}: {states.name} is missing")
        try:  # tensors and plain containers only: a checkpoint directory is never trusted to run code
            module = torch.load(states, map_location="cpu", weights_only=True)["module"]
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{states} holds objects other than tensors and plain containers, which "
                                  f"torch.load(weights_only=True) refuses: {str(err).splitlines()[0]}") from err
        return {name: tensor.float() for name, tensor in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # its progress lines must not mix with the result on stdout
        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    return {name: tensor.float() for name, tensor in state.items()}


def _from_hf_dir(path: Path, trust_remote_code: bool) -> GenerationModel:
    from mdm_scale.models.configuration_mdm import MDMConfig
    from mdm_scale.models.loading import HFMaskedLMAdapter
    from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise CheckpointError(f"--checkpoint {path} ships its own modelling code (e.g. LLaDA); pass "
                              f"--trust-remote-code if you trust it") from None
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    info = json.loads((path / EXPORT_INFO).read_text()) if (path / EXPORT_INFO).is_file() else {}
    if config.model_type == MDMConfig.model_type:
        model = MDMForMaskedDiffusion.from_pretrained(str(path), torch_dtype=torch.float32)
    else:
        try:
            inner = AutoModelForMaskedLM.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except ValueError:  # LLaDA registers its LM head model only as AutoModel
            inner = AutoModel.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        model = HFMaskedLMAdapter(inner)
    mask_id = getattr(config, "mask_token_id", None)
    mask_id = mask_id if mask_id is not None else tokenizer.mask_token_id
    return GenerationModel(model, tokenizer, mask_id, bool(getattr(config, "causal", False)),
                           bool(info.get("chat_template", False)), str(path))


def _eager(model: nn.Module) -> None:
    """Plain (uncompiled) kernels: decoding shapes change every call, and a checkpoint and its export must run
    the same arithmetic."""
    from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion

    if isinstance(model, MDMForMaskedDiffusion):
        model.set_kernels(False)
