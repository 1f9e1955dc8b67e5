"""``--model mdm_scale`` for lm-eval (EleutherAI's evaluation harness, the optional extra ``lm-eval``).

    mdm-scale lm-eval --model mdm_scale --tasks gsm8k \\
        --model_args pretrained=exports/x,gen_length=256,steps=256,block_length=32

``mdm-scale lm-eval`` imports this module, which registers the model, and hands every argument to lm-eval's
own command line; in Python, ``import mdm_scale.generation.lm_eval_model`` does the same for
``lm_eval.simple_evaluate(model="mdm_scale", ...)``. ``pretrained`` is anything ``--checkpoint`` takes: an
``mdm-scale export``, a training run or ``checkpoints/step_*`` directory, or a local Hugging Face masked LM
(``trust_remote_code=true`` for LLaDA). One process. The model args are those of ``MDMScaleLM`` except
``batch_size`` and ``device``, which come from lm-eval's ``--batch_size`` (rows per forward: prompts when
generating, Monte Carlo draws when scoring) and ``--device`` (its default ``cuda:0`` falls back to the CPU when
there is no GPU).

- ``generate_until``: the project's LLaDA sampler (``sampler.py``) with ``gen_length``, ``steps``,
  ``block_length``, ``temperature``, ``remasking``, ``seed`` and the fast-decoding options ``threshold``,
  ``cache`` and ``cuda_graph`` (as ``--threshold``, ``--cache`` and ``--cuda-graph`` of ``mdm-scale generate``),
  decoding exactly what ``mdm-scale generate``
  decodes for the same prompts in the same order (the noise is keyed by the request's position), cut before the
  first of the task's ``until`` strings. The answer window is ``gen_length`` whatever the task's
  ``max_gen_toks``. ARM checkpoints decode greedily left to right.
- ``loglikelihood``: a masked diffusion model has no exact log p(c | x). As LLaDA's evaluation does, it returns
  a Monte Carlo estimate of the lower bound that the training loss also estimates (docs/spec.md section 1), for a
  continuation c of L tokens after the context x:

      log p(c | x) >= E_{l ~ U{1..L}} E_{M ~ U(l-subsets of c)} [ (L / l) * sum_{i in M} log p(c_i | x, c_{-M}) ]

  where c_{-M} is c with the positions M replaced by [MASK] (l/L is the masking rate; exactly l positions are
  masked, as in LLaDA's estimate). The mean runs over ``mc_num`` draws j = 0 .. mc_num - 1 with stratified
  l_j = 1 + floor(L (u + j) / mc_num) for one u ~ U[0, 1): a uniformly chosen j gives l uniform on {1..L}, so
  the mean is unbiased, and each l gets its share of the draws. M_j is the l_j positions with the smallest
  keyed uniforms. The noise is keyed by (seed, a hash of the context and continuation texts, draw), so a pair
  gets the same estimate in any batch, order or run. ``is_greedy`` is computed only with ``check_greedy=true``
  (LLaDA's check: decoding L tokens one per step, greedy with low-confidence remasking, gives c); else False.
  ARM checkpoints are not supported here (a clear error).
- ``loglikelihood_rolling`` (perplexity tasks): not implemented; raises ``NotImplementedError``.
"""

from __future__ import annotations

import hashlib
import math
import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mdm_scale.core.noise import keyed_uniform
from mdm_scale.generation.evaluate import decode_shard, resolve_dtype
from mdm_scale.generation.model_source import GenerationModel, load_generation_model
from mdm_scale.generation.sampler import GenerationError, SamplingConfig, diffusion_generate, sampling_config

LIKELIHOOD_STREAM = 0x4C4C0000
"""Base of the noise streams of the likelihood estimate (``+ 0``: u of the stratified l; ``+ 1 + j``: the
mask uniforms of draw j); far from the training and decoding streams."""


