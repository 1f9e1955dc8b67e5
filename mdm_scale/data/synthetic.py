"""The embedded default task: multi-step arithmetic word problems, generated locally.

Each record is ``{"prompt": question, "response": worked steps + " #### " + answer}``, e.g.

    prompt:   "Mia has 12 shells. Mia finds 7 more, then gives away 5. How many shells does Mia have now?\\n"
    response: "12 + 7 = 19. 19 - 5 = 14. #### 14"

Difficulty grows with the number of operations (``min_ops`` .. ``max_ops``). Generation is a pure function of
the seed, so ``mdm-scale data synth`` makes the same files everywhere and the quickstart needs no download.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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


def write_synthetic_task(out_dir: str | Path, train: int = 20000, eval: int = 500, seed: int = 0,
                         min_ops: int = 1, max_ops: int = 3, pretrain: int = 0) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (SFT records) and optionally ``pretrain.jsonl`` ({"text"}).

    The eval problems are drawn from a separate stream and never repeat a training prompt; the pretraining text
    never contains an eval prompt either (it may repeat training problems, as real pretraining corpora do).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_rng, eval_rng = random.Random(f"{seed}/train"), random.Random(f"{seed}/eval")
    train_records = [make_problem(train_rng, min_ops, max_ops) for _ in range(train)]
    seen = {r["prompt"] for r in train_records}
    eval_records: list[dict[str, str]] = []
    while len(eval_records) < eval:
        record = make_problem(eval_rng, min_ops, max_ops)
        if record["prompt"] not in seen:
            seen.add(record["prompt"])
            eval_records.append(record)
    paths = {"train": out / FILES["train"], "eval": out / FILES["eval"]}
    _write_jsonl(paths["train"], train_records)
    _write_jsonl(paths["eval"], eval_records)
    if pretrain:
        pretrain_rng = random.Random(f"{seed}/pretrain")
        eval_prompts = {r["prompt"] for r in eval_records}
        texts = []
        while len(texts) < pretrain:
            r = make_problem(pretrain_rng, min_ops, max_ops)
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
