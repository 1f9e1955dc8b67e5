"""Synthetic reasoning tasks, generated locally: the embedded default task and seven more families.

Each record is ``{"prompt": question, "response": [worked steps] + "#### " + answer}``; the answer is what
``mdm-scale eval`` scores (the text after the last ``####``). A family's problems have a *size*
(``min_size`` .. ``max_size``, drawn uniformly per problem), so one eval set mixes easy and hard problems
and the accuracy of a model degrades gradually with its capacity instead of jumping from floor to ceiling:

- ``arith`` (the default): word problems of ``size`` operations (add, subtract, double/triple, equal shares)::

      prompt:   "Mia has 12 shells. Mia finds 7 more, then gives away 5. How many shells does Mia have now?\\n"
      response: "12 + 7 = 19. 19 - 5 = 14. #### 14"

- ``add``: addition or subtraction (never negative) of two integers of 1..``size`` digits each, with carries
  and borrows: ``"4172 - 856 =\\n"`` -> ``"#### 3316"``;
- ``sort``: sort ``size`` digits: ``"sort 7 3 0 9 3\\n"`` -> ``"#### 03379"``;
- ``count``: how often one digit occurs among ``size`` digits: ``"count 3 in 3 1 3 9\\n"`` -> ``"#### 2"``;
- ``common``: the digits two lists of ``size`` digits share: ``"common 1 5 7 ; 5 3 7 9\\n"`` -> ``"#### 57"``;
- ``missing``: the digits a list of ``size`` digits lacks: ``"missing 7 3 0 9 3 1 2 4 5\\n"`` -> ``"#### 68"``;
- ``minmax``: the smallest and the largest of ``size`` digits: ``"minmax 7 3 0 9 3\\n"`` -> ``"#### 09"``;
- ``lookup``: variable binding, follow a chain of ``size`` assignments among as many distractors::

      prompt:   "k=42, q=17, c=m, z=q, m=k, y=z. c?\\n"
      response: "c=m=k=42 #### 42"

Generation is a pure function of the seed, so ``mdm-scale data synth`` makes the same files everywhere and the
quickstart needs no download.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

from mdm_scale.data.records import DataError

FILES = {"train": "train.jsonl", "eval": "eval.jsonl", "pretrain": "pretrain.jsonl"}
"""What ``write_synthetic_task`` writes into its directory (``data/synth`` by default)."""

NAMES = ["Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ivan", "Sara", "Kai", "Nora", "Theo"]
THINGS = ["apples", "shells", "coins", "books", "stamps", "marbles", "cards", "pens", "seeds", "stones"]


def _operation(rng: random.Random, value: int) -> tuple[str, str, int]:
    """One step: (clause, worked equation, new value); the value stays a non-negative integer below 1000."""
    kind = rng.choice(["add", "add", "sub", "sub", "mul", "div"])
    if kind == "mul" and value <= 99:
        k = rng.choice([2, 3])
        return (["doubles", "triples"][k - 2] + " them", f"{value} * {k} = {value * k}", value * k)
    if kind == "div" and value >= 4:
        divisors = [k for k in (2, 3, 4) if value % k == 0]
        if divisors:
            k = rng.choice(divisors)
            return (f"keeps one of {k} equal shares", f"{value} / {k} = {value // k}", value // k)
    if kind == "sub" and value >= 2:
        n = rng.randint(1, min(value - 1, 30))
        return (rng.choice([f"gives away {n}", f"loses {n}"]), f"{value} - {n} = {value - n}", value - n)
    n = rng.randint(1, 30)
    return (rng.choice([f"finds {n} more", f"buys {n} more", f"gets {n} more"]), f"{value} + {n} = {value + n}",
            value + n)


def make_problem(rng: random.Random, min_ops: int = 1, max_ops: int = 3) -> dict[str, str]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    start = value = rng.randint(2, 30)
    clauses, steps = [], []
    for _ in range(rng.randint(min_ops, max_ops)):
        clause, step, value = _operation(rng, value)
        clauses.append(clause)
        steps.append(step)
    story = ", then ".join(clauses)
    prompt = f"{name} has {start} {thing}. {name} {story}. How many {thing} does {name} have now?\n"
    response = ". ".join(steps) + f". #### {value}"
    return {"prompt": prompt, "response": response}


def _number(rng: random.Random, digits: int) -> int:
    """A uniform integer of exactly ``digits`` digits (0..9 for one digit)."""
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_addition(rng: random.Random, min_digits: int, max_digits: int) -> dict[str, str]:
    """``a + b`` or ``a - b`` with a >= b, each operand of min..max digits."""
    a, b = (_number(rng, rng.randint(min_digits, max_digits)) for _ in range(2))
    if rng.random() < 0.5:
        return {"prompt": f"{a} + {b} =\n", "response": f"#### {a + b}"}
    a, b = max(a, b), min(a, b)
    return {"prompt": f"{a} - {b} =\n", "response": f"#### {a - b}"}


def make_sort(rng: random.Random, min_len: int, max_len: int) -> dict[str, str]:
    """Sort min..max digits (repeats allowed); the answer is the sorted digits written as one string."""
    digits = [rng.randint(0, 9) for _ in range(rng.randint(min_len, max_len))]
    return {"prompt": "sort " + " ".join(map(str, digits)) + "\n",
            "response": "#### " + "".join(map(str, sorted(digits)))}


def make_count(rng: random.Random, min_len: int, max_len: int) -> dict[str, str]:
    """Count how often a digit occurs among min..max digits: ``"count 3 in 3 1 3 9\\n"`` -> ``"#### 2"``.

    The count is drawn uniformly from 0..min(length, 4) and the other digits differ from the queried one, so no
    single answer is right for more than a fifth of the problems of a length > 3 (a constant answer scores low).
    """
    length = rng.randint(min_len, max_len)
    query, count = rng.randint(0, 9), rng.randint(0, min(length, 4))
    others = [d for d in range(10) if d != query]
    digits = [query] * count + [rng.choice(others) for _ in range(length - count)]
    rng.shuffle(digits)
    return {"prompt": f"count {query} in " + " ".join(map(str, digits)) + "\n", "response": f"#### {count}"}


def make_common(rng: random.Random, min_len: int, max_len: int) -> dict[str, str]:
    """The digits two lists share, sorted and each once: ``"common 1 5 7 5 ; 5 3 7 9\\n"`` -> ``"#### 57"``.

    Each list has min..max digits; lists that share none are redrawn, so every answer is a non-empty set.
    """
    while True:
        left, right = ([rng.randint(0, 9) for _ in range(rng.randint(min_len, max_len))] for _ in range(2))
        shared = sorted(set(left) & set(right))
        if shared:
            return {"prompt": f"common {' '.join(map(str, left))} ; {' '.join(map(str, right))}\n",
                    "response": "#### " + "".join(map(str, shared))}


def make_missing(rng: random.Random, min_len: int, max_len: int) -> dict[str, str]:
    """The digits 0-9 that a list of min..max digits lacks, in order: ``"missing 7 3 0 9 3 1 2 4 5\\n"`` ->
    ``"#### 68"``. At most 9 digits, so some digit is always missing."""
    digits = [rng.randint(0, 9) for _ in range(rng.randint(min_len, max_len))]
    return {"prompt": "missing " + " ".join(map(str, digits)) + "\n",
            "response": "#### " + "".join(str(d) for d in range(10) if d not in digits)}


def make_minmax(rng: random.Random, min_len: int, max_len: int) -> dict[str, str]:
    """The smallest and the largest of min..max digits, as two digits: ``"minmax 7 3 0 9 3\\n"`` -> ``"#### 09"``
    (the first and last digit of ``sort``'s answer)."""
    digits = [rng.randint(0, 9) for _ in range(rng.randint(min_len, max_len))]
    return {"prompt": "minmax " + " ".join(map(str, digits)) + "\n", "response": f"#### {min(digits)}{max(digits)}"}


def make_lookup(rng: random.Random, min_hops: int, max_hops: int) -> dict[str, str]:
    """Follow ``hops`` assignments from the queried variable to a number, among a distractor chain as long.

    Variables are distinct letters, so a chain has one reading; the assignments are shuffled.
    """
    hops = rng.randint(min_hops, max_hops)
    names = rng.sample(string.ascii_lowercase, 2 * hops)
    chain, distractor = names[:hops], names[hops:]
    value, other = rng.sample(range(10, 100), 2)
    assignments = []
    for variables, number in ((chain, value), (distractor, other)):
        assignments += [f"{a}={b}" for a, b in zip(variables, variables[1:])] + [f"{variables[-1]}={number}"]
    rng.shuffle(assignments)
    return {"prompt": ", ".join(assignments) + f". {chain[0]}?\n",
            "response": "=".join(chain) + f"={value} #### {value}"}


def solve(family: str, prompt: str) -> str:
    """The answer of an ``add``, ``sort``, ``count``, ``common``, ``missing``, ``minmax`` or ``lookup`` prompt,
    from the prompt's text alone."""
    text = prompt.rstrip("\n")
    if family == "add":
        a, op, b, _ = text.split(" ")
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    if family == "sort":
        return "".join(sorted(text.split(" ")[1:]))
    if family == "count":
        query, digits = text.split(" in ")
        return str(digits.split(" ").count(query.split(" ")[1]))
    if family == "common":
        left, right = (set(part.split()) for part in text.removeprefix("common ").split(" ; "))
        return "".join(sorted(left & right))
    if family == "missing":
        return "".join(d for d in "0123456789" if d not in text.split(" ")[1:])
    if family == "minmax":
        digits = text.split(" ")[1:]
        return min(digits) + max(digits)
    if family == "lookup":
        bindings, query = text.split(". ")
        value = dict(item.split("=") for item in bindings.split(", "))
        name = query.rstrip("?")
        while not value[name].isdigit():
            name = value[name]
        return value[name]
    raise ValueError(f"solve: family {family!r} has no solver (add, sort, count, common, missing, minmax, "
                     f"lookup)")


FAMILIES: dict[str, tuple[Callable[[random.Random, int, int], dict[str, str]], int]] = {
    "arith": (make_problem, 20), "add": (make_addition, 18), "sort": (make_sort, 40), "count": (make_count, 40),
    "common": (make_common, 20), "missing": (make_missing, 9), "minmax": (make_minmax, 40),
    "lookup": (make_lookup, 13),
}
"""name -> (problem maker(rng, min_size, max_size), largest size it accepts)."""


def write_synthetic_task(out_dir: str | Path, train: int = 20000, eval: int = 500, seed: int = 0,
                         min_ops: int = 1, max_ops: int = 3, pretrain: int = 0, family: str = "arith"
                         ) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (SFT records) and optionally ``pretrain.jsonl`` ({"text"}).

    ``min_ops`` .. ``max_ops`` is the size range of the family's problems (operations, digits, list length or
    hops: module docstring). The eval problems are drawn from a separate stream and never repeat a training
    prompt; the pretraining text never contains an eval prompt either (it may repeat training problems, as real
    pretraining corpora do). A size range too small to hold ``eval`` new prompts is an error, not a hang.
    """
    if family not in FAMILIES:
        raise DataError(f"--family {family!r}: unknown (known: {', '.join(FAMILIES)})")
    make, largest = FAMILIES[family]
    if not 1 <= min_ops <= max_ops <= largest:
        raise DataError(f"--min-ops {min_ops} --max-ops {max_ops}: family {family} needs 1 <= min <= max <= "
                         f"{largest}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rng, eval_rng = random.Random(f"{seed}/train"), random.Random(f"{seed}/eval")
    train_records = [make(train_rng, min_ops, max_ops) for _ in range(train)]
    seen = {r["prompt"] for r in train_records}
    eval_records: list[dict[str, str]] = []
    for _ in range(100 * eval + 10000):
        if len(eval_records) == eval:
            break
        record = make(eval_rng, min_ops, max_ops)
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            eval_records.append(record)
    if len(eval_records) < eval:
        raise DataError(f"family {family} with sizes {min_ops}..{max_ops}: could not draw {eval} eval problems "
                         f"unseen in the {train} training problems (the problem space is too small)")
    paths = {"train": out / FILES["train"], "eval": out / FILES["eval"]}
    _write_jsonl(paths["train"], train_records)
    _write_jsonl(paths["eval"], eval_records)
    if pretrain:
        pretrain_rng = random.Random(f"{seed}/pretrain")
        eval_prompts = {r["prompt"] for r in eval_records}
        texts = []
        while len(texts) < pretrain:
            r = make(pretrain_rng, min_ops, max_ops)
            if r["prompt"] not in eval_prompts:
                texts.append({"text": f"{r['prompt']} {r['response']}"})
        paths["pretrain"] = out / FILES["pretrain"]
        _write_jsonl(paths["pretrain"], texts)
    return paths


def how_to_make(path: Path) -> str:
    """For a missing file of the synthetic task's layout (``<dir>/synth/train.jsonl``, ``eval.jsonl`` or
    ``pretrain.jsonl``, as the configs in ``configs/`` name them) the command that writes it; else ``""``."""
    if path.parent.name != "synth" or path.name not in FILES.values():
        return ""
    pretrain = " --pretrain 20000" if path.name == FILES["pretrain"] else ""
    return f"; it is the embedded synthetic task: make it with `mdm-scale data synth --out {path.parent}{pretrain}`"


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    tmp.replace(path)
