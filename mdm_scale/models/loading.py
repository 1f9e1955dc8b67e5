"""Build or load the model a run trains, already partitioned under ZeRO-3.

Four sources:
- ``model.path`` unset: the built-in model from ``model.preset`` + ``model.overrides`` (vocabulary from the
  tokenizer, causal attention for the ARM objective);
- ``model.path`` holding a released checkpoint in a format read natively (LLaDA, Dream, or a LLaMA / Qwen2 /
  Qwen3 causal LM adapted to diffusion; ``formats.py``, ``native.py``): loaded into the built-in model class;
- ``model.path`` holding an mdm-scale model (``model_type = "mdm_scale"``): loaded with ``from_pretrained``;
- any other local Hugging Face masked LM (BERT, ModernBERT, ...), or a checkpoint's own modelling code when
  ``model.trust_remote_code`` is set (never implied): wrapped by :class:`HFMaskedLMAdapter`.

Under ZeRO-3 the built-in model is constructed inside ``deepspeed.zero.Init`` and initialised (or, for a
native checkpoint, loaded) module by module through ``GatheredParameters`` (rank 0's values are broadcast, so
initial weights do not depend on the world size, ``zero3.py``; they are drawn on the CPU, so they do not depend on
the ZeRO stage either, ``MDMPreTrainedModel._init_weights``); other Hugging Face models load through
``HfDeepSpeedConfig``, which makes ``from_pretrained`` partition as it loads. No process ever holds the whole
model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedTokenizerBase

from mdm_scale.config.presets import PRESETS
from mdm_scale.config.schema import Config, ConfigError
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.lora import add_lora
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion, MDMOutput, full_logits_loss
from mdm_scale.models.native import load_native, native_config, native_format
from mdm_scale.models.zero3 import gathered_modules, set_block_leaves

ADDED_MASK_TOKEN = "<|mask|>"
"""The [MASK] token ``model.mask_token_id: add`` adds to a tokenizer that has none."""


class HFMaskedLMAdapter(nn.Module):
    """Gives a Hugging Face masked LM the built-in model's forward signature (full logits, then CE)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def forward(self, input_ids, attention_mask=None, loss_positions=None, loss_targets=None, loss_coef=None,
                **_unused) -> MDMOutput:
        mask = None if attention_mask is None else attention_mask.long()
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        if loss_positions is None:
            return MDMOutput(logits=logits)
        return full_logits_loss(logits, loss_positions, loss_targets, loss_coef)


def load_hf_config(cfg: Config) -> PretrainedConfig | None:
    """The local model's config (cheap: no weights), or None for a preset. A checkpoint read natively gives
    its ``MDMConfig`` (``native.native_config``)."""
    if cfg.model.path is None:
        return None
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"config key 'model.path' = {cfg.model.path!r}: no config.json there "
                                f"(mdm-scale loads local directories only)")
    try:
        fmt = native_format(path, cfg.model.trust_remote_code)
        if fmt is not None:
            return native_config(path, fmt, cfg.train.objective, cfg.model.overrides)
        return auto_config(path, cfg.model.trust_remote_code)
    except ConfigError as err:
        raise ConfigError(f"config key 'model.path' = {cfg.model.path!r}: {err}") from None


def auto_config(path: Path, trust_remote_code: bool) -> PretrainedConfig:
    """``AutoConfig`` of a directory that is not read natively, with one-line errors naming its config.json."""
    file = path / "config.json"
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(f"{file} names modelling code shipped in the directory (auto_map); set "
                              f"model.trust_remote_code=true (--trust-remote-code) if you trust it") from None
        raise ConfigError(f"{file}: unknown format ({str(err).splitlines()[0]}); mdm-scale reads LLaDA, Dream, "
                          f"llama, qwen2, qwen3 and mdm-scale checkpoints natively, and transformers' masked "
                          f"LMs") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    known = config.model_type == MDMConfig.model_type or config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if not (known or trust_remote_code):
        raise ConfigError(f"{file}: model_type {config.model_type!r} is neither a format mdm-scale reads natively "
                          f"(LLaDA, Dream, llama, qwen2, qwen3, mdm_scale) nor a masked LM of transformers")
    return config


def resolve_mask_token_id(cfg: Config, tokenizer: PreTrainedTokenizerBase, hf_config: PretrainedConfig | None
                          ) -> int | None:
    """model.mask_token_id, else the tokenizer's mask token, else the model config's; None only for ARM.

    ``model.mask_token_id: add``: the tokenizer's mask token, or, if it has none, a new ``<|mask|>`` token
    added to it (id ``len(tokenizer)``; the model gets a row for it if it has none: ``native.py``). A tokenizer
    mask token that contradicts the model config's ``mask_token_id`` is an error (set the key to choose)."""
    if cfg.model.mask_token_id == "add":
        if tokenizer.mask_token_id is None:
            tokenizer.add_special_tokens({"mask_token": ADDED_MASK_TOKEN})
        return tokenizer.mask_token_id
    model_id = getattr(hf_config, "mask_token_id", None) if hf_config is not None else None
    if cfg.model.mask_token_id is None and None not in (tokenizer.mask_token_id, model_id) and \
            tokenizer.mask_token_id != model_id:
        raise ConfigError(f"the tokenizer's mask token (id {tokenizer.mask_token_id}, data.tokenizer = "
                          f"{cfg.data.tokenizer!r}) differs from the model's mask_token_id {model_id} (model.path "
                          f"= {cfg.model.path!r}); set model.mask_token_id to the one to train with")
    candidates = [cfg.model.mask_token_id, tokenizer.mask_token_id, model_id]
    found = next((c for c in candidates if c is not None), None)
    if found is None and cfg.train.objective == "mdm":
        raise ConfigError(f"no [MASK] token: the tokenizer (config key 'data.tokenizer' = {cfg.data.tokenizer!r}) "
                          f"has no mask token and the model config has no mask_token_id; set model.mask_token_id "
                          f"to an unused token id, or to 'add' to add a [MASK] token")
    if found is not None and found >= len(tokenizer) and hf_config is None:
        raise ConfigError(f"config key 'model.mask_token_id' = {found}: outside the vocabulary "
                          f"({len(tokenizer)} tokens)")
    return found


