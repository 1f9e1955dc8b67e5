"""Turn checked records into token sequences, and flag the tokens that are scored (masked and predicted).

- SFT ``{prompt, response}``: ``[bos] prompt response [eos]`` (``data.response_eos_pad``: EOS repeated until the
  response has that many tokens); the response and its EOS are scored, the prompt never. A prompt that leaves no
  room for a response within ``seq_len`` is a bad record; an over-long response is truncated or the record is
  dropped (``data.overlong``), and both are counted.
- chat ``{messages}``: rendered by ``data/chat.py`` (the tokenizer's chat template, or the plain template); every
  assistant turn is scored (its content and the template's end of turn), everything else is prompt. With
  ``data.chat_turns: joint`` a conversation is one sequence; with ``per_turn`` each assistant turn is one, with
  all earlier turns as its prompt. ``data.response_eos_pad`` pads the sequence's last assistant turn with EOS; a
  sequence whose first scored token lies beyond ``seq_len`` is a bad record, a longer one is cut at ``seq_len`` or
  dropped (``data.overlong``), counted. The answer-length normalisation 1/n of the loss counts the scored tokens.
- pretraining ``{text}``: every text gets ``[eos]`` appended; a source's texts form one token stream, cut into
  blocks of ``seq_len`` when read (``examples.TokenBlocks``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from mdm_scale.config.schema import DataConfig
from mdm_scale.data.chat import ChatRenderer, plain_header
from mdm_scale.data.records import DataError, DataProblem
from mdm_scale.data.tokenizer import special_ids


@dataclass
class Encoded:
    """One sequence: token ids and, for SFT, which of them are scored."""

    ids: list[int]
    scored: np.ndarray | None = None


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str | list[dict]], chat_template: bool
                   ) -> list[list[int]]:
    """Prompt token ids exactly as SFT training sees them (generation encodes its prompts with this too): a text
    prompt as ``[bos] prompt``, or the chat template's user turn and generation prompt (``chat_template``); a
    conversation (list of messages) rendered with its generation prompt (``data/chat.py``)."""
    if not prompts:
        return []
    renderer, bos = ChatRenderer(tokenizer), [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    texts, heads = [], []
    for prompt in prompts:
        if isinstance(prompt, list) or chat_template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            texts.append(renderer.render(messages, add_generation_prompt=True))
            heads.append([])
        else:
            texts.append(prompt)
            heads.append(bos)
    return [head + ids for head, ids in zip(heads, tokenizer(texts, add_special_tokens=False)["input_ids"])]


def vocabulary_texts(record: dict, task: str) -> list[str]:
    """The texts whose characters a character tokenizer needs for ``record`` (chat: the plain template's)."""
    if task == "pretrain":
        return [record["text"]]
    if record.get("messages") is not None:
        return [plain_header(m["role"]) + m["content"] + "\n" for m in record["messages"]]
    return [record["prompt"], record["response"]]


class RecordEncoder:
    """Checked records of one task -> sequences. ``counts`` collects what was truncated or dropped."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, task: str):
        self.tokenizer, self.cfg, self.task = tokenizer, cfg, task
        _, eos = special_ids(tokenizer)
        self.tail = [eos] if eos is not None else []
        self.renderer = ChatRenderer(tokenizer)
        self.counts: Counter = Counter()

    def encode(self, records: list[dict]) -> list[list[Encoded] | DataProblem]:
        """Per record: its sequences (pretraining and SFT one, ``per_turn`` chat one per assistant turn, none if
        dropped), or the problem that makes it a bad record."""
        if self.task == "pretrain":
            encoded = self.tokenizer([r["text"] for r in records], add_special_tokens=False)["input_ids"]
            return [[Encoded(ids + self.tail)] for ids in encoded]
        out: list = [None] * len(records)
        pairs = [i for i, r in enumerate(records) if r.get("messages") is None]
        for i, result in zip(pairs, self._prompt_response([records[i] for i in pairs])):
            out[i] = result
        chats = [i for i, r in enumerate(records) if r.get("messages") is not None]
        for i, result in zip(chats, self._chats([records[i]["messages"] for i in chats])):
            out[i] = result
        return out

    def _prompt_response(self, records: list[dict]) -> list[list[Encoded] | DataProblem]:
        if not records:
            return []
        cfg = self.cfg
        prompts = encode_prompts(self.tokenizer, [r["prompt"] for r in records], cfg.chat_template)
        responses = self.tokenizer([r["response"] for r in records], add_special_tokens=False)["input_ids"]
        out = []
        for prompt, response in zip(prompts, responses):
            response = response + self.tail * max(1, cfg.response_eos_pad - len(response))
            if len(prompt) >= cfg.seq_len:
                out.append(_overlong_prompt(len(prompt), cfg.seq_len))
                continue
            if cfg.response_eos_pad:
                kept = self._limit(len(response), cfg.response_eos_pad, "response over data.response_eos_pad")
                if kept is None:
                    out.append([])
                    continue
                response = response[:kept]
            kept = self._limit(len(prompt) + len(response), cfg.seq_len, "over-long")
            if kept is None:
                out.append([])
                continue
            response = response[:kept - len(prompt)]
            scored = np.zeros(len(prompt) + len(response), dtype=bool)
            scored[len(prompt):] = True
            out.append([Encoded(prompt + response, scored)])
        return out

    def _chats(self, conversations: list[list[dict]]) -> list[list[Encoded] | DataProblem]:
        """Render every sequence of every conversation, tokenize them in one call, then check their lengths."""
        if not conversations:
            return []
        per_turn = self.cfg.chat_turns == "per_turn"
        texts, spans, owner = [], [], []
        out: list = [[] for _ in conversations]
        for c, messages in enumerate(conversations):
            ends = [k + 1 for k, m in enumerate(messages) if m["role"] == "assistant"] if per_turn \
                else [len(messages)]
            for end in ends:
                rendered = self.renderer.spans(messages[:end], last_turn_only=per_turn)
                if isinstance(rendered, DataProblem):
                    out[c] = rendered
                    break
                texts.append(rendered[0])
                spans.append(rendered[1])
                owner.append((c, messages[end - 1]["role"] == "assistant"))
        if not self.tokenizer.is_fast:
            raise DataError(f"chat records need a fast tokenizer (with tokenizer.json) to find the assistant "
                            f"tokens; data.tokenizer = {self.cfg.tokenizer!r} is not one")
        for (c, ends_with_answer), (ids, scored) in zip(owner, self.renderer.tokenize(texts, spans)):
            if isinstance(out[c], DataProblem):
                continue
            result = self._fit(list(ids), scored, ends_with_answer)
            if isinstance(result, DataProblem):
                out[c] = result
            elif result is not None:
                out[c].append(result)
        return out

    def _fit(self, ids: list[int], scored: np.ndarray, ends_with_answer: bool) -> Encoded | DataProblem | None:
        """EOS padding of the last assistant turn, then the length checks of one chat sequence."""
        cfg = self.cfg
        if ends_with_answer and cfg.response_eos_pad and self.tail:
            last_turn = len(scored) - int(np.argmin(scored[::-1])) if not scored.all() else 0
            missing = cfg.response_eos_pad - (len(scored) - last_turn)
            if missing > 0:
                ids, scored = ids + self.tail * missing, np.concatenate([scored, np.ones(missing, dtype=bool)])
        first = int(np.argmax(scored)) if scored.any() else len(ids)
        if first >= cfg.seq_len:
            return _overlong_prompt(first, cfg.seq_len)
        kept = self._limit(len(ids), cfg.seq_len, "over-long")
        return None if kept is None else Encoded(ids[:kept], scored[:kept])

    def _limit(self, length: int, limit: int, what: str) -> int | None:
        """How many of ``length`` tokens to keep under ``limit``: all when they fit, else ``limit`` or none (the
        sequence dropped) by ``data.overlong``; a cut or a drop is counted under ``what``."""
        if length <= limit:
            return length
        drop = self.cfg.overlong == "drop"
        self.counts[f"{'dropped' if drop else 'truncated'} ({what})"] += 1
        return None if drop else limit


def _overlong_prompt(tokens: int, seq_len: int) -> DataProblem:
    return DataProblem(f"over-long prompt ({tokens} tokens leave no room for a response in data.seq_len={seq_len})")
