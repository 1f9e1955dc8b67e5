"""Decoding: LLaDA's masked-diffusion sampler and greedy left-to-right decoding for ARM checkpoints.

Masked diffusion (LLaDA ``generate``, docs/spec.md section 6): the answer window of ``gen_length`` positions starts all
[MASK] after the prompt and is filled block by block, left to right (``block_length`` positions per block,
``steps / num_blocks`` steps per block). At each step the model predicts every position at once:

    x0_i  = argmax_v  logits_iv / T + g_iv       (g ~ Gumbel(0, 1); T = 0: plain argmax, greedy)
    c_i   = softmax(logits_i)[x0_i]              (``low_confidence``; ``random``: c_i ~ U(0, 1))

and of the still-masked positions of the current block, the k with the highest confidence c_i keep their
prediction x0_i; all others stay masked ("low-confidence remasking"). k splits the block's masks evenly over
its steps (the first ``block_length mod steps`` steps take one more), so every mask is filled after the block's
last step and the prompt is never changed. [MASK] itself is never predicted. Gumbel-max with temperature T
samples x0_i from softmax(logits/T).

Random numbers (Gumbel noise, random confidences) are keyed by (seed, sample index, step) with the counter hash
of ``core/noise.py``, so a prompt decodes the same in any batch, on any rank and any number of ranks.

Rows are left-padded to the longest prompt with the attention mask hiding the pads (rotary attention depends
only on relative positions, so a left-padded row sees what an unpadded one sees). ARM checkpoints (causal
attention) decode greedily instead: each row's next token is the argmax at its current end, written into a
right-padded buffer (causal queries never see the padding after them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from mdm_scale.core.noise import keyed_uniform

GENERATION_STREAM = 0x47454E00
"""Base of the noise streams used by decoding (one per step: base + step); far from the training streams."""


class GenerationError(ValueError):
    """Bad decoding settings, named by their option."""


@dataclass(frozen=True)
class SamplingConfig:
    gen_length: int = 128
    """Positions in the answer window (masked diffusion) or new tokens (ARM)."""
    steps: int = 128
    """Model forwards for the whole window; a multiple of the number of blocks."""
    block_length: int = 32
    """Positions decoded per block (semi-autoregressive); ``gen_length`` must be a multiple of it."""
    temperature: float = 0.0
    """0 = greedy argmax (the paper's evaluation); > 0 samples from softmax(logits / temperature)."""
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    seed: int = 0
    """Key of the decoding noise (used only with temperature > 0 or random remasking)."""

    def check(self) -> None:
        if self.gen_length < 1:
            raise GenerationError(f"--gen-length {self.gen_length}: must be >= 1")
        if self.block_length < 1 or self.gen_length % self.block_length:
            raise GenerationError(f"--block-length {self.block_length}: must divide --gen-length {self.gen_length}")
        blocks = self.gen_length // self.block_length
        if self.steps < blocks or self.steps % blocks:
            raise GenerationError(f"--steps {self.steps}: must be a multiple of the number of blocks "
                                  f"({self.gen_length} / {self.block_length} = {blocks})")
        if self.temperature < 0:
            raise GenerationError(f"--temperature {self.temperature}: must be >= 0")
        if self.remasking not in ("low_confidence", "random"):
            raise GenerationError(f"--remasking {self.remasking!r}: choose low_confidence or random")


def transfer_counts(masked: int, steps: int) -> list[int]:
    """How many positions each step unmasks: ``masked`` split evenly, the remainder on the first steps."""
    base, extra = divmod(masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def left_pad(prompts: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, real)``: prompts right-aligned in a ``(B, width)`` buffer and the mask of real positions."""
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    real = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.int64)
            real[row, width - len(prompt):] = True
    return ids, real


@torch.no_grad()
def diffusion_generate(model, prompts: list[list[int]], sample_index: list[int], mask_id: int, pad_id: int,
                       cfg: SamplingConfig, device: torch.device) -> torch.Tensor:
    """``(B, P + gen_length)``: the left-padded prompts (P = the longest prompt) followed by the decoded answer
    windows of a masked diffusion model."""
    cfg.check()
    width = max(len(p) for p in prompts)
    prompt_ids, real = left_pad(prompts, width, pad_id)
    batch = len(prompts)
    x = torch.cat([prompt_ids, torch.full((batch, cfg.gen_length), mask_id, dtype=torch.int64)], 1).to(device)
    real = torch.cat([real, torch.ones((batch, cfg.gen_length), dtype=torch.bool)], 1).to(device)
    attention_mask = None if bool(real.all()) else real
    keys = torch.tensor(sample_index, dtype=torch.int64, device=device)
    blocks = cfg.gen_length // cfg.block_length
    steps_per_block = cfg.steps // blocks
    step = 0
    for block in range(blocks):
        start = width + block * cfg.block_length
        current = x[:, start:start + cfg.block_length]  # a view: writing into it writes into x
        for count in transfer_counts(cfg.block_length, steps_per_block):
            # only the current block's logits in fp32 (B x block x V, not B x L x V)
            logits = model(input_ids=x, attention_mask=attention_mask).logits[:, start:start + cfg.block_length]
            logits = logits.float()
            logits[..., mask_id] = -torch.inf  # a decoded position is never [MASK] again
            prediction, confidence = _predict(logits, keys, step, cfg)
            confidence = torch.where(current == mask_id, confidence, -torch.inf)
            if count:
                chosen = confidence.topk(count, dim=1).indices
                current.scatter_(1, chosen, prediction.gather(1, chosen))
            step += 1
    return x.cpu()


def _predict(logits: torch.Tensor, keys: torch.Tensor, step: int, cfg: SamplingConfig
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted token and its confidence at every position of the current block (see the module docstring);
    the noise is keyed by (step, position in the block), so it does not depend on the padding."""
    batch, length, vocab = logits.shape
    stream = GENERATION_STREAM + 2 * step
    if cfg.temperature > 0:
        u = keyed_uniform(cfg.seed, keys, stream, length * vocab).view(batch, length, vocab)
        prediction = (logits / cfg.temperature - torch.log(-torch.log(u))).argmax(-1)
    else:
        prediction = logits.argmax(-1)
    if cfg.remasking == "random":
        return prediction, keyed_uniform(cfg.seed, keys, stream + 1, length)
    return prediction, torch.softmax(logits, -1).gather(-1, prediction[..., None]).squeeze(-1)


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], pad_id: int, eos_id: int | None, gen_length: int,
                    device: torch.device) -> torch.Tensor:
    """Greedy left-to-right decoding of a causal model: ``(B, gen_length)`` new tokens (EOS-filled after a
    row's first EOS; decoding stops once every row has one). The buffer after each prompt starts as EOS, which
    no causal query reads before it is written."""
    width = max(len(p) for p in prompts) + gen_length
    x = torch.full((len(prompts), width), pad_id if eos_id is None else eos_id, dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        x[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
    x = x.to(device)
    ends = torch.tensor([len(p) for p in prompts], device=device)
    rows = torch.arange(len(prompts), device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(gen_length):
        nxt = model(input_ids=x[:, :int(ends.max())], attention_mask=None).logits[rows, ends - 1].float().argmax(-1)
        if eos_id is not None:
            nxt = torch.where(done, eos_id, nxt)
            done |= nxt == eos_id
        x[rows, ends] = nxt
        ends += 1
        if eos_id is not None and bool(done.all()):
            break
    starts = torch.tensor([len(p) for p in prompts], device=device)
    return torch.stack([x[r, starts[r]:starts[r] + gen_length] for r in range(len(prompts))]).cpu()
