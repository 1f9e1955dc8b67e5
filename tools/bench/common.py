"""Shared pieces of the benchmarks: random token data with an exact vocabulary, FLOP counting, peak rate.

FLOPs per trained token (forward + backward) follow ``mdm_scale/models/flops.py``, F = 6 N + 12 l d T with N
all parameters, l layers, d model width and T the sequence length. MIRROR's second row counts as a second
sequence. MFU = achieved F x tokens/s over the peak bf16 rate, reported against both the rate measured on the
machine (an 8192^3 bf16 matrix product) and the datasheet (989 TFLOP/s dense for H100/H200 SXM).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from mdm_scale.data.build import RunData
from mdm_scale.data.dataset import TokenizedData
from mdm_scale.data.tokenizer import SPECIAL_TOKENS
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.flops import flops_per_token as model_flops_per_token

DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}

PPOTS_SMALL_ESTIMATE = ["variance.t_sampler=ppots", "variance.t_sampler.x0=2", "variance.t_sampler.masks=2"]
"""P-POTS overrides with a small offline estimate: the benchmarks time training steps, not the estimate."""


def step_bench_parser(doc: str, preset: str, seq_len: int, micro_batch: int, warmup: int, out: str
                      ) -> argparse.ArgumentParser:
    """The options the step-timing benchmarks share (model shape, warm-up, MIRROR, overrides, output)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=preset)
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--micro-batch", type=int, default=micro_batch)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--mirror", action="store_true", help="MIRROR pairs")
    p.add_argument("--set", action="append", default=[], help="extra mdm-scale overrides")
    p.add_argument("--out", default=out)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def sync_device() -> None:
    """Wait for queued GPU work, so that host timers measure it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def vocabulary_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``vocab_size`` ids (4 specials, then ``t4``, ``t5``, ...)."""
    names = list(SPECIAL_TOKENS.values()) + [f"t{i}" for i in range(4, vocab_size)]
    backend = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token="<|unk|>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def random_blocks(vocab_size: int, seq_len: int, blocks: int, seed: int = 0) -> RunData:
    """Pretraining-style data: ``blocks`` rows of uniformly random non-special tokens, no padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab_size, size=blocks * seq_len, dtype=np.int64)
    data = TokenizedData(tokens, np.arange(blocks + 1, dtype=np.int64) * seq_len, np.zeros(blocks, dtype=np.int64))
    return RunData("pretrain", vocabulary_tokenizer(vocab_size), data, None)


def random_sft(vocab_size: int, max_len: int, records: int, seed: int = 0, median: int = 256) -> RunData:
    """SFT records of random non-special tokens whose lengths are log-normal (median ``median``, sigma 1),
    clipped to [32, ``max_len``]; the first quarter of each record is its prompt."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(median), 1.0, records)), 32, max_len).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(4, vocab_size, size=int(offsets[-1]), dtype=np.int64)
    return RunData("sft", vocabulary_tokenizer(vocab_size), TokenizedData(tokens, offsets, lengths // 4), None)


def parameter_count(config: MDMConfig) -> int:
    d, f, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    return layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + 2 * v * d + d


def flops_per_token(config: MDMConfig, seq_len: int) -> float:
    return model_flops_per_token(parameter_count(config), config.num_hidden_layers, config.hidden_size, seq_len)


def measured_peak_tflops(size: int = 8192, repeats: int = 20) -> float:
    """bf16 matrix-product rate on random data (median of ``repeats`` timed products after warm-up)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return 2 * size**3 / sorted(times)[len(times) // 2] / 1e12


def datasheet_peak(device_name: str) -> float | None:
    return next((rate for key, rate in DATASHEET_BF16_TFLOPS.items() if key in device_name), None)
