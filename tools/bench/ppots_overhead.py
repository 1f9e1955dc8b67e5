"""What the P-POTS sampler service adds to the step time, measured inside one job.

Blocks of ``--block-steps`` optimiser steps with P-POTS on (inverse-CDF draws, per-micro-batch statistics on the
device, a refit every ``--refit-every`` steps: all-reduce, fit on rank 0, broadcast) alternate with blocks in
which the same trainer draws uniform t and skips the hooks. Alternating (ABAB...) cancels slow drift; the
overhead is the mean step time with the service over the mean without, and its standard error comes from the
spread over block pairs. The difference includes the effect of p(t) on the number of masked tokens (the
masked-only head computes only those), which is part of using P-POTS at the same batch.

    bash tools/bench/run_gpu.sh deepspeed --num_gpus 2 --module tools.bench.ppots_overhead --preset 1b \\
        --out ppots_overhead

Result: ``<out>.json`` and one line on stdout (rank 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    from tools.bench.common import step_bench_parser

    p = step_bench_parser(__doc__, preset="1b", seq_len=2048, micro_batch=8, warmup=5, out="ppots_overhead")
    p.add_argument("--blocks", type=int, default=5, help="block pairs (service on, service off)")
    p.add_argument("--block-steps", type=int, default=20)
    p.add_argument("--refit-every", type=int, default=20, help="the default run setting is 50")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch

    from mdm_scale.config.loader import load_config
    from mdm_scale.config.presets import PRESETS
    from mdm_scale.diffusion.t_samplers import UniformT
    from mdm_scale.distributed.env import init_distributed
    from mdm_scale.training.metrics import quiet_third_party_logs
    from mdm_scale.training.trainer import Trainer
    from tools.bench.common import PPOTS_SMALL_ESTIMATE, random_blocks, sync_device

    args = parse_args(argv)
    quiet_third_party_logs()
    env = init_distributed()
    cfg = load_config([], [
        f"model.preset={args.preset}", f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
        f"train.max_steps={10**6}", f"train.output_dir={args.out}-run",
        "train.eval_every=0", "train.lr=1e-4", "logging.tensorboard=false", "train.resume=never",
        *PPOTS_SMALL_ESTIMATE,
        f"variance.t_sampler.refit_every={args.refit_every}", f"variance.monitor.every={args.refit_every}",
        f"variance.masks={'mirror' if args.mirror else 'bernoulli'}", *args.set])
    steps = args.warmup + 2 * args.blocks * args.block_steps
    vocab = PRESETS[args.preset].get("vocab_size", 32000)
    trainer = Trainer(cfg, env, data=random_blocks(vocab, args.seq_len, (steps + 1) * args.micro_batch *
                                                   env.world_size, seed=cfg.seed))
    trainer.engine.train()
    service, uniform = trainer.objective.t_sampler, UniformT(cfg.seed)

    def timed_block(sampler) -> float:
        trainer.objective.t_sampler = sampler
        sync_device()
        start = time.perf_counter()
        for _ in range(args.block_steps):
            trainer.train_step()
        sync_device()
        return (time.perf_counter() - start) / args.block_steps

    for _ in range(args.warmup):
        trainer.train_step()
    pairs = [(timed_block(service), timed_block(uniform)) for _ in range(args.blocks)]
    ratios = [on / off - 1.0 for on, off in pairs]
    result = {
        "preset": args.preset, "gpus": env.world_size, "micro_batch": args.micro_batch, "mirror": args.mirror,
        "refit_every": args.refit_every, "block_steps": args.block_steps, "refits": service.refits,
        "step_ms_ppots": 1e3 * statistics.mean(p[0] for p in pairs),
        "step_ms_uniform": 1e3 * statistics.mean(p[1] for p in pairs),
        "overhead": statistics.mean(ratios),
        "overhead_stderr": statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else None,
        "device": torch.cuda.get_device_name() if env.on_gpu else "cpu",
    }
    if env.is_main:
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
