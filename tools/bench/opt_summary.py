"""Summary of an ``opt_suite.sh`` job: per ZeRO stage and optimizer path, throughput, MFU, the ratio to the plain
reference and the optimizer step's time; the losses of the two paths at one stage side by side (the same data and
noise, so they agree up to rounding when the updates are the same); and issue 28's targets.

    python -m tools.bench.opt_summary OUT_DIR        # reads OUT_DIR/results.jsonl and OUT_DIR/check.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tools.bench.opt_profile import describe
from tools.bench.throughput import parse_subject

TARGET_OPT_MS, TARGET_MFU, TARGET_ZERO3 = 20.0, 0.63, 1.25


def settings(subject: str) -> dict[str, str]:
    """``uniform[train.zero_stage=0;train.optimizer=fused]`` -> {"train.zero_stage": "0", ...}."""
    return dict(item.split("=", 1) for item in parse_subject(subject)[1])


def summarize(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    done = [r for r in rows if "tokens_per_s_per_gpu" in r]
    lines = [f"Device: {rows[0]['device'] if rows else '?'}, measured bf16 peak "
             f"{(rows[0].get('measured_peak_tflops') or 0) if rows else 0:.0f} TFLOP/s", "",
             "| subject | ZeRO | optimizer | tokens/s/GPU | vs plain | MFU (measured) | untimed step ms | "
             "optimizer ms (synchronised) | engine.step() ms (profiled) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s = settings(r["subject"])
        if "tokens_per_s_per_gpu" not in r:
            lines.append(f"| {r['subject']} | | | {r.get('failed') or r.get('unavailable')} | | | | | |")
            continue
        mfu = r.get("mfu_measured_peak")
        cells = [r["subject"], s.get("train.zero_stage", "3"), s.get("train.optimizer", "deepspeed"),
                 f"{r['tokens_per_s_per_gpu']:.0f}", f"{r.get('vs_plain', float('nan')):.3f}",
                 f"{100 * mfu:.1f}%" if mfu is not None else "-", f"{1e3 * r['step_seconds']:.0f}",
                 f"{r['breakdown_ms'].get('optimizer', float('nan')):.1f}",
                 f"{r.get('optimizer_profile', {}).get('step_ms', float('nan')):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Losses of the untimed steps, both paths at one stage (largest relative difference):"]
    by_stage: dict[str, dict[str, list[float]]] = {}
    for r in done:
        s = settings(r["subject"])
        if r.get("losses") and r["subject"].startswith("uniform"):
            by_stage.setdefault(s.get("train.zero_stage", "3"), {})[s.get("train.optimizer", "deepspeed")] = r["losses"]
    for stage, paths in sorted(by_stage.items()):
        if len(paths) == 2:
            a, b = paths["deepspeed"], paths["fused"]
            worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
            lines.append(f"- ZeRO-{stage}: {worst:.2e} over {min(len(a), len(b))} steps (deepspeed {a[-1]:.4f}, "
                         f"fused {b[-1]:.4f} at the last)")
    fused = [r for r in done if settings(r["subject"]).get("train.optimizer") == "fused" and "optimizer_profile" in r]
    lines += ["", "Targets (issue 28):"]
    for r in fused:
        ms = r["optimizer_profile"]["step_ms"]
        lines.append(f"- {r['subject']}: engine.step() {ms:.1f} ms, target <= {TARGET_OPT_MS:.0f}: "
                     f"{'met' if ms <= TARGET_OPT_MS else 'NOT met'}")
    if done and done[0].get("mfu_measured_peak") is not None:
        best = max(done, key=lambda r: r["tokens_per_s_per_gpu"])
        lines.append(f"- fastest: {best['subject']} at {100 * best['mfu_measured_peak']:.1f}% MFU, target "
                     f">= {100 * TARGET_MFU:.0f}%: {'met' if best['mfu_measured_peak'] >= TARGET_MFU else 'NOT met'}")
    zero3 = [r for r in fused if settings(r["subject"]).get("train.zero_stage", "3") == "3" and "vs_plain" in r]
    for r in zero3:
        lines.append(f"- ZeRO-3 fused: {r['vs_plain']:.3f}x the plain reference, target >= {TARGET_ZERO3}: "
                     f"{'met' if r['vs_plain'] >= TARGET_ZERO3 else 'NOT met'}")
    lines += ["", "Where the time of engine.step() goes (tools/bench/opt_profile.py):"]
    for r in done:
        if "optimizer_profile" in r:
            lines += ["", *describe(r["subject"], r["optimizer_profile"])]
    check = out / "check.json"
    if check.is_file():
        c = json.loads(check.read_text())
        lines += ["", f"Fused update kernel ({c['parameters'] / 1e9:.2f}B values), compiled minus eager, largest: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in c["compiled_minus_eager_max_abs"].items())]
        for name, v in c.get("speed", {}).items():
            lines.append(f"- {name}: {v['ms']:.2f} ms, {v['TB_per_s']:.2f} TB/s ({v['bytes_per_parameter']} B/param)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = summarize(Path(sys.argv[1]))
    (Path(sys.argv[1]) / "summary.md").write_text(text)
    print(text)
