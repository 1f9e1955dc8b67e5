"""The reference: a minimal hand-written DeepSpeed loop with its own small model, no mdm-scale code.

It is what a user writes in an hour from the LLaDA guidelines without a framework, tuned the way such a user
would tune it:
- model: ``nn.RMSNorm``; one bias-free ``Linear(d, 3d)`` for q, k and v; rotary positions; non-causal SDPA
  (PyTorch picks flash or cuDNN attention); SwiGLU with one ``Linear(d, 2f)`` up-projection; untied
  embedding and output layer (the same shapes, hence the same FLOP count, as mdm-scale's model);
- objective: uniform t per sequence, Bernoulli(pi) masks drawn on the device, full ``B x L x V`` logits cast
  to fp32, cross-entropy at the masked positions divided by pi and by the number of tokens;
- DeepSpeed: bf16, optimizer ``AdamW`` (FusedAdam on GPU), ``overlap_comm`` and ``contiguous_gradients``,
  ``stage3_prefetch_bucket_size`` 5e8 and ``stage3_param_persistence_threshold`` 1e6; ZeRO stage 3 unless
  the bench asks for another (``plain_zero1`` and ``plain_zero2`` subjects).

``throughput.py`` runs it next to mdm-scale so that both are timed on the same machine in the same job.
"""

from __future__ import annotations

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class PlainBlock(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x, cos, sin):
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(_rotate(q, cos, sin), _rotate(k, cos, sin), v)
        x = x + self.out(attn.transpose(1, 2).reshape(b, length, d))
        gate, up = self.up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class PlainModel(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ffn: int, theta: float = 10000.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(PlainBlock(d, heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-5)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head_dim, self.theta = d // heads, theta

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        inv = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, device=ids.device) / self.head_dim)
        angles = torch.outer(torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32), inv).repeat(1, 2)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


class PlainLoop:
    def __init__(self, shape: dict, micro_batch: int, seq_len: int, world_size: int, zero_stage: int = 3,
                 mask_token_id: int = 2, lr: float = 1e-4):
        self.vocab, self.micro_batch, self.seq_len, self.mask_token_id = shape["vocab_size"], micro_batch, seq_len, \
            mask_token_id
        on_gpu = torch.cuda.is_available()
        zero = {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True}
        if zero_stage == 3:
            zero.update(stage3_prefetch_bucket_size=int(5e8), stage3_param_persistence_threshold=int(1e6))
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * world_size,
            "gradient_clipping": 1.0,
            "bf16": {"enabled": on_gpu},
            "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.1, "torch_adam": not on_gpu}},
            "steps_per_print": 10**9,
        }
        with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage == 3):
            model = PlainModel(self.vocab, shape["hidden_size"], shape["num_hidden_layers"],
                               shape["num_attention_heads"], shape["intermediate_size"],
                               shape.get("rope_theta", 10000.0))
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        self.device = self.engine.device
        self.tokens_per_step = micro_batch * seq_len

    def step(self) -> int:
        """One optimiser step; returns the tokens it processed (no host synchronisation)."""
        x0 = torch.randint(4, self.vocab, (self.micro_batch, self.seq_len), device=self.device)
        t = torch.rand(self.micro_batch, 1, device=self.device)
        p_mask = ((1 - 1e-3) * t + 1e-3).expand_as(x0)
        masked = torch.rand(x0.shape, device=self.device) < p_mask
        xt = torch.where(masked, self.mask_token_id, x0)
        logits = self.engine(xt).float()
        ce = F.cross_entropy(logits[masked], x0[masked], reduction="none")
        loss = (ce / p_mask[masked]).sum() / x0.numel()
        self.engine.backward(loss)
        self.engine.step()
        return self.tokens_per_step
