"""Where answers to the synthetic arithmetic task go wrong: an error profile of `mdm-scale eval` predictions.

    python tools/experiments/synth_errors.py results/synth_gpu/runs/standard/seed_42/pred.jsonl ...

For each PRED.jsonl (records ``{"prompt", "prediction", "correct"}``, the task of ``mdm_scale/data/synthetic.py``)
it prints one markdown row:

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
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

from mdm_scale.generation.answers import AnswerPattern

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
START = re.compile(r" has (\d+) ")
ANSWER = AnswerPattern()
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
         "/": lambda a, b: a // b if b else None}


def error_profile(records: list[dict]) -> dict:
    """Shares (0..1) of the quantities in the module docstring over ``records``."""
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


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", nargs="+", type=Path, help="PRED.jsonl files of mdm-scale eval")
    args = parser.parse_args(argv)
    print("| predictions | records | accuracy % | start copied % | steps true % | chained % | answer = last step % "
          "| accuracy % by operations |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.predictions:
        p = error_profile([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        ops = ", ".join(f"{k}: {_pct(v)}" for k, v in p["accuracy_by_ops"].items())
        print(f"| {path} | {p['records']} | {_pct(p['accuracy'])} | {_pct(p['start_copied'])} | "
              f"{_pct(p['steps_true'])} | {_pct(p['chained'])} | {_pct(p['answer_is_last_step'])} | {ops} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
