"""Decoding speed: tokens/s of the masked-diffusion sampler with and without the fast-decoding options.

    bash tools/bench/run_gpu.sh python3 -m tools.bench.decode_speed --out results/decode_speed
    python -m tools.bench.decode_speed --preset tiny --batches 1,2 --gen-lengths 32,64 --prompt 8 --block 16 \\
        --seconds 2 --out /tmp/decode_speed          # CPU smoke test

A random model of ``--preset`` (bf16 on GPU, fp32 on CPU, eager kernels as ``mdm-scale generate`` runs it)
decodes a batch of random prompts of ``--prompt`` tokens, for each batch size and answer length, with each
subject (all with blocks of ``--block``):

- ``current``: the fixed schedule, one token per forward (steps = gen length): the sampler before fast decoding;
- ``threshold``, ``threshold+prefix``, ``threshold+dual``: ``--threshold`` (0.9) without a cache, with the prefix
  cache, with the dual cache;
- ``k/step``, ``k/step+prefix``, ``k/step+dual``: the fixed schedule with k = ``--tokens-per-step`` tokens per
  forward (steps = gen length / k), without and with each cache;
- on a GPU, ``current+graph``, ``threshold+graph``, ``k/step+graph``: the uncached subjects with ``cuda_graph``
  (each batch's forward recorded once in a CUDA graph and replayed; the recording is inside the timed decoding).

A random model is unsure of everything (its confidences are about 1/V), so the threshold subjects unmask one
token per forward here: they measure what the caches save per forward, at the worst case of parallelism. A trained
model is sure of several tokens per step; how many is measured on trained checkpoints by ``decode_accuracy.py``
(``tokens_per_forward``), and a forward costs the same whichever rule picks the tokens it keeps, so the ``k/step``
subjects at that k give its speed (rerun with ``--tokens-per-step`` set to it).

Each subject decodes block by block until its blocks are done or ``--seconds`` have passed (at least one block);
tokens/s counts the answer tokens of the blocks decoded. ``blocks`` says how many of how many were decoded: for
the uncached and dual-cache subjects every block costs the same, so a partial run gives the full run's rate; with
the prefix cache the first blocks, which forward the longest slices, are the slowest, so a partial rate is a lower
bound. Each (batch, length) first decodes once untimed (kernel selection, allocator). ``peak_gib`` is the most GPU
memory the subject's decoding held at once (weights included). A subject that runs out of GPU memory is recorded as
failed (``failed``: the error's first line) and the others still run; the exit status is then 1. Results: one JSON
line per subject in ``OUT/decode_speed.jsonl``, and ``OUT/decode_speed.md``, rewritten after every subject.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mdm_scale.config.presets import PRESETS
from mdm_scale.generation.sampler import Decoding, SamplingConfig
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion
from tools.bench.common import sync_device
from tools.bench.decode_accuracy import options

MASK_ID = 3
"""[MASK] of the random model: one of the 4 special ids, which the random prompts never hold."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--batches", default="1,32", help="batch sizes (comma-separated)")
    p.add_argument("--gen-lengths", default="256,1024", help="answer lengths (comma-separated)")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--block", type=int, default=32, help="block length")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--tokens-per-step", type=int, default=4, help="k of the k/step subjects")
    p.add_argument("--seconds", type=float, default=5.0, help="time bound of each subject (at least one block)")
    p.add_argument("--subjects", default=None, help="a comma-separated subset of the subjects (default: all)")
    p.add_argument("--out", required=True, help="directory for decode_speed.jsonl and decode_speed.md")
    return p.parse_args(argv)