def builtin_config(cfg: Config, vocab_size: int, mask_token_id: int | None) -> MDMConfig:
    fields = {**PRESETS[cfg.model.preset], **cfg.model.overrides}
    fields.update(vocab_size=vocab_size, causal=cfg.train.objective == "arm", mask_token_id=mask_token_id)
    try:
        return MDMConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key 'model.overrides' = {cfg.model.overrides!r}: {err}") from None


def _is_native(cfg: Config) -> bool:
    """``model.path`` is a checkpoint read natively (``load_hf_config`` gave its ``MDMConfig``)."""
    return cfg.model.path is not None and native_format(cfg.model.path, cfg.model.trust_remote_code) is not None


def sized_native_config(hf_config: MDMConfig, mask_token_id: int | None) -> MDMConfig:
    """The native checkpoint's config with the run's [MASK] id, and one more vocabulary row when that id is a
    token the run added just past the checkpoint's rows (``model.mask_token_id: add``)."""
    config = copy.deepcopy(hf_config)
    config.mask_token_id = mask_token_id
    if mask_token_id == hf_config.vocab_size:
        config.vocab_size += 1
    if mask_token_id is not None and not 0 <= mask_token_id < config.vocab_size:
        raise ConfigError(f"[MASK] id {mask_token_id} (model.mask_token_id, the tokenizer's or the model's) is "
                          f"outside the {config.vocab_size} embedding rows of the model at model.path")
    return config


def build_model(cfg: Config, tokenizer: PreTrainedTokenizerBase, mask_token_id: int | None,
                hf_config: PretrainedConfig | None, ds_config: dict, seed: int) -> nn.Module:
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if hf_config is None:
        model = _build_builtin(builtin_config(cfg, len(tokenizer), mask_token_id), ds_config, zero3, seed)
    elif _is_native(cfg):
        config = sized_native_config(hf_config, mask_token_id)
        _check_vocab(cfg, config, tokenizer)
        model = load_native(cfg.model.path, config, ds_config, zero3)
    else:
        _check_vocab(cfg, hf_config, tokenizer)
        model = _load_pretrained(cfg, hf_config, ds_config, zero3)
    if isinstance(model, MDMForMaskedDiffusion):
        fused = cfg.model.fused_kernels if cfg.model.fused_kernels is not None else torch.cuda.is_available()
        model.set_kernels(fused, cfg.model.attention_backend)
    elif cfg.model.checkpoint_blocks is not None or cfg.data.packing:
        raise ConfigError("config keys 'model.checkpoint_blocks' and 'data.packing' need the built-in model; "
                          f"model.path = {cfg.model.path!r} is another architecture")
    if cfg.model.lora.rank:
        add_lora(model, cfg.model.lora, seed)
    elif zero3 and isinstance(model, MDMForMaskedDiffusion):
        set_block_leaves(model)
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model, cfg.model.checkpoint_blocks)
    return model


def _build_builtin(config: MDMConfig, ds_config: dict, zero3: bool, seed: int) -> nn.Module:
    import deepspeed

    if zero3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = MDMForMaskedDiffusion(config)
    else:
        model = MDMForMaskedDiffusion(config)
    torch.manual_seed(seed)
    for module, _ in gathered_modules(model):  # same initial weights for every world size and ZeRO stage
        model._init_weights(module)
    return model


def _load_pretrained(cfg: Config, hf_config: PretrainedConfig, ds_config: dict, zero3: bool) -> nn.Module:
    keep_alive = None
    if zero3:  # makes from_pretrained construct under zero.Init and load shard by shard
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    path, remote = str(cfg.model.path), cfg.model.trust_remote_code
    if hf_config.model_type == MDMConfig.model_type:
        model = MDMForMaskedDiffusion.from_pretrained(path)
        del keep_alive
        return model
    try:
        model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=remote)
    except ValueError:  # remote code that registers its LM head model only as AutoModel (LLaDA)
        model = AutoModel.from_pretrained(path, trust_remote_code=remote)
    del keep_alive
    return HFMaskedLMAdapter(model)


def _check_vocab(cfg: Config, hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    vocab = getattr(hf_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(f"data.tokenizer has {len(tokenizer)} tokens but the model at model.path "
                          f"{cfg.model.path!r} has only {vocab} embeddings")
    max_len = getattr(hf_config, "max_position_embeddings", None)
    if max_len is not None and cfg.data.seq_len > max_len:
        raise ConfigError(f"config key 'data.seq_len' = {cfg.data.seq_len}: the model at model.path supports "
                          f"at most {max_len} positions")


def enable_activation_checkpointing(model: nn.Module, blocks: int | None = None) -> None:
    if isinstance(model, MDMForMaskedDiffusion):
        model.set_activation_checkpointing(True, blocks)
    else:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


