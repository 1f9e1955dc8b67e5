"""Decoding accuracy: trained checkpoints evaluated with the fixed-schedule sampler and with the fast options.

    bash tools/bench/run_gpu.sh python3 -m tools.bench.decode_accuracy \\
        --study results/families/sort --study results/families/missing --out results/decode_accuracy

A study is a directory that ``tools/experiments/family_gpu.sh`` writes (``OUT/<study>``): its eval set is
``STUDY/data/eval.jsonl`` (``--data`` overrides it) and its checkpoints are the training directories that
``--runs`` (a glob relative to the study; default: Standard's runs, every micro-batch and seed) matches. Each
checkpoint is loaded once and evaluated exactly as ``mdm-scale eval`` does (same prompts, same scoring, the
default bf16 on GPU), at every block length of ``--block-lengths`` (default: the whole answer window, as the
studies evaluate, and a third of it, which gives the caches blocks to reuse), with

- ``current``: the fixed schedule, one token per forward (``--steps`` = gen length), the studies' decoding;
- ``threshold``, ``threshold+prefix``, ``threshold+dual``: ``--threshold`` alone and with each cache.

Per checkpoint, block length and option it writes a JSON line to ``OUT/decode_accuracy.jsonl``: accuracy,
forwards per prompt (``Decoding.row_forwards``: the forwards a prompt took part in while its block had a mask)
and tokens per forward (gen length / forwards per prompt: the parallelism to give ``decode_speed.py
--tokens-per-step``). ``OUT/decode_accuracy.md`` summarises each study, block length and option over the
checkpoints: mean accuracy, the difference from ``current`` on the same checkpoint (mean, its standard error
over checkpoints, the smallest and largest), and mean tokens per forward. Rewritten after every checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from mdm_scale.distributed.env import launched_or_single
from mdm_scale.generation.answers import AnswerPattern
from mdm_scale.generation.evaluate import (
    generate_predictions,
    read_prompt_records,
    resolve_dtype,
    score_predictions,
)
from mdm_scale.generation.model_source import load_generation_model
from mdm_scale.generation.sampler import SamplingConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", action="append", required=True, help="a study directory (repeatable)")
    p.add_argument("--runs", default="runs/standard/mb_*/seed_*/train", help="glob of checkpoints in a study")
    p.add_argument("--data", default=None, help="eval JSONL for every study (default: STUDY/data/eval.jsonl)")
    p.add_argument("--gen-length", type=int, default=18, help="answer window (the family studies use 18)")
    p.add_argument("--block-lengths", default=None, help="comma-separated (default: gen length and a third of it)")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--answer-regex", default=None, help="as mdm-scale eval's (default: text after the last ####)")
    p.add_argument("--out", required=True, help="directory for decode_accuracy.jsonl and decode_accuracy.md")
    return p.parse_args(argv)


def options(gen_length: int, block_length: int, threshold: float) -> dict[str, SamplingConfig]:
    current = SamplingConfig(gen_length=gen_length, steps=gen_length, block_length=block_length)
    fast = replace(current, threshold=threshold)
    return {"current": current, "threshold": fast, "threshold+prefix": replace(fast, cache="prefix"),
            "threshold+dual": replace(fast, cache="dual")}


def summarise(rows: list[dict]) -> list[dict]:
    """Per (study, block length, option): accuracy and its paired difference from ``current`` over checkpoints."""
    current = {(r["study"], r["checkpoint"], r["block_length"]): r["accuracy"] for r in rows
               if r["option"] == "current"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["study"], r["block_length"], r["option"]), []).append(r)
    summary = []
    for (study, block, option), group in groups.items():
        diffs = [100 * (r["accuracy"] - current[(study, r["checkpoint"], block)]) for r in group]
        summary.append({"study": study, "block_length": block, "option": option, "checkpoints": len(group),
                        "accuracy": statistics.mean(r["accuracy"] for r in group),
                        "diff_points": statistics.mean(diffs),
                        "diff_se": statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None,
                        "diff_min": min(diffs), "diff_max": max(diffs),
                        "tokens_per_forward": statistics.mean(r["tokens_per_forward"] for r in group)})
    return summary


def write_table(summary: list[dict], path: Path) -> None:
    lines = ["| study | block | option | checkpoints | accuracy % | vs current (points) | se | min / max | "
             "tokens/forward |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        se = "-" if s["diff_se"] is None else f"{s['diff_se']:.2f}"
        lines.append(f"| {s['study']} | {s['block_length']} | {s['option']} | {s['checkpoints']} | "
                     f"{100 * s['accuracy']:.1f} | {s['diff_points']:+.2f} | {se} | {s['diff_min']:+.1f} / "
                     f"{s['diff_max']:+.1f} | {s['tokens_per_forward']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    gen = args.gen_length
    blocks = [int(b) for b in args.block_lengths.split(",")] if args.block_lengths else [gen, gen // 3]
    answers = AnswerPattern(args.answer_regex)
    plans = []
    for study in map(Path, args.study):  # every input is checked before any model is loaded
        records = read_prompt_records(args.data or study / "data" / "eval.jsonl", answers)
        checkpoints = sorted(study.glob(args.runs))
        if not checkpoints:
            raise SystemExit(f"--study {study}: no checkpoint matches --runs {args.runs}")
        for block in blocks:
            for cfg in options(gen, block, args.threshold).values():
                cfg.check()
        plans.append((study, records, checkpoints))
    env = launched_or_single()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_accuracy.jsonl").write_text("")
    rows: list[dict] = []
    for study, records, checkpoints in plans:
        for checkpoint in checkpoints:
            gm = load_generation_model(checkpoint, env.device, resolve_dtype("auto", env.on_gpu))
            for block in blocks:
                for name, cfg in options(gen, block, args.threshold).items():
                    predictions, forwards = generate_predictions(gm, [r.prompt for r in records], cfg,
                                                                 args.batch_size, env)
                    score, _ = score_predictions(records, predictions, answers)
                    per_prompt = sum(forwards) / len(forwards)
                    row = {"study": study.name, "checkpoint": str(checkpoint), "block_length": block, "option": name,
                           "accuracy": score.accuracy, "correct": score.correct, "total": score.total,
                           "forwards_per_prompt": per_prompt, "tokens_per_forward": gen / per_prompt,
                           "threshold": cfg.threshold, "cache": cfg.cache, "gen_length": gen}
                    rows.append(row)
                    with open(out / "decode_accuracy.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps({k: row[k] for k in ("study", "checkpoint", "block_length", "option", "accuracy",
                                                          "tokens_per_forward")}), flush=True)
            write_table(summarise(rows), out / "decode_accuracy.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
