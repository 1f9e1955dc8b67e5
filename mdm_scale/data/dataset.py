"""Turn checked records into token sequences held in memory.

- SFT: ``[bos] prompt  response [eos]`` (``data.response_eos_pad``: EOS repeated until the response has that
  many tokens); ``prompt_len`` marks where the response starts. Positions before it
  (the prompt) and after the end (padding) are never masked and never in the loss. A prompt that leaves no
  room for a response within ``seq_len`` is a bad record; an over-long response is truncated or the record is
  dropped (``data.overlong``), and both are counted.
- Pretraining: every text gets ``[eos]`` appended, all texts are concatenated and cut into blocks of exactly
  ``seq_len`` tokens (no padding; the incomplete tail is dropped and counted); every position is eligible.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from mdm_scale.config.schema import DataConfig
from mdm_scale.data.records import ReadReport, reject
from mdm_scale.data.tokenizer import special_ids


@dataclass
class TokenizedData:
    """Example ``i`` is ``tokens[offsets[i]:offsets[i+1]]``; its first ``prompt_lens[i]`` tokens are prompt."""

    tokens: np.ndarray
    offsets: np.ndarray
    prompt_lens: np.ndarray
    counts: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def example(self, i: int) -> tuple[np.ndarray, int]:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]], int(self.prompt_lens[i])

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def tokenize_records(records: datasets.Dataset, report: ReadReport, task: str, tokenizer: PreTrainedTokenizerBase,
                     cfg: DataConfig) -> TokenizedData:
    if task == "sft":
        return _tokenize_sft(records, report, tokenizer, cfg)
    return _pack_pretraining(records, tokenizer, cfg.seq_len)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat_template: bool) -> list[list[int]]:
    """Prompt token ids exactly as SFT training sees them: ``[bos] prompt``, or the chat template's user turn
    and generation prompt (generation encodes its prompts with this too)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and not chat_template else []
    if chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    return [bos + ids for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def _tokenize_sft(records, report, tokenizer, cfg: DataConfig) -> TokenizedData:
    _, eos = special_ids(tokenizer)
    tail = [eos] if eos is not None else []

    def with_tail(ids: list[int]) -> list[int]:
        return ids + tail * max(1, cfg.response_eos_pad - len(ids))

    def encode(batch):
        response_ids = tokenizer(batch["response"], add_special_tokens=False)["input_ids"]
        return {"prompt_ids": encode_prompts(tokenizer, batch["prompt"], cfg.chat_template),
                "response_ids": [with_tail(r) for r in response_ids]}

    encoded = records.map(encode, batched=True, keep_in_memory=True, remove_columns=["prompt", "response"])
    pieces, prompt_lens, counts = [], [], Counter()
    for prompt, response, line in zip(encoded["prompt_ids"], encoded["response_ids"], encoded["line"]):
        if len(prompt) >= cfg.seq_len:
            reject(report, f"{report.path}:{line}",
                   f"over-long prompt ({len(prompt)} tokens leave no room for a response in "
                   f"data.seq_len={cfg.seq_len})", cfg.on_bad_record)
            continue
        if cfg.response_eos_pad and len(response) > cfg.response_eos_pad:
            if cfg.overlong == "drop":
                counts["dropped (response over data.response_eos_pad)"] += 1
                continue
            counts["truncated (response over data.response_eos_pad)"] += 1
            response = response[:cfg.response_eos_pad]
        if len(prompt) + len(response) > cfg.seq_len:
            if cfg.overlong == "drop":
                counts["dropped (over-long)"] += 1
                continue
            counts["truncated (over-long)"] += 1
            response = response[:cfg.seq_len - len(prompt)]
        pieces.append(np.asarray(prompt + response, dtype=np.int64))
        prompt_lens.append(len(prompt))
    if not pieces:
        raise ValueError(f"{report.path}: no record fits data.seq_len={cfg.seq_len} ({dict(counts)})")
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    counts.update(report.skipped)
    return TokenizedData(np.concatenate(pieces), offsets, np.asarray(prompt_lens, dtype=np.int64), counts)


def _pack_pretraining(records, tokenizer, seq_len: int) -> TokenizedData:
    _, eos = special_ids(tokenizer)
    tail = [eos] if eos is not None else []
    encoded = records.map(lambda b: {"ids": [ids + tail for ids in tokenizer(b["text"], add_special_tokens=False)
                                             ["input_ids"]]}, batched=True, keep_in_memory=True,
                          remove_columns=["text"])
    stream = np.fromiter((t for ids in encoded["ids"] for t in ids), dtype=np.int64)
    blocks = len(stream) // seq_len
    if blocks == 0:
        raise ValueError(f"the pretraining text has {len(stream)} tokens, fewer than one block of "
                         f"data.seq_len={seq_len}")
    counts = Counter({"tail tokens dropped": len(stream) - blocks * seq_len})
    return TokenizedData(stream[:blocks * seq_len], np.arange(blocks + 1, dtype=np.int64) * seq_len,
                         np.zeros(blocks, dtype=np.int64), counts)
