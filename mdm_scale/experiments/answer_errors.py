"""Where a model's answers go wrong: error profiles of ``mdm-scale eval`` predictions on the synthetic tasks of
``mdm-scale data synth --family`` (``mdm_scale/data/synthetic.py``).

    mdm-scale experiment errors --family arith results/synth_gpu/runs/standard/mb_64/seed_42/pred.jsonl ...
    mdm-scale experiment errors --family sort results/families/sort/runs/*/mb_*/seed_*/pred.jsonl

For each PRED.jsonl (records ``{"prompt", "prediction", "correct"}``) it prints one markdown row.

The word problems (``arith``):

- **accuracy**: exact match of the answer after ``####``;
- **start copied**: the first worked step starts from the prompt's starting number ("Mia has 12 ..." -> "12 ...");
- **steps true**: of all worked steps ``a op b = c`` in the predictions, the share whose ``c`` is the true
  result of ``a op b`` (integer division for ``/``), whatever ``a`` and ``b`` are;
- **chained**: of the steps after the first, the share whose ``a`` repeats the previous step's result;
- **answer = last step**: the answer (as `mdm-scale eval` extracts it: ``AnswerPattern``, after the last ``####``)
  equals the last worked step's result;
- **accuracy by operations**: exact match for problems of 1, 2, 3, ... operations (counted in the prompt).

Copying (start copied) and bookkeeping (chained, answer = last step) failing points at the format or decoding;
steps true failing points at the model's arithmetic, which more fine-tuning of the same model cannot add.

The other families: exact-match accuracy, accuracy by problem size (list length, the longer list for ``common``,
hops, operand digits), and the family's partial credits:

- ``sort``: **multiset kept** (the answer holds exactly the prompt's digits, in any order) and **ordered** (its
  digits never decrease): copying failing points at reading the prompt, ordering failing at the sorting itself;
- ``count``: **off by one** (the answer is within one of the true count) and **said the list length** (the
  answer is the number of digits, not of the queried one's occurrences);
- ``lookup``: **chain valid** (every ``x=y`` of the worked chain is an assignment of the prompt, from the queried
  variable on) and **answer = chain end** (the answer is the value the written chain reaches);
- ``minmax``: **min right** and **max right** (the answer's first / second digit);
- ``common``, ``missing`` (set answers): **no wrong digit** (every digit of the answer belongs to the true set)
  and **no digit left out** (every digit of the true set is in the answer);
- ``add``: **length right** (as many digits as the true result) and **digits right** (share of the true result's
  digits in place, counted from the right).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from mdm_scale.config.schema import ConfigError
from mdm_scale.data.synthetic import FAMILIES, solve
from mdm_scale.generation.answers import AnswerPattern

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
START = re.compile(r" has (\d+) ")
ANSWER = AnswerPattern()
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
         "/": lambda a, b: a // b if b else None}


def arith_profile(records: list[dict]) -> dict:
    """Shares (0..1) of the arith quantities of the module docstring over ``records``."""
    count: Counter = Counter()
    by_ops: dict[int, list[int]] = {}
    for r in records:
        steps = [(int(a), op, int(b), int(c)) for a, op, b, c in STEP.findall(r["prediction"])]
        start = START.search(r["prompt"])
        answer = ANSWER.extract(r["prediction"])
        count["records"] += 1
        count["correct"] += bool(r.get("correct"))
        count["start_copied"] += bool(steps and start and steps[0][0] == int(start.group(1)))
        count["steps"] += len(steps)
        count["steps_true"] += sum(APPLY[op](a, b) == c for a, op, b, c in steps)
        count["links"] += max(len(steps) - 1, 0)
        count["chained"] += sum(prev[3] == step[0] for prev, step in zip(steps, steps[1:]))
        count["answer_is_last"] += bool(steps and answer == str(steps[-1][3]))
        ops = r["prompt"].count(", then ") + 1
        by_ops.setdefault(ops, [0, 0])
        by_ops[ops][0] += bool(r.get("correct"))
        by_ops[ops][1] += 1

    def share(part: str, whole: str) -> float | None:
        return count[part] / count[whole] if count[whole] else None

    return {"records": count["records"], "accuracy": share("correct", "records"),
            "start_copied": share("start_copied", "records"), "steps_true": share("steps_true", "steps"),
            "chained": share("chained", "links"), "answer_is_last_step": share("answer_is_last", "records"),
            "accuracy_by_ops": {k: v[0] / v[1] for k, v in sorted(by_ops.items())}}


def _size(family: str, prompt: str) -> int:
    text = prompt.rstrip("\n")
    if family in ("sort", "missing", "minmax"):
        return len(text.split(" ")) - 1
    if family == "common":
        return max(len(part.split()) for part in text.removeprefix("common ").split(" ; "))
    if family == "count":
        return len(text.split(" in ")[1].split(" "))
    if family == "lookup":
        return sum(not value.isdigit() for value in (a.split("=")[1] for a in text.split(". ")[0].split(", "))) // 2 + 1
    a, _, b, _ = text.split(" ")
    return max(len(a), len(b))


def _credits(family: str, prompt: str, prediction: str, answer: str | None, gold: str) -> dict[str, bool]:
    text = prompt.rstrip("\n")
    if family == "sort":
        given = "".join(text.split(" ")[1:])
        got = answer or ""
        return {"multiset kept": sorted(got) == sorted(given),
                "ordered": bool(got) and got.isdigit() and list(got) == sorted(got)}
    if family == "minmax":
        got = answer or ""
        return {"min right": got[:1] == gold[:1], "max right": got[1:2] == gold[1:2]}
    if family in ("common", "missing"):
        got = set(answer or "")
        return {"no wrong digit": got <= set(gold), "no digit left out": set(gold) <= got}
    if family == "count":
        number = int(answer) if answer is not None and answer.isdigit() else None
        return {"off by one": number is not None and abs(number - int(gold)) <= 1,
                "said the list length": number == _size(family, prompt)}
    if family == "lookup":
        bindings, query = text.split(". ")
        value = dict(item.split("=") for item in bindings.split(", "))
        chain = prediction.split(" ####")[0].strip().split("=")
        valid = len(chain) >= 2 and chain[0] == query.rstrip("?") and all(
            value.get(a) == b for a, b in zip(chain, chain[1:]))
        return {"chain valid": valid, "answer = chain end": answer is not None and answer == chain[-1]}
    got = answer or ""
    return {"length right": len(got) == len(gold),
            "digits right": sum(x == y for x, y in zip(reversed(got), reversed(gold))) / len(gold)}


def family_profile(family: str, records: list[dict]) -> dict:
    """Accuracy, accuracy by size and the family's partial credits (shares 0..1) over ``records``."""
    count: Counter = Counter()
    by_size: dict[int, list[int]] = {}
    for r in records:
        answer = ANSWER.extract(r["prediction"])
        gold = solve(family, r["prompt"])
        count["records"] += 1
        count["correct"] += bool(r.get("correct"))
        for name, value in _credits(family, r["prompt"], r["prediction"], answer, gold).items():
            count[name] += value
        hits = by_size.setdefault(_size(family, r["prompt"]), [0, 0])
        hits[0] += bool(r.get("correct"))
        hits[1] += 1
    n = max(count.pop("records"), 1)
    return {"records": n, **{k: v / n for k, v in count.items()},
            "accuracy_by_size": {k: v[0] / v[1] for k, v in sorted(by_size.items())}}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def error_table(family: str, paths: list[Path]) -> str:
    """The markdown table of the profiles of ``paths`` (one row per predictions file)."""
    if family not in FAMILIES:
        raise ConfigError(f"--family {family!r}: unknown (known: {', '.join(FAMILIES)})")
    if family == "arith":
        lines = ["| predictions | records | accuracy % | start copied % | steps true % | chained % | "
                 "answer = last step % | accuracy % by operations |", "|---|---|---|---|---|---|---|---|"]
        for path in paths:
            p = arith_profile(read_predictions(path))
            ops = ", ".join(f"{k}: {_pct(v)}" for k, v in p["accuracy_by_ops"].items())
            lines.append(f"| {path} | {p['records']} | {_pct(p['accuracy'])} | {_pct(p['start_copied'])} | "
                         f"{_pct(p['steps_true'])} | {_pct(p['chained'])} | {_pct(p['answer_is_last_step'])} | "
                         f"{ops} |")
        return "\n".join(lines)
    rows = [(path, family_profile(family, read_predictions(path))) for path in paths]
    credits = [k for k in rows[0][1] if k not in ("records", "correct", "accuracy_by_size")]
    lines = ["| predictions | records | accuracy % | " + " | ".join(f"{c} %" for c in credits) +
             " | accuracy % by size |", "|---|---|---|" + "---|" * len(credits) + "---|"]
    for path, p in rows:
        sizes = ", ".join(f"{k}: {100 * v:.0f}" for k, v in p["accuracy_by_size"].items())
        cells = " | ".join(f"{100 * p[c]:.1f}" for c in credits)
        lines.append(f"| {path} | {p['records']} | {100 * p.get('correct', 0):.1f} | {cells} | {sizes} |")
    return "\n".join(lines)
