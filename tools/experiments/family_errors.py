"""Where answers to the task families of ``mdm-scale data synth --family`` go wrong: error profiles of
`mdm-scale eval` predictions (the arith family has its own, ``synth_errors.py``).

    python tools/experiments/family_errors.py --family sort results/families/sort/runs/*/mb_*/seed_*/pred.jsonl

For each PRED.jsonl (records ``{"prompt", "prediction", "correct"}``) it prints one markdown row: exact-match
accuracy, accuracy by problem size (list length, the longer list for ``common``, hops, operand digits), and the family's
partial credits:

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

import argparse
import json
from collections import Counter
from pathlib import Path

from mdm_scale.data.synthetic import solve
from mdm_scale.generation.answers import AnswerPattern

ANSWER = AnswerPattern()


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


def error_profile(family: str, records: list[dict]) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True,
                        choices=["sort", "count", "common", "missing", "minmax", "lookup", "add"])
    parser.add_argument("predictions", nargs="+", type=Path, help="PRED.jsonl files of mdm-scale eval")
    args = parser.parse_args(argv)
    rows = []
    for path in args.predictions:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows.append((path, error_profile(args.family, records)))
    credits = [k for k in rows[0][1] if k not in ("records", "correct", "accuracy_by_size")]
    print("| predictions | records | accuracy % | " + " | ".join(f"{c} %" for c in credits) + " | accuracy % by size |")
    print("|---|---|---|" + "---|" * len(credits) + "---|")
    for path, p in rows:
        sizes = ", ".join(f"{k}: {100 * v:.0f}" for k, v in p["accuracy_by_size"].items())
        cells = " | ".join(f"{100 * p[c]:.1f}" for c in credits)
        print(f"| {path} | {p['records']} | {100 * p.get('correct', 0):.1f} | {cells} | {sizes} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
