"""Chat records as text: a conversation rendered by the tokenizer's chat template (or the plain template), with
the character spans of its assistant turns, so that tokenization marks exactly their tokens as scored.

**Where an assistant turn is.** Turn k (message index k) spans the characters from the end of
``render(messages[:k], add_generation_prompt=True)`` to the end of ``render(messages[:k + 1])``: its content and
whatever the template closes the turn with (an end-of-turn token, a newline), which the model must learn to
produce; the role header before it is prompt. Both prefixes must be prefixes of the whole rendering, which is
checked for every conversation: a template that renders earlier turns differently once later turns follow (some
drop earlier reasoning) fails naming file and line, and ``data.chat_turns: per_turn`` (which only needs the last
turn's prefix) is the way out. Tokens are then marked by their character offsets (fast tokenizers), so a token
is scored when it starts inside an assistant span, whatever the tokenizer merges at the boundaries.

Why prefixes rather than ``return_assistant_tokens_mask``: that mask needs ``{% generation %}`` markers in the
template, which most published templates (Llama 3, Qwen 2.5, Mistral) do not have; rendering prefixes works with
any template that renders a conversation's beginning as the beginning of the whole, and is checked per record.

**Plain template** (a tokenizer without a chat template, e.g. ``data.tokenizer: char``)::

    [bos]<|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}[eos]<|user|>\\n...

every message is ``<|role|>\\n`` and its content, followed by a newline, except that an assistant turn ends with
the EOS token instead (scored, so the model learns where its answer ends, and decoding stops there); the
generation prompt is ``<|assistant|>\\n``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from mdm_scale.data.records import DataProblem


def plain_header(role: str) -> str:
    return f"<|{role}|>\n"


class ChatRenderer:
    """Renders conversations (lists of ``{role, content}``) with ``tokenizer``'s chat template, or the plain one."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.uses_template = bool(getattr(tokenizer, "chat_template", None))
        self.bos = tokenizer.bos_token or ""
        self.eos = tokenizer.eos_token or tokenizer.sep_token or ""

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.uses_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        text = self.bos + "".join(plain_header(m["role"]) + m["content"] + (self.eos if m["role"] == "assistant"
                                                                            else "\n") for m in messages)
        return text + (plain_header("assistant") if add_generation_prompt else "")

    def spans(self, messages: Sequence[dict], last_turn_only: bool = False
              ) -> tuple[str, list[tuple[int, int]]] | DataProblem:
        """The rendering of ``messages`` and the character span of every assistant turn (or only of the last
        message, an assistant turn, with ``last_turn_only``); a DataProblem when the template fails or does not
        render prefixes as prefixes."""
        try:
            text = self.render(messages)
            turns = [len(messages) - 1] if last_turn_only else \
                [k for k, m in enumerate(messages) if m["role"] == "assistant"]
            spans = []
            for k in turns:
                start = self.render(messages[:k], True)
                end = text if k + 1 == len(messages) else self.render(messages[:k + 1])  # the whole: rendered
                if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
                    return DataProblem(f"chat template not prefix-stable (the conversation up to message {k + 1} "
                                       f"does not render as the beginning of the whole; try data.chat_turns="
                                       f"per_turn)")
                spans.append((len(start), len(end)))
        except Exception as err:  # jinja raises its own errors for conversations a template refuses
            return DataProblem(f"chat template failed ({type(err).__name__}: {str(err)[:120]})")
        return text, spans

    def tokenize(self, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple[list[int], np.ndarray]]:
        """Token ids of every text and, per token, whether it starts inside one of the text's spans."""
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for ids, offsets, text_spans in zip(encoded["input_ids"], encoded["offset_mapping"], spans):
            starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
            scored = np.zeros(len(ids), dtype=bool)
            for lo, hi in text_spans:
                scored |= (starts >= lo) & (starts < hi)
            out.append((ids, scored))
        return out


def split_for_eval(messages: Sequence[dict]) -> tuple[list[dict], str | None]:
    """An evaluation conversation: the messages before its last assistant turn (the prompt) and that turn's
    content (the gold response), or all messages and None when it has no assistant turn."""
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return list(messages), None
    return list(messages[:last]), messages[last]["content"]
