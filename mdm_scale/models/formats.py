"""Checkpoint formats of released models, read into the built-in model class and written back.

A LLaDA, Dream, LLaMA, Qwen2 or Qwen3 checkpoint directory (``config.json`` + safetensors, one file or shards
with ``model.safetensors.index.json``) becomes an ``MDMForMaskedDiffusion``: ``config.json``'s fields become
``MDMConfig`` fields (``mdm_config_fields``) and every parameter is the concatenation, along its first
dimension, of named source tensors (``source_names``). So everything the built-in model has (the masked-only
head, fused kernels, packed rows, selective checkpointing, ZeRO-3 leaves) applies unchanged.

The three layouts differ only in names and in what they add:

- **LLaDA** (``model_type: llada``): tensors under ``model.transformer``; per block ``attn_norm``, ``q_proj``,
  ``k_proj``, ``v_proj``, ``attn_out``, ``ff_norm``, ``ff_proj`` (the SwiGLU gate), ``up_proj``, ``ff_out``
  (the down projection); ``wte``, ``ln_f`` and ``ff_out`` (the LM head: two different tensors are called
  ``ff_out``). Bidirectional, no logit shift; logits width ``embedding_size``.
- **Dream** (``model_type: Dream``): Qwen2's names and network (q/k/v biases, grouped-query attention),
  bidirectional, and *shifted* logits: the raw output at position i predicts token i + 1
  (``MDMConfig.logit_shift``).
- **LLaMA, Qwen2, Qwen3** (causal LMs ``transformers`` ships): the same names (Qwen3 adds ``q_norm`` and
  ``k_norm``). For the diffusion objective they are *adapted*: attention becomes bidirectional and the logits
  are shifted, as Dream was initialised from Qwen2.5; for the ARM objective they stay causal, unshifted.

q/k/v are one ``qkv_proj`` here (rows q, then k, then v; biases likewise) and the SwiGLU gate and up
projections one ``gate_up_proj`` (gate rows first), so a parameter may come from two or three source tensors
and is split back into them on export (``source_parts``).

A field that changes the network in a way this class does not compute (rotary scaling, sliding windows, biases
outside q/k/v, other activations or norms) is refused with the file and the field, never ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdm_scale.config.schema import ConfigError

SHIFTED = ("dream", "llama", "qwen2", "qwen3")
"""Formats whose raw logits at position i predict token i + 1 (for the causal families: once adapted)."""
ADAPTED = ("llama", "qwen2", "qwen3")
"""Causal LM families adapted to diffusion (bidirectional attention, shifted logits)."""
EXPORTED = ("llada", "dream")
"""Formats ``mdm-scale export`` writes back; an adapted causal LM is no longer one and exports as mdm-scale."""


@dataclass(frozen=True)
class Layout:
    """Source tensor names: the top-level ones, and per block ``block_prefix`` (with ``{i}``) + a name of
    ``block`` (our name inside a block -> the source names concatenated along dimension 0)."""

    embed: str
    norm: str
    head: str
    block_prefix: str
    block: dict[str, tuple[str, ...]]


LLADA = Layout("model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight",
               "model.transformer.blocks.{i}.", {
                   "attn_norm.weight": ("attn_norm.weight",),
                   "attn.qkv_proj.weight": ("q_proj.weight", "k_proj.weight", "v_proj.weight"),
                   "attn.qkv_proj.bias": ("q_proj.bias", "k_proj.bias", "v_proj.bias"),
                   "attn.o_proj.weight": ("attn_out.weight",),
                   "mlp_norm.weight": ("ff_norm.weight",),
                   "mlp.gate_up_proj.weight": ("ff_proj.weight", "up_proj.weight"),
                   "mlp.down_proj.weight": ("ff_out.weight",)})
QWEN2 = Layout("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.{i}.", {
    "attn_norm.weight": ("input_layernorm.weight",),
    "attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.q_norm.weight": ("self_attn.q_norm.weight",),
    "attn.k_norm.weight": ("self_attn.k_norm.weight",),
    "attn.o_proj.weight": ("self_attn.o_proj.weight",),
    "mlp_norm.weight": ("post_attention_layernorm.weight",),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.down_proj.weight": ("mlp.down_proj.weight",)})
"""The names of transformers' LLaMA, Qwen2 and Qwen3 models (and Dream's)."""
LAYOUTS = {"llada": LLADA, "dream": QWEN2, "llama": QWEN2, "qwen2": QWEN2, "qwen3": QWEN2}


def read_config_json(path: str | Path) -> dict[str, Any]:
    """``path/config.json`` as a plain mapping (no modelling code runs)."""
    file = Path(path) / "config.json"
    try:
        source = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(source, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return source


def detect_format(source: dict[str, Any]) -> str | None:
    """``llada``, ``dream``, ``llama``, ``qwen2`` or ``qwen3`` from ``config.json``'s ``model_type`` or
    ``architectures``; None for any other model (an mdm-scale export, a transformers masked LM, ...)."""
    model_type = str(source.get("model_type", ""))
    architectures = source.get("architectures") or []
    if model_type == "llada" or "LLaDAModelLM" in architectures:
        return "llada"
    if model_type.lower() == "dream" or "DreamModel" in architectures:
        return "dream"
    return model_type if model_type in ADAPTED else None


def mdm_config_fields(fmt: str, source: dict[str, Any], file: str | Path) -> dict[str, Any]:
    """The ``MDMConfig`` fields of a checkpoint of format ``fmt`` whose ``config.json`` (``file``) is
    ``source``: the network as the format defines it (adapted causal LMs: bidirectional and shifted)."""
    fields = _llada_fields(source, file) if fmt == "llada" else _qwen2_fields(fmt, source, file)
    fields.update(source_format=fmt, logit_shift=fmt in SHIFTED, causal=False)
    return fields


def _require(ok: bool, file, key: str, value: Any, supported: str) -> None:
    if not ok:
        raise ConfigError(f"{file}: {key!r} = {value!r} is not supported by mdm-scale's native loader "
                          f"({supported})")


def _llada_fields(c: dict[str, Any], file) -> dict[str, Any]:
    expected = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
                "alibi": False, "include_bias": False, "layer_norm_with_affine": True, "attention_layer_norm": False,
                "scale_logits": False, "input_emb_norm": False, "block_group_size": 1}
    for key, value in expected.items():
        _require(c.get(key, value) == value, file, key, c.get(key), f"LLaDA's 8B models have {value!r}")
    for key in ("bias_for_layer_norm", "multi_query_attention", "clip_qkv"):
        _require(not c.get(key), file, key, c.get(key), "LLaDA's 8B models have null or false")
    d_model, heads = c["d_model"], c["n_heads"]
    return dict(vocab_size=c.get("embedding_size") or c["vocab_size"], hidden_size=d_model,
                intermediate_size=c.get("mlp_hidden_size") or c.get("mlp_ratio", 4) * d_model,
                num_hidden_layers=c["n_layers"], num_attention_heads=heads,
                num_key_value_heads=c.get("n_kv_heads") or heads, rope_theta=float(c.get("rope_theta", 10000.0)),
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
                max_position_embeddings=c.get("max_sequence_length", 4096),
                tie_word_embeddings=bool(c.get("weight_tying", False)), qkv_bias=bool(c.get("include_qkv_bias")),
                mask_token_id=c.get("mask_token_id"))


def _qwen2_fields(fmt: str, c: dict[str, Any], file) -> dict[str, Any]:
    _require(c.get("hidden_act", "silu") == "silu", file, "hidden_act", c.get("hidden_act"), "SwiGLU with silu")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    _require(rope.get("rope_type", rope.get("type", "default")) == "default", file, "rope_parameters", rope,
             "plain rotary embeddings only; scaled variants such as llama3 or yarn are not")
    _require(not c.get("use_sliding_window"), file, "use_sliding_window", c.get("use_sliding_window"),
             "full attention only")
    layer_types = c.get("layer_types") or []
    _require(all(t == "full_attention" for t in layer_types), file, "layer_types", layer_types,
             "full attention only")
    for key in ("attention_bias", "mlp_bias"):  # LLaMA and Qwen3: biases on every projection (o and MLP too)
        _require(not c.get(key) or fmt in ("dream", "qwen2"), file, key, c.get(key), "no biases outside q/k/v")
    heads = c["num_attention_heads"]
    return dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
                num_key_value_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim"),
                rope_theta=float(c.get("rope_theta") or rope.get("rope_theta", 10000.0)),
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=c.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)), qkv_bias=fmt in ("dream", "qwen2"),
                qk_norm=fmt == "qwen3", mask_token_id=c.get("mask_token_id"))


def source_config_json(config) -> dict[str, Any]:
    """``config.json`` for an ``MDMConfig`` read from a LLaDA or Dream checkpoint: the checkpoint's own file,
    with the fields a run may change updated (the vocabulary rows, grown by a new [MASK] token; the [MASK] id)."""
    out = dict(config.source_config)
    llada = config.source_format == "llada"
    width = out.get("embedding_size") if llada and out.get("embedding_size") else out.get("vocab_size")
    if width != config.vocab_size:
        out["vocab_size"] = config.vocab_size
        if llada:
            out["embedding_size"] = config.vocab_size
    if config.mask_token_id is not None:
        out["mask_token_id"] = config.mask_token_id
    return out


def source_names(fmt: str, name: str) -> tuple[str, ...]:
    """The source tensors whose concatenation along dimension 0 is our parameter ``name``."""
    layout = LAYOUTS[fmt]
    top = {"model.embed_tokens.weight": layout.embed, "model.norm.weight": layout.norm,
           "lm_head.weight": layout.head}
    if name in top:
        return (top[name],)
    _, _, index, rest = name.split(".", 3)  # model.layers.{i}.{rest}
    prefix = layout.block_prefix.format(i=index)
    return tuple(prefix + part for part in layout.block[rest])


def source_parts(config, name: str) -> list[int] | None:
    """Rows of each source tensor of a fused parameter (q, k, v; gate, up); None for a parameter with one."""
    if ".qkv_proj." in name:
        return [config.num_attention_heads * config.head_dim] + 2 * [config.num_key_value_heads * config.head_dim]
    if ".gate_up_proj." in name:
        return [config.intermediate_size] * 2
    return None


def ignorable(fmt: str, name: str, tied: bool) -> bool:
    """Source tensors that may be present without a parameter to receive them: the rotary tables some
    checkpoints store, and the LM head next to a tied embedding (it equals the embedding)."""
    return name.endswith("rotary_emb.inv_freq") or (tied and name == LAYOUTS[fmt].head)
