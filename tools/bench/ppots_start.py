"""What the P-POTS start costs against the run it precedes, measured inside one job.

The start is the offline estimate (``training/ppots_estimate.py``: ``variance.t_sampler.x0`` sequences x ``bins`` t x
``masks`` mask draws of no-grad forwards) and the first EPR fit (``restarts`` random starts). Both
are timed on the fresh engine, as in a run (``estimate_cold_s``: with CUDA it includes compiling the fused
kernels for the estimate's shapes), then the estimate once more (``estimate_warm_s``), the first training step
(``first_step_s``: compiling for the training shapes), and ``--steps`` training steps after ``--warmup`` more.
The ratios are the start, cold and warm, over ``--run-steps`` training steps (a 1,500-step run by default).

    bash tools/bench/run_gpu.sh python3 -m tools.bench.ppots_start --preset small --seq-len 192 \\
        --micro-batch 64 --out ppots_start

Random pretraining-style blocks (``common.random_blocks``) of a ``--vocab``-token vocabulary (128: a character
tokenizer's size); the estimate's settings are the configuration defaults unless ``--set`` changes them.
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

    p = step_bench_parser(__doc__, preset="small", seq_len=192, micro_batch=64, warmup=3, out="ppots_start")
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--run-steps", type=int, default=1500, help="the run length the start is compared with")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch

    from mdm_scale.config.loader import load_config
    from mdm_scale.distributed.env import init_distributed
    from mdm_scale.training.metrics import quiet_third_party_logs
    from mdm_scale.training.ppots_estimate import estimate_plan, offline_statistics
    from mdm_scale.training.trainer import Trainer
    from tools.bench.common import random_blocks, sync_device

    args = parse_args(argv)
    quiet_third_party_logs()
    env = init_distributed()
    cfg = load_config([], [
        f"model.preset={args.preset}", f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}",
        f"train.max_steps={10**6}", f"train.output_dir={args.out}-run", "train.eval_every=0", "train.lr=1e-4",
        "logging.tensorboard=false", "train.resume=never", "variance.t_sampler=ppots",
        f"variance.masks={'mirror' if args.mirror else 'bernoulli'}", *args.set])
    x0 = cfg.variance.t_sampler.x0
    cfg.variance.t_sampler.x0 = 0  # the trainer starts without the estimate; it is timed below
    blocks = max(x0, (args.warmup + args.steps + 1) * args.micro_batch * env.world_size)
    trainer = Trainer(cfg, env, data=random_blocks(args.vocab, args.seq_len, blocks, seed=cfg.seed))
    cfg.variance.t_sampler.x0 = x0

    def timed(work) -> tuple[float, object]:
        sync_device()
        start = time.perf_counter()
        result = work()
        sync_device()
        return time.perf_counter() - start, result

    estimate_cold, new_statistics = timed(lambda: offline_statistics(trainer))
    fit, _ = timed(lambda: trainer.objective.t_sampler.update(new_statistics, device=env.device))
    estimate_warm, _ = timed(lambda: offline_statistics(trainer))
    trainer.engine.train()
    first_step, _ = timed(trainer.train_step)
    for _ in range(args.warmup):
        trainer.train_step()
    times = [timed(trainer.train_step)[0] for _ in range(args.steps)]
    step = statistics.mean(times)
    plan = estimate_plan(cfg, env.world_size, env.on_gpu)
    result = {
        "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "mirror": args.mirror,
        "gpus": env.world_size, "ppots_x0": x0, "ppots_bins": cfg.variance.t_sampler.bins,
        "ppots_masks": cfg.variance.t_sampler.masks, "ppots_restarts": cfg.variance.t_sampler.restarts,
        "estimate_sequences_per_forward": plan.per_forward, "estimate_forwards_per_rank": plan.forwards,
        "estimate_cold_s": estimate_cold, "estimate_warm_s": estimate_warm, "fit_s": fit,
        "first_step_s": first_step, "step_ms": 1e3 * step,
        "step_ms_sd": 1e3 * statistics.stdev(times) if len(times) > 1 else None, "run_steps": args.run_steps,
        "start_over_run_cold": (estimate_cold + fit) / (args.run_steps * step),
        "start_over_run_warm": (estimate_warm + fit) / (args.run_steps * step),
        "device": torch.cuda.get_device_name() if env.on_gpu else "cpu", "command": " ".join(sys.argv),
    }
    if env.is_main:
        Path(f"{args.out}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
