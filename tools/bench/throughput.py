"""Training throughput: mdm-scale against a plain hand-written DeepSpeed loop, side by side.

    python tools/bench/throughput.py --gpus 2 --preset 1b --seq-len 2048 --micro-batch 8 --out bench
    python tools/bench/throughput.py --gpus 1 --preset 1b --subjects "plain,uniform,uniform[train.zero_stage=2]"
    python tools/bench/throughput.py --gpus 1 --preset 1b --data sft --grad-accum 4 \
        --subjects "uniform,uniform[data.packing=true]"
    python tools/bench/throughput.py --gpus 1 --preset 8b --micro-batch 4 --config configs/llada_8b_lora.yaml \
        --subjects "uniform[train.zero_stage=0]"

Each subject runs in its own ``deepspeed --num_gpus N`` job on the same data and model shape: random-token
pretraining blocks (``--data blocks``, no padding), or (``--data sft``) random SFT records with log-normal
lengths between 32 and ``--seq-len`` tokens (median 256; a quarter of each record is prompt). It reports
tokens/s/GPU (real, non-pad tokens through the model; MIRROR's two rows both count), TFLOP/s/GPU and MFU
(``common.py`` has the FLOP convention; weight gradients only for trained parameters, so about 4 N with LoRA;
for SFT data MFU is only a proxy, the attention term assumes full rows), peak memory next to the memory plan's
estimate (``training/memory_plan.py``; a subject the plan refuses is reported as refused, with its line), and a
step-time breakdown (forward / backward / optimizer / communication / sampler / online
variance probe / data) from extra steps timed with device synchronisation and DeepSpeed's communication logger
(those steps are slower, so throughput comes from untimed steps). Results go to ``<out>.json`` and ``<out>.md``,
rewritten after every subject (a job stopped by a time limit keeps the subjects it finished).

Subjects (``--subjects``; ``name[key=value;key=value]`` adds mdm-scale overrides to one subject):
- ``plain``: the reference loop of ``plain_loop.py`` (its own model, full logits, ZeRO-3 tuned as the issue's
  minimal loop); ``plain_zero1`` / ``plain_zero2``: the same loop at ZeRO stage 1 / 2;
- ``uniform``: mdm-scale with uniform t;
- ``uniform_full_logits``: the same with the loss from full logits (measures the masked-only head);
- ``ppots``: mdm-scale with the P-POTS sampler service at the same batch;
- ``ppots_mirror``: P-POTS + MIRROR with half the micro-batch, so each forward has the same number of rows.
A subject whose settings the installed mdm-scale does not know is reported as unavailable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools" / "bench"))

from common import PPOTS_SMALL_ESTIMATE, sync_device  # noqa: E402

# P-POTS subjects: a small offline estimate (before the timed steps; 2 sequences x 64 t x 2 masks) and a refit
# every 20 steps (the default is 50), so the timed steps include refits at a higher rate than a default run.
PPOTS = [*PPOTS_SMALL_ESTIMATE, "variance.ppots_refit_every=20"]
PLAIN_STAGES = {"plain": 3, "plain_zero1": 1, "plain_zero2": 2}
SUBJECTS = {
    **{name: None for name in PLAIN_STAGES},
    "uniform": [],
    "uniform_full_logits": ["model.overrides.loss_head=full"],
    "ppots": PPOTS,
    "ppots_mirror": [*PPOTS, "variance.mirror=true", "half_micro_batch"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--preset", default="1b")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step (mdm-scale subjects)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--breakdown-steps", type=int, default=5)
    p.add_argument("--subjects", default="plain,uniform,ppots,ppots_mirror")
    p.add_argument("--set", action="append", default=[], help="extra mdm-scale overrides for every subject")
    p.add_argument("--config", action="append", default=[],
                   help="YAML config(s) under the bench's own settings (mdm-scale subjects), e.g. a LoRA section")
    p.add_argument("--data", choices=["blocks", "sft"], default="blocks",
                   help="random pretraining blocks, or SFT records with log-normal lengths")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also record 2 steps with torch.profiler: a Chrome trace and op tables in DIR")
    p.add_argument("--out", default="bench")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- one subject, inside a deepspeed job ---------------------------------------------------------------------
def run_worker(args: argparse.Namespace) -> None:
    import torch
    from common import flops_per_token, parameter_count

    from mdm_scale.distributed.env import init_distributed
    from mdm_scale.training.metrics import quiet_third_party_logs

    quiet_third_party_logs()
    env = init_distributed()
    name, overrides = parse_subject(args.worker)
    extra = SUBJECTS[name]
    micro = args.micro_batch // 2 if extra and "half_micro_batch" in extra else args.micro_batch
    if extra is None:
        subject, config = _plain(args, env, PLAIN_STAGES[name])
    else:
        from mdm_scale.training.memory_plan import MemoryPlanError

        try:
            subject, config = _mdm_scale(args, env, micro, [o for o in extra if o != "half_micro_batch"] + overrides)
        except MemoryPlanError as err:
            if env.is_main:
                Path(args.result).write_text(json.dumps({"subject": args.worker, "refused": str(err)}))
            return
    for _ in range(args.warmup):
        subject.step()
    sync_device()
    start, tokens = time.perf_counter(), 0
    for _ in range(args.steps):
        tokens += subject.step()
    sync_device()
    elapsed = time.perf_counter() - start
    if args.profile and env.is_main:
        _profile(subject, Path(args.profile) / args.worker)
    result = {
        "subject": args.worker, "gpus": env.world_size, "micro_batch": micro,
        "grad_accum": subject.grad_accum,
        "tokens_per_step_per_gpu": tokens / args.steps,
        "step_seconds": elapsed / args.steps,
        "tokens_per_s_per_gpu": tokens / elapsed,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if env.on_gpu else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if env.on_gpu else None,
        "breakdown_ms": subject.breakdown(args.breakdown_steps),
        "parameters": parameter_count(config),
        "flops_per_token": subject.trainer.model_flops_per_token() if subject.trainer else
        flops_per_token(config, args.seq_len),
        "plan_peak_gb": subject.trainer.plan.estimate.device_peak / 2**30 if subject.trainer and subject.trainer.plan
        else None,
    }
    if env.is_main:
        Path(args.result).write_text(json.dumps(result))


def _profile(subject, out: Path) -> None:
    """Two steps under torch.profiler: ``trace.json.gz`` (chrome://tracing, Perfetto) and the top ops by host and
    device time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            subject.step()
        sync_device()
    prof.export_chrome_trace(str(out / "trace.json.gz"))
    device_key = "self_device_time_total" if torch.cuda.is_available() else "cpu_time_total"
    tables = [prof.key_averages().table(sort_by=key, row_limit=30) for key in ("self_cpu_time_total", device_key)]
    (out / "ops.txt").write_text("\n\n".join(tables))


class Subject:
    """What is timed: ``step()`` runs one optimiser step and returns the real tokens it put through the model
    on this GPU. With a ``trainer``, the breakdown also splits each step into the trainer's sections."""

    def __init__(self, step, grad_accum: int = 1, trainer=None):
        self.step, self.grad_accum, self.trainer = step, grad_accum, trainer

    def breakdown(self, steps: int) -> dict:
        """Per-step milliseconds of ``steps`` extra steps run with synchronising timers and the comms logger."""
        import deepspeed.comm as dist
        from deepspeed.comm.comm import comms_logger

        from mdm_scale.training.step_timer import StepTimer

        if steps == 0:
            return {}
        timer = StepTimer(self.trainer.env.device) if self.trainer else None
        if self.trainer:
            self.trainer.timer = timer
        dist.configure(enabled=True, prof_all=True)
        comms_logger.comms_dict.clear()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync_device()
        total = time.perf_counter() - start
        dist.configure(enabled=False)
        out = {name: 1e3 * seconds / steps for name, seconds in (timer.seconds.items() if timer else [])}
        comm = sum(sum(record[1]) for sizes in comms_logger.comms_dict.values() for record in sizes.values())
        out.update(communication=comm / steps, step=1e3 * total / steps)  # the logger records milliseconds
        return out


def parse_subject(spec: str) -> tuple[str, list[str]]:
    """``uniform[train.zero_stage=2;data.packing=true]`` -> ("uniform", [overrides])."""
    name, _, rest = spec.partition("[")
    return name, [item for item in rest.rstrip("]").split(";") if item]


def _plain(args, env, zero_stage: int):
    from plain_loop import PlainLoop

    from mdm_scale.config.presets import PRESETS
    from mdm_scale.models.configuration_mdm import MDMConfig

    preset = {**PRESETS[args.preset], "vocab_size": _vocab(args)}
    loop = PlainLoop(preset, args.micro_batch, args.seq_len, env.world_size, zero_stage)
    return Subject(loop.step), MDMConfig(**preset)


def _vocab(args) -> int:
    from mdm_scale.config.presets import PRESETS

    return args.vocab or PRESETS[args.preset].get("vocab_size", 32000)


def _mdm_scale(args, env, micro: int, overrides: list[str]):
    from common import random_blocks, random_sft

    from mdm_scale.config.loader import load_config
    from mdm_scale.training.trainer import Trainer

    out = Path(args.result).parent / "run"  # the same directory on every rank (the config must agree)
    sets = [f"model.preset={args.preset}", f"data.seq_len={args.seq_len}", f"train.micro_batch_size={micro}",
            f"train.grad_accum={args.grad_accum}", f"train.max_steps={10**6}", f"train.output_dir={out}",
            "train.zero_stage=3",
            "train.eval_every=0", "train.lr=1e-4", "logging.tensorboard=false", "train.resume=never",
            *args.set, *overrides]
    cfg = load_config(args.config, sets)
    steps = args.warmup + args.steps + args.breakdown_steps + 1
    if args.data == "sft":
        data = random_sft(_vocab(args), args.seq_len, 4096, seed=cfg.seed)
    else:
        data = random_blocks(_vocab(args), args.seq_len, steps * micro * cfg.train.grad_accum * env.world_size,
                             seed=cfg.seed)
    trainer = Trainer(cfg, env, data=data)
    trainer.engine.train()

    def step() -> int:
        return int(trainer.train_step()[1][3])  # host counts: no device synchronisation

    return Subject(step, cfg.train.grad_accum, trainer), trainer.engine.module.config


# ---- the orchestrator ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    unknown = [s for s in subjects if parse_subject(s)[0] not in SUBJECTS]
    if unknown:
        raise SystemExit(f"unknown subjects {unknown}; choose from {sorted(SUBJECTS)}")
    peak, device = _machine()
    results = []
    report = _report(results, args, peak, device)
    for subject in subjects:
        unavailable = _unavailable(subject, args)
        if unavailable:
            print(f"[bench] {subject}: unavailable ({unavailable})", flush=True)
            results.append({"subject": subject, "unavailable": unavailable})
            continue
        results.append(_launch(subject, args))
        report = _report(results, args, peak, device)
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=2))
        Path(f"{args.out}.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


def _unavailable(subject: str, args) -> str | None:
    """The config error a subject's overrides raise on this version of mdm-scale, if any."""
    from mdm_scale.config.loader import load_config
    from mdm_scale.config.schema import ConfigError

    name, extra = parse_subject(subject)
    if SUBJECTS[name] is None:
        return None
    overrides = [o for o in SUBJECTS[name] if o != "half_micro_batch"] + extra
    try:
        load_config(args.config, [*args.set, *overrides])
    except ConfigError as err:
        return str(err)
    return None


def _launch(subject: str, args) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = Path(tempfile.mkdtemp()) / "result.json"
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cmd = [launcher, "--num_gpus", str(args.gpus), "--master_port",
           str(port), __file__, "--worker", subject, "--result", str(result)]
    for name in ("preset", "seq_len", "micro_batch", "grad_accum", "warmup", "steps", "breakdown_steps", "data"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.profile:
        cmd += ["--profile", args.profile]
    if args.vocab:
        cmd += ["--vocab", str(args.vocab)]
    for item in args.set:
        cmd += ["--set", item]
    for item in args.config:
        cmd += ["--config", item]
    print(f"[bench] {subject}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
    if proc.returncode != 0 or not result.is_file():
        return {"subject": subject, "failed": f"exit code {proc.returncode}"}
    return json.loads(result.read_text())


def _machine() -> tuple[float | None, str]:
    import torch

    if not torch.cuda.is_available():
        return None, "cpu"
    from common import measured_peak_tflops

    peak = measured_peak_tflops()
    torch.cuda.empty_cache()  # leave the subjects' jobs all the memory but this process's context
    return peak, torch.cuda.get_device_name()


def _report(results: list[dict], args, peak: float | None, device: str) -> dict:
    from common import datasheet_peak

    sheet = datasheet_peak(device)
    for r in results:
        if "tokens_per_s_per_gpu" not in r:
            continue
        r["tflops_per_gpu"] = r["flops_per_token"] * r["tokens_per_s_per_gpu"] / 1e12
        r["mfu_measured_peak"] = r["tflops_per_gpu"] / peak if peak else None
        r["mfu_datasheet"] = r["tflops_per_gpu"] / sheet if sheet else None
    reference = next((r for r in results if r["subject"] == "plain" and "tokens_per_s_per_gpu" in r), None)
    if reference:
        for r in results:
            if "tokens_per_s_per_gpu" in r:
                r["vs_plain"] = r["tokens_per_s_per_gpu"] / reference["tokens_per_s_per_gpu"]
    return {"date": time.strftime("%Y-%m-%d"), "device": device, "gpus": args.gpus,
            "measured_peak_tflops": peak, "datasheet_peak_tflops": sheet, "command": " ".join(sys.argv),
            "preset": args.preset, "vocab": args.vocab, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "data": args.data,
            "results": results}


def _markdown(report: dict) -> str:
    peak = report["measured_peak_tflops"]
    lines = [f"Device: {report['device']} x {report['gpus']}, date {report['date']}; measured bf16 peak "
             f"{peak:.0f} TFLOP/s" if peak else f"Device: {report['device']} x {report['gpus']}",
             f"Command: `{report['command']}`", "",
             "| subject | micro (x accum) | tokens/s/GPU | vs plain | TFLOP/s/GPU | MFU (measured / datasheet) | "
             "peak mem GiB (plan) | fwd / bwd / opt / comm / sampler / probe / data ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        if "tokens_per_s_per_gpu" not in r:
            why = r.get("unavailable") or r.get("failed") or f"refused: {r.get('refused')}"
            lines.append(f"| {r['subject']} | | {why} | | | | | |")
            continue
        b = r["breakdown_ms"]
        parts = " / ".join(f"{b[k]:.0f}" if k in b else "-" for k in ("forward", "backward", "optimizer",
                                                                       "communication", "sampler", "probe", "data"))
        mfu = " / ".join(f"{100 * m:.1f}%" if m else "-" for m in (r["mfu_measured_peak"], r["mfu_datasheet"]))
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        mem += f" ({r['plan_peak_gb']:.1f})" if r.get("plan_peak_gb") is not None else ""
        micro = f"{r['micro_batch']}" + (f" x {r['grad_accum']}" if r.get("grad_accum", 1) > 1 else "")
        lines.append(f"| {r['subject']} | {micro} | {r['tokens_per_s_per_gpu']:.0f} | "
                     f"{r.get('vs_plain', float('nan')):.3f} | {r['tflops_per_gpu']:.1f} | {mfu} | {mem} | {parts} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