def subjects(gen_length: int, block: int, threshold: float, k: int, graphs: bool) -> dict[str, SamplingConfig]:
    """``decode_accuracy.options`` (the fixed schedule, the threshold alone and with each cache), then the fixed
    schedule at k tokens per forward, alone and with each cache; with ``graphs``, each uncached one of them
    again with ``cuda_graph``."""
    measured = options(gen_length, block, threshold)
    fixed = replace(measured["current"], steps=gen_length // k)
    chosen = {**measured, f"{k}/step": fixed, f"{k}/step+prefix": replace(fixed, cache="prefix"),
              f"{k}/step+dual": replace(fixed, cache="dual")}
    if graphs:
        chosen |= {f"{name}+graph": replace(cfg, cuda_graph=True) for name, cfg in list(chosen.items())
                   if cfg.cache == "none"}
    return chosen


def random_model(preset: str, device: torch.device, dtype: torch.dtype) -> MDMForMaskedDiffusion:
    torch.manual_seed(0)
    with device:
        model = MDMForMaskedDiffusion(MDMConfig(**PRESETS[preset], mask_token_id=MASK_ID))
    return model.to(dtype).eval()


def timed_decoding(model, prompts: list[list[int]], cfg: SamplingConfig, device: torch.device, seconds: float
                   ) -> dict:
    """Decode block by block until done or ``seconds`` have passed; the rate of what was decoded."""
    decoding = Decoding(model, prompts, list(range(len(prompts))), MASK_ID, 0, cfg, device)
    forwards, blocks = 0, 0
    sync_device()
    start = time.perf_counter()
    while blocks < decoding.blocks and (blocks == 0 or time.perf_counter() - start < seconds):
        forwards += decoding.decode_block(blocks)
        blocks += 1
        sync_device()
    elapsed = time.perf_counter() - start
    tokens = len(prompts) * blocks * cfg.block_length
    return {"tokens_per_s": tokens / elapsed, "forwards": forwards, "ms_per_forward": 1e3 * elapsed / forwards,
            "tokens_per_forward": blocks * cfg.block_length / forwards, "blocks": f"{blocks}/{decoding.blocks}",
            "seconds": elapsed}


def guarded_decoding(model, prompts: list[list[int]], cfg: SamplingConfig, device: torch.device, seconds: float
                     ) -> dict:
    """``timed_decoding``'s result and ``peak_gib``, or ``{"failed": ...}`` when the GPU runs out of memory; either
    way the memory the decoding held is given back before the next subject."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        result = timed_decoding(model, prompts, cfg, device, seconds)
    except torch.OutOfMemoryError as error:  # the frames holding the tensors go when this block ends
        result = {"failed": "out of memory: " + str(error).strip().splitlines()[0]}
    gc.collect()
    if torch.cuda.is_available():
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
    return result


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["| batch | gen | subject | tokens/s | vs current | forwards | tokens/forward | ms/forward | blocks | "
             "peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        if "failed" in r:
            lines.append(f"| {r['batch']} | {r['gen_length']} | {r['subject']} | failed: {r['failed']} | - | - | - | "
                         f"- | - | {peak} |")
            continue
        ratio = "-" if r["vs_current"] is None else f"{r['vs_current']:.2f}x"
        lines.append(f"| {r['batch']} | {r['gen_length']} | {r['subject']} | {r['tokens_per_s']:.1f} | {ratio} | "
                     f"{r['forwards']} | {r['tokens_per_forward']:.2f} | {r['ms_per_forward']:.2f} | {r['blocks']} | "
                     f"{peak} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.block % args.tokens_per_step:
        raise SystemExit(f"--tokens-per-step {args.tokens_per_step}: must divide --block {args.block}")
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    model = random_model(args.preset, device, torch.bfloat16 if on_gpu else torch.float32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_speed.jsonl").write_text("")
    wanted = None if args.subjects is None else set(args.subjects.split(","))
    generator = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    for batch in map(int, args.batches.split(",")):
        prompts = torch.randint(4, model.config.vocab_size, (batch, args.prompt), generator=generator).tolist()
        for gen_length in map(int, args.gen_lengths.split(",")):
            configs = subjects(gen_length, args.block, args.threshold, args.tokens_per_step, on_gpu)
            warm = SamplingConfig(gen_length=gen_length, steps=2 * gen_length // args.block, block_length=args.block)
            for cache in ("none", "prefix", "dual"):  # untimed: the first block's refresh and one cached step
                guarded_decoding(model, prompts, replace(warm, cache=cache), device, 0.0)  # block 0 only
            current = None
            for name, cfg in configs.items():
                if wanted is not None and name not in wanted:
                    continue
                result = guarded_decoding(model, prompts, cfg, device, args.seconds)
                if name == "current":
                    current = result.get("tokens_per_s")
                row = {"batch": batch, "gen_length": gen_length, "subject": name, **result,
                       "vs_current": None if current is None or "failed" in result
                       else result["tokens_per_s"] / current,
                       "preset": args.preset, "prompt": args.prompt, "block": args.block,
                       "threshold": cfg.threshold, "cache": cfg.cache, "steps": cfg.steps,
                       "cuda_graph": cfg.cuda_graph,
                       "device": torch.cuda.get_device_name() if on_gpu else "cpu",
                       "dtype": str(next(model.parameters()).dtype), "command": " ".join(sys.argv)}
                rows.append(row)
                with open(out / "decode_speed.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                write_table(rows, out / "decode_speed.md")
                print(json.dumps({k: row[k] for k in ("batch", "gen_length", "subject", "tokens_per_s",
                                                          "vs_current", "forwards", "ms_per_forward", "blocks",
                                                          "peak_gib", "failed") if k in row}), flush=True)
    failed = sum("failed" in row for row in rows)
    if failed:
        print(f"{failed} subject(s) failed (out of memory); see {out / 'decode_speed.md'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
