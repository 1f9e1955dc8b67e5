"""Read a trained model back: one reader for every command that takes ``--checkpoint`` (generation, evaluation,
export, lm-eval, the variance tool, the experiment harness).

``read_run(path)`` accepts
- a training output directory (it holds ``run.json`` and ``checkpoints/``): its newest complete checkpoint whose
  files all pass their checksums;
- its ``checkpoints`` directory, or one ``checkpoints/step_*`` directory;
- a Hugging Face directory (``config.json`` and weights): an ``mdm-scale export``, any local masked LM, or LLaDA
  (``trust_remote_code`` only when asked),

and returns a :class:`RunSource`: the run's configuration and step (``run.json`` and the checkpoint's manifest;
an export records both), its tokenizer (the run's own copy, whatever ``data.tokenizer`` named), and its weights
as one fp32 state dict named as the training module names them.

The weights of a checkpoint follow one rule, the ZeRO stage its manifest records:
- stage 0: ``mp_rank_00_model_states.pt`` holds the whole module (read with ``weights_only``: a checkpoint is
  never trusted to run code). A bf16 run at stage 0 also writes ``bf16_zero_pp_rank_*`` shards, of DeepSpeed's
  bf16 optimizer, which ``zero_to_fp32`` cannot read; the module file holds the weights the run trained with.
- stages 1-3: the fp32 master weights, consolidated from every rank's optimizer shards (``zero_pp_rank_*``, or
  ``bf16_zero_pp_rank_*`` for a bf16 run) by DeepSpeed's ``zero_to_fp32``, which reads the files directly: no
  engine, no process group, any number of writing ranks.

:func:`load_weights` puts a state dict read on rank 0 into a model that may be partitioned under ZeRO-3 (the
variance tool); a process that holds the whole model loads it with ``load_state_dict``.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerBase

from mdm_scale.config.loader import from_dict
from mdm_scale.config.schema import Config, ConfigError
from mdm_scale.distributed.env import DistEnv, control_group
from mdm_scale.training.checkpoint import MANIFEST, CheckpointError, check_shapes, rank_state, resolve_checkpoint
from mdm_scale.training.optimizer.universal import MODEL_STATES

EXPORT_INFO = "mdm_scale_export.json"
"""Written by ``mdm-scale export`` next to the weights: how prompts are encoded, the run's configuration and
step, and the checkpoint the weights came from."""


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(
        (path / name).exists() for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                            "pytorch_model.bin.index.json"))


@dataclass
class RunSource:
    """A trained model on disk: a training checkpoint or a Hugging Face directory."""

    path: Path
    """The checkpoint's ``step_*`` directory or the Hugging Face directory."""
    is_checkpoint: bool
    config: Config | None
    """The run's configuration; None for a Hugging Face directory that ``mdm-scale export`` did not write."""
    step: int | None
    """Optimiser steps the weights were trained for (None if unknown)."""
    tokenizer_dir: Path
    chat_template: bool
    """Prompts are wrapped in the tokenizer's chat template (as in training)."""
    causal: bool
    """ARM weights (causal attention), decoded greedily left to right."""

    def tokenizer(self, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir), trust_remote_code=trust_remote_code)

    def load_model(self, trust_remote_code: bool = False) -> tuple[nn.Module, PreTrainedTokenizerBase, int | None]:
        """``(model, tokenizer, mask token id)``: the whole model on the CPU in fp32 with these weights, built as
        the run built it (a checkpoint; loaded strictly: a missing or extra parameter is an error) or by
        ``from_pretrained`` (a Hugging Face directory; mdm-scale's own model with the installed code)."""
        tokenizer = self.tokenizer(trust_remote_code)
        if not self.is_checkpoint:
            return _hf_module(self.path, trust_remote_code), tokenizer, _hf_mask_token_id(self.path, tokenizer,
                                                                                          trust_remote_code)
        from mdm_scale.models.loading import build_model, load_hf_config, resolve_mask_token_id

        hf_config = load_hf_config(self.config)
        mask_id = resolve_mask_token_id(self.config, tokenizer, hf_config)
        model = build_model(self.config, tokenizer, mask_id, hf_config, {"zero_optimization": {"stage": 0}},
                            self.config.seed)
        model.load_state_dict(self.state_dict(), strict=True)
        return model, tokenizer, mask_id

    def state_dict(self, trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (and persistent buffer), full size, fp32, named as in the training module (a Hugging
        Face model other than mdm-scale's is wrapped, so its names start with ``model.``)."""
        if not self.is_checkpoint:
            return {name: t.float() for name, t in _hf_module(self.path, trust_remote_code).state_dict().items()}
        return consolidated_state_dict(self.path)

    def rank_state(self, rank: int) -> dict:
        """The per-rank training state the checkpoint saved for ``rank`` (the t-sampler's, ...); {} for a Hugging
        Face directory."""
        return rank_state(self.path, rank) if self.is_checkpoint else {}


def read_run(path: str | Path) -> RunSource:
    """The model that ``path`` names (see the module docstring); a clear ``CheckpointError`` otherwise."""
    given = Path(path)
    if not given.is_dir():
        raise CheckpointError(f"--checkpoint {path}: no such directory")
    if is_hf_dir(given):
        return _hf_source(given)
    step_dir = resolve_checkpoint(given)
    run_dir = step_dir.parent.parent
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise CheckpointError(f"--checkpoint {path}: {run_file} is missing (the run's configuration)")
    config = _config(json.loads(run_file.read_text())["config"], run_file)
    tokenizer_dir = run_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise CheckpointError(f"--checkpoint {path}: the run's tokenizer {tokenizer_dir} is missing")
    step = json.loads((step_dir / MANIFEST).read_text())["step"]
    return RunSource(step_dir, True, config, step, tokenizer_dir, config.data.chat_template,
                     config.train.objective == "arm")


def _config(raw: dict, where: Path) -> Config:
    try:
        return from_dict(Config, raw)
    except ConfigError as err:  # a run written by another version of mdm-scale
        raise CheckpointError(f"{where}: the run's configuration does not load ({err})") from None


def _hf_source(path: Path) -> RunSource:
    info = json.loads((path / EXPORT_INFO).read_text()) if (path / EXPORT_INFO).is_file() else {}
    config = _config(info["config"], path / EXPORT_INFO) if info.get("config") is not None else None
    hf = json.loads((path / "config.json").read_text())
    return RunSource(path, False, config, info.get("step"), path, bool(info.get("chat_template", False)),
                     bool(hf.get("causal", False)))


def _hf_module(path: Path, trust_remote_code: bool) -> nn.Module:
    """A LLaDA, Dream or LLaMA/Qwen directory read natively into the built-in class (``models/native.py``; LLaDA's
    own code only with ``trust_remote_code``), an mdm-scale export, or another masked LM wrapped for training."""
    from mdm_scale.models.configuration_mdm import MDMConfig
    from mdm_scale.models.loading import HFMaskedLMAdapter
    from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion
    from mdm_scale.models.native import load_native

    fmt, config = _hf_config(path, trust_remote_code)
    if fmt is not None:
        return load_native(path, config)
    if config.model_type == MDMConfig.model_type:
        return MDMForMaskedDiffusion.from_pretrained(str(path), dtype=torch.float32)
    try:
        inner = AutoModelForMaskedLM.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError:  # LLaDA registers its LM head model only as AutoModel
        inner = AutoModel.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return HFMaskedLMAdapter(inner)


def _hf_config(path: Path, trust_remote_code: bool):
    """``(native format or None, config)`` of a Hugging Face directory, with one-line errors."""
    from mdm_scale.models.loading import auto_config
    from mdm_scale.models.native import native_config, native_format

    try:
        fmt = native_format(path, trust_remote_code)
        return fmt, native_config(path, fmt) if fmt is not None else auto_config(path, trust_remote_code)
    except ConfigError as err:
        raise CheckpointError(f"--checkpoint {path}: {err}") from None


def _hf_mask_token_id(path: Path, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool) -> int | None:
    mask_id = getattr(_hf_config(path, trust_remote_code)[1], "mask_token_id", None)
    return mask_id if mask_id is not None else tokenizer.mask_token_id


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every parameter of checkpoint ``step_dir``, full size, fp32 (the rule of the module docstring)."""
    manifest = json.loads((step_dir / MANIFEST).read_text())
    if manifest.get("zero_stage", 0) == 0:
        states = step_dir / MODEL_STATES
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


def load_weights(model: nn.Module, state: dict[str, torch.Tensor] | None, source: Path, env: DistEnv) -> None:
    """Put rank 0's ``state`` (other ranks pass None: only rank 0 reads the checkpoint) into ``model``'s
    parameters, before ``deepspeed.initialize``; every rank calls this. A ZeRO-3 partitioned parameter is
    gathered, set on rank 0 and re-partitioned from rank 0's values (``GatheredParameters(modifier_rank=0)``); a
    whole one is set on rank 0 and broadcast by ``deepspeed.initialize`` (the engine copies rank 0's parameters
    to every rank). Parameter names and shapes must match the model's exactly (checked on rank 0, raised on every
    rank). Buffers are left as built: those of the supported models are constants of their configuration."""
    from mdm_scale.models.zero3 import gathered_modules, parameter_shapes

    problem = None
    if env.is_main:
        buffers = {name for name, _ in model.named_buffers()}
        try:
            check_shapes(source, {name: list(t.shape) for name, t in state.items() if name not in buffers},
                         parameter_shapes(model))
        except CheckpointError as err:
            problem = str(err)
    if env.world_size > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0, group=control_group())
        problem = box[0]
    if problem is not None:
        raise CheckpointError(problem)
    with torch.no_grad():
        for _, own in gathered_modules(model):
            if env.is_main:
                for name, param in own:
                    param.data.copy_(state[name])
