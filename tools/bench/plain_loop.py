"""The reference: a minimal hand-written DeepSpeed ZeRO-3 loop training the same model on the same data.

It is what a user writes from the LLaDA guidelines without a framework: uniform t per sequence, Bernoulli(pi)
masks drawn on the device, full ``B x L x V`` logits, cross-entropy at the masked positions divided by pi and by
the number of tokens, DeepSpeed's default ZeRO-3 settings, bf16 and FusedAdam. ``throughput.py`` runs it next
to mdm-scale so both are timed on the same machine in the same session.
"""

from __future__ import annotations

import deepspeed
import torch
import torch.nn.functional as F

from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion


class PlainLoop:
    def __init__(self, config: MDMConfig, micro_batch: int, seq_len: int, world_size: int, lr: float = 1e-4):
        self.config, self.micro_batch, self.seq_len = config, micro_batch, seq_len
        on_gpu = torch.cuda.is_available()
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * world_size,
            "gradient_clipping": 1.0,
            "bf16": {"enabled": on_gpu},
            "zero_optimization": {"stage": 3},
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.1, "torch_adam": not on_gpu}},
            "steps_per_print": 10**9,
        }
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = MDMForMaskedDiffusion(config)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        self.device = self.engine.device
        self.tokens_per_step = micro_batch * seq_len

    def step(self) -> float:
        x0 = torch.randint(4, self.config.vocab_size, (self.micro_batch, self.seq_len), device=self.device)
        t = torch.rand(self.micro_batch, 1, device=self.device)
        p_mask = (1 - 1e-3) * t + 1e-3
        masked = torch.rand(x0.shape, device=self.device) < p_mask
        xt = torch.where(masked, torch.full_like(x0, self.config.mask_token_id), x0)
        logits = self.engine(xt).logits
        ce = F.cross_entropy(logits[masked].float(), x0[masked], reduction="none")
        loss = (ce / p_mask.expand_as(x0)[masked]).sum() / x0.numel()
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()
