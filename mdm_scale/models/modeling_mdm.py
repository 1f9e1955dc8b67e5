"""The built-in transformer (LLaMA/LLaDA style) as a ``transformers`` ``PreTrainedModel``.

Pre-norm blocks of RMSNorm -> attention with rotary position embeddings -> RMSNorm -> SwiGLU MLP. Attention is
``torch.nn.functional.scaled_dot_product_attention`` with no causal mask (``config.causal = False``, the masked
diffusion model) or a causal one (the autoregressive baseline). Padding keys are masked out; with no padding
the call carries no mask at all, which lets SDPA pick the flash kernel. The elementwise pieces (RMSNorm,
rotary, SwiGLU) come from ``kernels.py``, eager or fused (``set_kernels``). Released checkpoints (LLaDA, Dream,
LLaMA, Qwen2, Qwen3) load into this same class (``formats.py``): the config fields ``qkv_bias``, ``qk_norm``,
``head_dim``, ``tie_word_embeddings`` and ``logit_shift`` cover what they add (``configuration_mdm.py``).

``MDMForMaskedDiffusion.forward`` has two modes:
- ``loss_positions`` given: returns the weighted loss (and per-position CE) at those flat positions through the
  masked-only head (``masked_head.py``); logits are never materialised for the whole batch;
- otherwise: returns full logits, for generation and export checks.

For decoding, ``kv_cache`` (``kv_cache.py``) records every layer's keys and values, or reuses them while a slice
of positions starting at ``query_start`` is forwarded (rotary positions from ``query_start``); the hook is the
``kv`` argument of ``Attention.forward``.

This file, ``configuration_mdm.py``, ``kernels.py``, ``kv_cache.py`` and ``masked_head.py`` import nothing from
mdm-scale but each other (relative imports), so ``mdm-scale export`` ships them unchanged next to the weights and plain
``transformers`` loads the export with ``trust_remote_code=True``. The Auto classes are registered by
``mdm_scale/models/__init__.py``, not here, so loading an export's copy never re-registers ``mdm_scale``.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_mdm import MDMConfig
from .kernels import EAGER
from .kernels import fused as fused_kernels
from .kv_cache import KVCache
from .masked_head import MaskedLMHead


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.kernels = EAGER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


def rotary_tables(seq_len: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of angle pos * theta^(-2i/d), shaped (L, head_dim) with the half-split (LLaMA) layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


class Attention(nn.Module):
    def __init__(self, config: MDMConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.causal = config.causal
        # q, k and v come from one projection (one GEMM, one ZeRO-3 gather) and are split afterwards.
        self.qkv_proj = nn.Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim,
                                  bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)
        # Qwen3: RMSNorm over each head of q and k (one weight of head_dim entries each), before the rotary.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.kernels = EAGER
        self.sdpa_backend: str = "auto"

    def forward(self, x, cos, sin, mask, kv=None):
        """``kv``: the decoding cache's exchange for this layer (``kv_cache.py``), which gives the keys and values
        of every cached position for those of ``x``'s positions."""
        b, length, _ = x.shape
        qkv = self.qkv_proj(x).view(b, length, self.n_heads + 2 * self.n_kv, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.kernels.rotary(q, k, cos, sin)
        if kv is not None:
            k, v = kv(k, v)
        if self.n_kv != self.n_heads:
            repeat = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        if isinstance(mask, BlockMask):
            out = flex_attention_for(q)(q, k, v, block_mask=mask)
        else:
            backend = nullcontext() if self.sdpa_backend == "auto" else sdpa_kernel(SDPA_BACKENDS[self.sdpa_backend])
            with backend:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


def build_attention_mask(key_mask: torch.Tensor | None, document_ids: torch.Tensor | None, causal: bool,
                   flex: bool | None = None):
    """What attention sees, built once per forward (True = attend):

    - no documents: None when nothing is padded or attention is causal (right padding: causal queries never
      see the pads after them), which lets SDPA pick flash attention; else the key mask ``(B, 1, 1, L)``;
    - packed rows (``document_ids`` (B, L): record number of each position, -1 for padding): query i attends
      key j iff ``doc[i] == doc[j]`` (block-diagonal; padding attends padding, so no row is empty). On GPU
      (``flex`` None) a FlexAttention ``BlockMask``, which skips the blocks outside every document; on CPU
      the same mask as a dense boolean ``(B, 1, L, L)`` for SDPA.
    """
    if document_ids is None:
        return None if (causal or key_mask is None) else key_mask[:, None, None, :]
    if not (document_ids.is_cuda if flex is None else flex):
        return (document_ids[:, :, None] == document_ids[:, None, :])[:, None]

    def same_document(b, h, q, kv):
        return document_ids[b, q] == document_ids[b, kv]

    rows, length = document_ids.shape
    return create_block_mask(same_document, rows, None, length, length, device=document_ids.device)


def flex_attention_for(q: torch.Tensor):
    """FlexAttention, compiled on GPU (its fast path); eager elsewhere (a reference implementation, tests)."""
    return _compiled_flex_attention() if q.is_cuda else flex_attention


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


class SwiGLU(nn.Module):
    def __init__(self, config: MDMConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.kernels = EAGER

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.kernels.swiglu(gate, up))


class Block(nn.Module):
    def __init__(self, config: MDMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, mask, kv=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class MDMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    token_ce: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class MDMPreTrainedModel(PreTrainedModel):
    config_class = MDMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """N(0, initializer_range^2) weights, zero biases, unit norms. The normal draws are made on the CPU from
        torch's default generator and copied to the parameter, wherever it lives: a seed then gives the same
        weights at every ZeRO stage (ZeRO-3 builds the parameters on the GPU, whose generator draws other
        numbers from the same seed)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding, MaskedLMHead)):
            module.weight.data.copy_(torch.randn(module.weight.shape).mul_(std))
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)


class MDMModel(MDMPreTrainedModel):
    """Embeddings and transformer blocks; returns the final-normed hidden states (B, L, D)."""

    def __init__(self, config: MDMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.checkpointed_blocks = 0  # activation checkpointing: the first this many blocks are recomputed
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, query_start: int = 0) -> torch.Tensor:
        """``position_ids`` (B, L) index the rotary tables (packed rows restart them per record); None means
        0 .. L-1 in every row. ``kv_cache`` (decoding, ``kv_cache.py``): an empty cache records this forward's
        keys and values; a recorded one makes ``input_ids`` the positions ``query_start ..`` of the recorded
        sequence, and ``attention_mask`` then covers the whole recorded sequence."""
        if kv_cache is not None:
            if self.config.causal or document_ids is not None or position_ids is not None:
                raise ValueError("the decoding KV cache serves bidirectional, unpacked forwards only")
            kv_cache.begin(query_start, input_ids.shape[1])
        x = self.embed_tokens(input_ids)
        end = query_start + input_ids.shape[1]
        if kv_cache is None or kv_cache.rotary is None:
            cos, sin = rotary_tables(end, self.config.head_dim, self.config.rope_theta, x.device, x.dtype)
            if kv_cache is not None:  # the recording forward: the tables of every recorded position
                kv_cache.rotary = cos, sin
        else:
            cos, sin = kv_cache.rotary
        cos, sin = cos[query_start:end], sin[query_start:end]
        if position_ids is not None:
            cos, sin = cos[position_ids][:, None], sin[position_ids][:, None]
        key_mask = None if attention_mask is None else attention_mask.bool()  # callers pass None when unpadded
        mask = build_attention_mask(key_mask, document_ids, self.config.causal)
        for index, layer in enumerate(self.layers):
            kv = None if kv_cache is None else functools.partial(kv_cache.exchange, index)
            if index < self.checkpointed_blocks and self.training:
                x = checkpoint(layer, x, cos, sin, mask, kv, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, kv)
        return self.norm(x)


class MDMForMaskedDiffusion(MDMPreTrainedModel):
    """The trainable model: ``MDMModel`` plus the masked-only LM head (the embedding matrix itself with
    ``config.tie_word_embeddings``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # only with config.tie_word_embeddings

    def __init__(self, config: MDMConfig):
        super().__init__(config)
        self.model = MDMModel(config)
        self.lm_head = MaskedLMHead(config.hidden_size, config.vocab_size, config.head_chunk_tokens)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_activation_checkpointing(self, enabled: bool, blocks: int | None = None) -> None:
        """Recompute the first ``blocks`` transformer blocks (all when None) in the backward pass."""
        layers = len(self.model.layers)
        self.model.checkpointed_blocks = (layers if blocks is None else min(blocks, layers)) if enabled else 0

    def set_kernels(self, fused: bool, sdpa_backend: str = "auto") -> None:
        """Fused (compiled) or eager elementwise kernels (``kernels.py``), and the SDPA backend (``auto`` lets
        PyTorch choose; ``flash``, ``cudnn``, ``efficient`` or ``math`` force one)."""
        kernels = fused_kernels() if fused else EAGER
        for module in self.modules():
            if hasattr(module, "kernels"):
                module.kernels = kernels
            if isinstance(module, Attention):
                module.sdpa_backend = sdpa_backend

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                loss_positions: torch.Tensor | None = None, loss_targets: torch.Tensor | None = None,
                loss_coef: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None, query_start: int = 0,
                **_unused) -> MDMOutput:
        """``loss_positions`` index the flattened (B*L) batch; ``loss = sum coef * CE`` over them.
        ``document_ids`` and ``position_ids``: packed rows (``MDMModel.forward``, ``build_attention_mask``).
        ``kv_cache`` and ``query_start``: decoding with the block-wise cache (``MDMModel.forward``).
        With ``config.logit_shift`` every output is read from the hidden state one position earlier
        (``shift_to_predictions``; in a cached slice, column 0 reads itself), so position j's logits and loss are
        always the prediction of token j."""
        hidden = self.model(input_ids, attention_mask, document_ids, position_ids, kv_cache, query_start)
        if self.config.logit_shift:
            hidden = shift_to_predictions(hidden, position_ids)
        if loss_positions is None:
            return MDMOutput(logits=self.lm_head(hidden))
        if self.config.loss_head == "full":
            return full_logits_loss(self.lm_head(hidden), loss_positions, loss_targets, loss_coef)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, loss_positions)
        loss, token_ce = self.lm_head(selected, loss_targets, loss_coef)
        return MDMOutput(loss=loss, token_ce=token_ce)


def shift_to_predictions(hidden: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """The shifted convention (Dream; causal LMs adapted to diffusion): the network's state at position i
    predicts token i + 1, so position j reads state j - 1; the first position of a sequence (column 0, or
    ``position_ids == 0``: the first token of each record of a packed row) has no earlier state and reads its
    own, as Dream's sampler does. A record never reads the previous record's state."""
    previous = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
    if position_ids is None:
        return previous
    return torch.where((position_ids == 0)[..., None], hidden, previous)


def full_logits_loss(logits: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor
                     ) -> MDMOutput:
    """``sum coef * CE`` at flat ``positions`` of full ``(B, L, V)`` logits (the conventional path)."""
    selected = logits.reshape(-1, logits.shape[-1]).index_select(0, positions).float()
    ce = F.cross_entropy(selected, targets, reduction="none")
    return MDMOutput(loss=(ce * coef).sum(), token_ce=ce.detach())

