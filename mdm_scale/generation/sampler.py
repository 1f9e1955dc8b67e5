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

Fast decoding (Fast-dLLM, Wu et al. 2025, arXiv 2505.22618), two options that compose with the above:

- ``threshold`` tau (confidence-threshold parallel unmasking): instead of a fixed k, each step keeps every
  still-masked position of the block with c_i > tau, and in each row with a mask left at least the most confident
  one; a block ends when no row has a mask left in it (at most ``block_length`` steps), so the number of forwards
  adapts to how sure the model is. A row that has finished the block waits, unchanged, for the others.
- ``cache`` ``prefix`` / ``dual``: the block-wise approximate key/value cache of ``models/kv_cache.py``. The
  first step of each block is the ordinary full forward and records every layer's keys and values; the block's
  later steps forward only [a, L) (prefix: the block and everything after it) or [a, b) (dual: the block alone),
  attending to the recorded keys and values elsewhere. For a model with a logit shift (``logit_shift``: logits at
  i come from the hidden state at i - 1) the slice starts one position earlier, at a - 1.

and one that computes exactly the same thing faster, on a GPU:

- ``cuda_graph``: the whole-sequence forward of every step is recorded once per batch in a CUDA graph and
  replayed (``generation/cuda_graph.py``); at small batches a forward is bound by launching its kernels, which a
  replay does in one launch. It needs a CUDA device and ``cache: none`` (the cached forwards change shape
  at every block).

With none of them the sampler is the fixed schedule above, bit for bit.

Random numbers (Gumbel noise, random confidences) are keyed by (seed, sample index, step) with the counter hash
of ``core/noise.py``, so a prompt decodes the same in any batch, on any rank and any number of ranks. The step of
the key is ``block * steps_per_block + i`` for the i-th step of a block (``block * block_length + i`` with a
threshold): every row of a batch starts a block at the same step, so a row's noise does not depend on how many
steps its neighbours needed.

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
from mdm_scale.generation.cuda_graph import GraphedCall
from mdm_scale.models.kv_cache import KVCache
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion

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
    threshold: float | None = None
    """Confidence-threshold parallel unmasking (Fast-dLLM): every step of a block unmasks each masked position of
    the block whose confidence is above it, and at least the most confident one; a block ends when no mask is left,
    so the number of forwards adapts (``steps`` is unused). None: the fixed schedule of ``steps``."""
    cache: Literal["none", "prefix", "dual"] = "none"
    """Block-wise approximate KV cache (``models/kv_cache.py``): ``prefix`` reuses the keys and values of the
    positions before the block, ``dual`` also those after it; both are recorded by each block's first forward."""
    cuda_graph: bool = False
    """Replay each step's forward from a CUDA graph recorded at the batch's first forward (``cuda_graph.py``): the
    same kernels on the same buffers, without their launch cost. CUDA devices, ``cache: none`` only."""

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
        if self.threshold is not None:
            if not 0 <= self.threshold <= 1:
                raise GenerationError(f"--threshold {self.threshold}: must be in [0, 1] (a softmax confidence)")
            if self.remasking != "low_confidence":
                raise GenerationError(f"--threshold needs --remasking low_confidence (it thresholds the model's "
                                      f"confidence), got {self.remasking}")
        if self.cache not in ("none", "prefix", "dual"):
            raise GenerationError(f"--cache {self.cache!r}: choose none, prefix or dual")
        if self.cuda_graph and self.cache != "none":
            raise GenerationError(f"--cuda-graph with --cache {self.cache}: a graph replays one forward of fixed "
                                  f"shape and the cached forwards change shape at every block; give one of them")


def sampling_config(gen_length: int, steps: int | None, block_length: int | None, temperature: float = 0.0,
                    remasking: str = "low_confidence", seed: int = 0, threshold: float | None = None,
                    cache: str = "none", cuda_graph: bool = False) -> SamplingConfig:
    """The settings of ``generate``, ``eval`` and the lm-eval model, where unset ``steps`` and ``block_length``
    mean ``gen_length`` (one token per step, one block); ``steps`` and ``threshold`` exclude each other."""
    if steps is not None and threshold is not None:
        raise GenerationError(f"--steps {steps} and --threshold {threshold}: give one (the threshold decides how "
                              f"many steps a block takes)")
    cfg = SamplingConfig(gen_length=gen_length, steps=steps or gen_length, block_length=block_length or gen_length,
                         temperature=temperature, remasking=remasking, seed=seed, threshold=threshold, cache=cache,
                         cuda_graph=cuda_graph)
    cfg.check()
    return cfg


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


def diffusion_generate(model, prompts: list[list[int]], sample_index: list[int], mask_id: int, pad_id: int,
                       cfg: SamplingConfig, device: torch.device) -> torch.Tensor:
    """``(B, P + gen_length)``: the left-padded prompts (P = the longest prompt) followed by the decoded answer
    windows of a masked diffusion model."""
    return Decoding(model, prompts, sample_index, mask_id, pad_id, cfg, device).run()


