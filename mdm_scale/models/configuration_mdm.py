"""Hugging Face config class of the built-in model (``model_type = "mdm_scale"``)."""

from __future__ import annotations

from transformers import PretrainedConfig


class MDMConfig(PretrainedConfig):
    """Shape of a LLaMA/LLaDA-style transformer: RMSNorm, RoPE, SwiGLU, SDPA attention.

    ``causal = False`` is the masked-diffusion model (every position sees every other); ``causal = True`` is the
    autoregressive baseline on the same architecture. ``head_chunk_tokens`` bounds the logits the masked-only
    LM head materialises at once (``masked_head.py``); it changes memory, never results. ``loss_head = "full"``
    computes the training loss from full ``B x L x V`` logits instead (same values; for comparisons).

    Fields for released checkpoints loaded into this architecture (``models/formats.py``); their defaults are
    the built-in model:

    - ``head_dim``: width of one attention head (default ``hidden_size / num_attention_heads``; Qwen3 sets it);
    - ``qkv_bias``: the q/k/v projection has a bias (Qwen2 and Dream); ``qk_norm``: RMSNorm over each head of q
      and k before the rotary embedding (Qwen3);
    - ``tie_word_embeddings``: the output layer is the token embedding matrix (one parameter);
    - ``logit_shift``: the network's raw output at position i predicts token i + 1 (Dream, and causal LMs adapted
      to diffusion). The model's outputs are then read one position earlier, so that whatever the model returns
      at position j (full logits, or the loss at a masked position j) is its prediction of token j:
      out_j = raw_{j-1} for j >= 1 and out_0 = raw_0, restarting at each record of a packed row;
    - ``source_format``, ``source_config``, ``source_generation_config``: the format the weights were read from
      (``llada``, ``dream``, ``llama``, ``qwen2``, ``qwen3``) and that checkpoint's ``config.json`` and
      ``generation_config.json``, so that ``mdm-scale export`` writes the same format back. No effect on the
      network.
    """

    model_type = "mdm_scale"

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 128,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        max_position_embeddings: int = 4096,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        causal: bool = False,
        mask_token_id: int | None = None,
        head_chunk_tokens: int = 8192,
        loss_head: str = "masked",
        tie_word_embeddings: bool = False,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        logit_shift: bool = False,
        source_format: str | None = None,
        source_config: dict | None = None,
        source_generation_config: dict | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size or _swiglu_width(hidden_size)
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.causal = causal
        self.mask_token_id = mask_token_id
        self.head_chunk_tokens = head_chunk_tokens
        if loss_head not in ("masked", "full"):
            raise ValueError(f"loss_head must be 'masked' or 'full', got {loss_head!r}")
        self.loss_head = loss_head
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.qkv_bias = qkv_bias
        self.qk_norm = qk_norm
        self.logit_shift = logit_shift
        self.source_format = source_format
        self.source_config = source_config
        self.source_generation_config = source_generation_config
        if head_dim is None and hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads "
                             f"{num_attention_heads}")
        if num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def _swiglu_width(hidden_size: int) -> int:
    """LLaMA's rule: 2/3 of 4d, rounded up to a multiple of 64."""
    width = int(8 * hidden_size / 3)
    return 64 * ((width + 63) // 64)