def pair_key(context: str, continuation: str) -> int:
    """A 62-bit key of the (context, continuation) texts, the 'sample index' of the likelihood noise."""
    digest = hashlib.sha256(f"{len(context)}:{context}{continuation}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


@torch.no_grad()
def likelihood_terms(model, prefix: list[int], continuation: list[int], mask_id: int, mc_num: int, seed: int,
                     key: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """The ``mc_num`` draws ``(L / l_j) * sum_{i in M_j} log p(c_i | x, c_{-M_j})`` (fp64, on the CPU); their
    mean is the estimate of log p(continuation | prefix) (module docstring)."""
    length = len(continuation)
    keys = torch.tensor([key], dtype=torch.int64)
    u = float(keyed_uniform(seed, keys, LIKELIHOOD_STREAM)[0])
    counts = [1 + math.floor(length * (u + j) / mc_num) for j in range(mc_num)]
    sequence = torch.tensor(prefix + continuation, dtype=torch.int64)
    target = sequence[len(prefix):]
    terms = []
    for start in range(0, mc_num, batch_size):
        draws = range(start, min(start + batch_size, mc_num))
        uniforms = torch.stack([keyed_uniform(seed, keys, LIKELIHOOD_STREAM + 1 + j, length)[0] for j in draws])
        ranks = uniforms.argsort(dim=1).argsort(dim=1)  # rank of each position's uniform within its draw
        masked = ranks < torch.tensor([counts[j] for j in draws])[:, None]
        x = sequence.repeat(len(draws), 1)
        x[:, len(prefix):] = torch.where(masked, mask_id, target)
        logits = model(input_ids=x.to(device), attention_mask=None).logits[:, len(prefix):]
        logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, target.to(device)[None, :, None].expand(
            len(draws), -1, 1)).squeeze(-1).cpu()
        weight = torch.tensor([length / counts[j] for j in draws], dtype=torch.float64)
        terms.append(weight * (logp * masked).sum(dim=1))
    return torch.cat(terms)


@register_model("mdm_scale")
class MDMScaleLM(LM):
    """An mdm-scale (or other local masked diffusion) model behind lm-eval's ``LM`` interface."""

    def __init__(self, pretrained: str, gen_length: int = 128, steps: int | None = None,
                 block_length: int | None = None, temperature: float = 0.0, remasking: str = "low_confidence",
                 seed: int = 0, threshold: float | None = None, cache: str | None = "none",
                 cuda_graph: bool = False, mc_num: int = 128,
                 check_greedy: bool = False, batch_size: int | str = 16, dtype: str = "auto",
                 trust_remote_code: bool = False, device: str | None = None):
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise GenerationError("--batch_size auto is not supported by --model mdm_scale; give a number")
        if int(mc_num) < 1:
            raise GenerationError(f"model arg mc_num={mc_num}: must be >= 1")
        self.sampling = sampling_config(int(gen_length), int(steps) if steps else None,
                                        int(block_length) if block_length else None, float(temperature), remasking,
                                        int(seed), None if threshold is None else float(threshold),
                                        cache or "none",  # lm-eval reads cache=none as None
                                        bool(cuda_graph))
        self.mc_num, self.seed, self.check_greedy = int(mc_num), int(seed), bool(check_greedy)
        self.batch_size = int(batch_size)
        self._device = torch.device(device or "cuda")
        if self._device.type == "cuda" and not torch.cuda.is_available():  # lm-eval's default is cuda:0
            print(f"--model mdm_scale: no CUDA device, running on the CPU instead of {device}", file=sys.stderr)
            self._device = torch.device("cpu")
        self.gm: GenerationModel = load_generation_model(
            pretrained, self._device, resolve_dtype(dtype, self._device.type == "cuda"), bool(trust_remote_code))
        if self.gm.mask_token_id is None and not self.gm.causal:
            raise GenerationError(f"{pretrained}: the model has no [MASK] token id")

    def generate_until(self, requests) -> list[str]:
        contexts = [request.args[0] for request in requests]
        texts = decode_shard(self.gm, contexts, self.sampling, self.batch_size, 0, 1, self._device)
        outputs = []
        for i, request in enumerate(requests):
            until = request.args[1].get("until") or []
            text = texts[i]
            for stop in [until] if isinstance(until, str) else until:
                text = text.split(stop)[0] if stop else text
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return outputs

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        if self.gm.causal:
            raise NotImplementedError("loglikelihood of ARM checkpoints (train.objective: arm) is not implemented "
                                      "for --model mdm_scale; generation tasks work")
        results = []
        for request in requests:
            context, continuation = request.args
            result = self.score(context, continuation)
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def score(self, context: str, continuation: str) -> tuple[float, bool]:
        """``(estimate of log p(continuation | context), is_greedy)`` for one pair."""
        prefix, target = self.encode_pair(context, continuation)
        terms = likelihood_terms(self.gm.model, prefix, target, self.gm.mask_token_id, self.mc_num, self.seed,
                                 pair_key(context, continuation), self.batch_size, self._device)
        return float(terms.mean()), self.check_greedy and self.greedy_decodes(prefix, target)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The ids of the context and of the continuation, each encoded on its own as SFT training encodes
        prompt and response (``[bos] prompt`` or the chat template; the response's plain ids). A continuation
        with no tokens is an error."""
        from mdm_scale.data.dataset import encode_prompts

        prefix = encode_prompts(self.gm.tokenizer, [context], self.gm.chat_template)[0]
        target = self.gm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not target:
            raise GenerationError(f"loglikelihood: the continuation {continuation!r} encodes to no tokens")
        return prefix, target

    def greedy_decodes(self, prefix: list[int], target: list[int]) -> bool:
        greedy = SamplingConfig(gen_length=len(target), steps=len(target), block_length=len(target))
        decoded = diffusion_generate(self.gm.model, [prefix], [0], self.gm.mask_token_id, 0, greedy, self._device)
        return decoded[0, len(prefix):].tolist() == target

    def loglikelihood_rolling(self, requests) -> list[float]:
        raise NotImplementedError("loglikelihood_rolling (perplexity tasks) is not implemented for --model "
                                  "mdm_scale; use generation or multiple-choice tasks")