class Decoding:
    """One batch of prompts being decoded: the buffer ``x`` (left-padded prompts, then the answer window), the
    block loop (``run`` decodes every block in order with ``decode_block``) and ``row_forwards``, the forwards
    each row took part in while it still had a mask in the current block (with a threshold, a row that has
    finished a block does not count the forwards it waits through)."""

    def __init__(self, model, prompts: list[list[int]], sample_index: list[int], mask_id: int, pad_id: int,
                 cfg: SamplingConfig, device: torch.device):
        cfg.check()
        if cfg.cache != "none" and not isinstance(model, MDMForMaskedDiffusion):
            raise GenerationError(f"--cache {cfg.cache}: {type(model).__name__} has no cache-aware forward (only the "
                                  f"built-in model class has one); use --cache none")
        if cfg.cuda_graph and device.type != "cuda":
            raise GenerationError(f"--cuda-graph needs a CUDA device; decoding runs on {device}")
        self.model, self.mask_id, self.cfg = model, mask_id, cfg
        self.width = max(len(p) for p in prompts)
        prompt_ids, real = left_pad(prompts, self.width, pad_id)
        batch = len(prompts)
        self.x = torch.cat([prompt_ids, torch.full((batch, cfg.gen_length), mask_id, dtype=torch.int64)], 1).to(device)
        real = torch.cat([real, torch.ones((batch, cfg.gen_length), dtype=torch.bool)], 1).to(device)
        self.attention_mask = None if bool(real.all()) else real
        self.keys = torch.tensor(sample_index, dtype=torch.int64, device=device)
        self.blocks = cfg.gen_length // cfg.block_length
        self.steps_per_block = cfg.steps // self.blocks
        self.shift = logit_shift(model)
        self.row_forwards = torch.zeros(batch, dtype=torch.int64, device=device)
        self.full_logits = self._full_logits
        if cfg.cuda_graph:  # reads self.x and self.attention_mask, which stay in place: x is written in place
            self.full_logits = GraphedCall(self._full_logits, f"{type(model).__name__}'s forward")

    def run(self) -> torch.Tensor:
        """Decode every block; ``(B, P + gen_length)`` on the CPU, as ``diffusion_generate``."""
        for block in range(self.blocks):
            self.decode_block(block)
        return self.x.cpu()

    @torch.no_grad()
    def decode_block(self, block: int) -> int:
        """Fill block ``block`` (every mask of it); returns the number of model forwards it took. Without
        autograd whoever calls it (``eval``, the lm-eval model and the benchmarks call ``run`` or this directly):
        with it, every forward would record its graph, and the cached steps' in-place writes into the cache
        would chain each step's graph, with all its activations, onto the cache until the block ends."""
        cfg = self.cfg
        start = self.width + block * cfg.block_length
        current = self.x[:, start:start + cfg.block_length]  # a view: writing into it writes into x
        if cfg.threshold is None:
            quotas, per_block = transfer_counts(cfg.block_length, self.steps_per_block), self.steps_per_block
        else:  # at most one step per position, as every step unmasks at least one in each row with masks left
            quotas, per_block = [None] * cfg.block_length, cfg.block_length
        cache = None if cfg.cache == "none" else KVCache()
        forwards = 0
        for i, quota in enumerate(quotas):
            masked = current == self.mask_id
            if quota is None and not bool(masked.any()):
                break
            logits = self._block_logits(start, cache, refresh=i == 0).float()
            forwards += 1
            self.row_forwards += masked.any(1)
            logits[..., self.mask_id] = -torch.inf  # a decoded position is never [MASK] again
            prediction, confidence = _predict(logits, self.keys, block * per_block + i, cfg)
            confidence = torch.where(masked, confidence, -torch.inf)
            if quota is None:
                current.copy_(torch.where(threshold_choice(confidence, masked, cfg.threshold), prediction, current))
            elif quota:
                chosen = confidence.topk(quota, dim=1).indices
                current.scatter_(1, chosen, prediction.gather(1, chosen))
        return forwards

    def _block_logits(self, start: int, cache: KVCache | None, refresh: bool) -> torch.Tensor:
        """Logits ``(B, block_length, V)`` of the block starting at ``start``: from a forward of the whole sequence
        (no cache, or the refresh that records the cache), else from a forward of only [s, e) against the cache
        (prefix: e = the end of the sequence; dual: e = the end of the block). s is the block's start, or one
        position earlier for a model whose logits at i come from its hidden state at i - 1 (``logit_shift``)."""
        end = start + self.cfg.block_length
        if cache is None:  # the fixed schedule's call as it always was; fp32 only for the block (B x block x V)
            return self.full_logits()[:, start:end]
        if refresh:
            return self.model(input_ids=self.x, attention_mask=self.attention_mask, kv_cache=cache).logits[:, start:end]
        s = max(start - self.shift, 0)
        e = self.x.shape[1] if self.cfg.cache == "prefix" else end
        logits = self.model(input_ids=self.x[:, s:e], attention_mask=self.attention_mask, kv_cache=cache,
                            query_start=s).logits
        return logits[:, start - s:end - s]

    def _full_logits(self) -> torch.Tensor:
        """``(B, L, V)`` logits of a forward of the whole buffer (eager, or recorded by ``GraphedCall``)."""
        return self.model(input_ids=self.x, attention_mask=self.attention_mask).logits


def threshold_choice(confidence: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """The positions a threshold step unmasks: every masked one with confidence above ``threshold``, and in every
    row with a mask left at least the most confident masked one (``confidence`` is -inf where not masked)."""
    chosen = masked & (confidence > threshold)
    chosen.scatter_(1, confidence.argmax(1, keepdim=True), True)
    return chosen & masked


def logit_shift(model) -> int:
    """1 for a model whose logits at position i come from its hidden state at i - 1 (Dream's convention, applied
    inside its forward; config field ``logit_shift``), else 0."""
    return int(bool(getattr(getattr(model, "config", None), "logit_shift", False)))


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
