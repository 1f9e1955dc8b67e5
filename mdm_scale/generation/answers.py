"""Answer extraction and exact-match scoring (docs/spec.md section 6: GSM8K's "the answer after ####").

``extract_answer`` takes the text after the last ``####`` (or, with a regex, its last match: group 1 when the
pattern has a group, else the whole match) and normalises it: surrounding whitespace, a trailing full stop,
thousands separators and a leading ``$`` are removed. A prediction with nothing to extract (no ``####``, no
match, an empty answer, or not a string at all) has no answer and is scored wrong, never an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class AnswerPattern:
    """Where the answer sits in a text: after the last ``####`` (``pattern=None``) or a regex's last match."""

    def __init__(self, pattern: str | None = None):
        self.pattern = pattern
        try:
            self.regex = re.compile(pattern) if pattern is not None else None
        except re.error as err:
            raise ValueError(f"--answer-regex {pattern!r}: not a valid regular expression ({err})") from None

    @property
    def description(self) -> str:
        return "after '####'" if self.regex is None else f"matching {self.pattern!r}"

    def extract(self, text) -> str | None:
        if not isinstance(text, str):
            return None
        if self.regex is None:
            if "####" not in text:
                return None
            raw = text.rsplit("####", 1)[1]
        else:
            matches = list(self.regex.finditer(text))
            if not matches:
                return None
            last = matches[-1]
            raw = last.group(1) if self.regex.groups else last.group(0)
            if raw is None:
                return None
        answer = normalize(raw)
        return answer or None


def normalize(answer: str) -> str:
    answer = answer.strip().removesuffix(".").strip().removeprefix("$")
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer)


@dataclass
class Score:
    correct: int = 0
    total: int = 0
    no_answer: int = 0
    """Predictions with nothing to extract (malformed)."""

    def add(self, predicted: str | None, gold: str | None) -> bool:
        self.total += 1
        if predicted is None:
            self.no_answer += 1
            return False
        hit = gold is not None and predicted == gold
        self.correct += hit
        return hit

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0
