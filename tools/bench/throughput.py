"""Training throughput: mdm-scale against a plain hand-written DeepSpeed loop, side by side.

    python -m tools.bench.throughput --gpus 2 --preset 1b --seq-len 2048 --micro-batch 8 --out bench
    python -m tools.bench.throughput --gpus 1 --preset 1b --subjects "plain,uniform,uniform[train.zero_stage=2]"
    python -m tools.bench.throughput --gpus 1 --preset 1b --data sft --grad-accum 4 \
        --subjects "uniform,uniform[data.packing=true]"
    python -m tools.bench.throughput --gpus 1 --preset 1b --subjects "uniform,llada"
    python -m tools.bench.throughput --gpus 1 --preset 8b --micro-batch 4 --config configs/llada_8b_lora.yaml \
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

``--opt-profile-steps N`` also splits ``engine.step()`` of N more steps into its pieces (``opt_profile.py``: grad
norm, clipping, the Adam update, casts and copies, all-gather; CUDA events) and lists the operators of one more
step's ``engine.step()`` by device time (torch.profiler; the Chrome trace goes to ``--profile`` DIR when given).
``--jsonl PATH`` appends each subject's result as one JSON line as soon as it finishes; ``--subject-timeout`` bounds
each subject's job, and no subject starts more than ``--budget`` seconds after the run began (the run takes at most
budget plus one subject timeout). Each mdm-scale result also holds the loss of every untimed step (the same data
and noise for every subject, so two optimizer paths at one stage should agree up to rounding).

Subjects (``--subjects``; ``name[key=value;key=value]`` adds mdm-scale overrides to one subject):
- ``plain``: the reference loop of ``plain_loop.py`` (its own model, full logits, ZeRO-3 tuned as the issue's
  minimal loop); ``plain_zero1`` / ``plain_zero2``: the same loop at ZeRO stage 1 / 2;
- ``uniform``: mdm-scale with uniform t;
- ``uniform_full_logits``: the same with the loss from full logits (measures the masked-only head);
- ``ppots``: mdm-scale with the P-POTS sampler service at the same batch;
- ``ppots_mirror``: P-POTS + MIRROR with half the micro-batch, so each forward has the same number of rows;
- ``llada``: ``uniform`` with ``model.path`` at a LLaDA-format checkpoint of the preset's shape (random bf16
  weights in sharded safetensors, ``llada_checkpoint.py``, written once to ``--checkpoint-dir``), read by the
  native loader into the built-in model class; ``vs uniform`` compares it with the preset of the same job.
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

from tools.bench.common import PPOTS_SMALL_ESTIMATE, sync_device

REPO = Path(__file__).resolve().parents[2]

# P-POTS subjects: a small offline estimate (before the timed steps; 2 sequences x 64 t x 2 masks) and a refit
# every 20 steps (the default is 50), so the timed steps include refits at a higher rate than a default run.
PPOTS = [*PPOTS_SMALL_ESTIMATE, "variance.t_sampler.refit_every=20", "variance.monitor.every=20"]
PLAIN_STAGES = {"plain": 3, "plain_zero1": 1, "plain_zero2": 2}
SUBJECTS = {
    **{name: None for name in PLAIN_STAGES},
    "uniform": [],
    "uniform_full_logits": ["model.overrides.loss_head=full"],
    "ppots": PPOTS,
    "ppots_mirror": [*PPOTS, "variance.masks=mirror", "half_micro_batch"],
    "llada": ["native_llada"],
}
MARKERS = ("half_micro_batch", "native_llada")
"""Subject settings that are not mdm-scale overrides: half the micro-batch; the LLaDA-format checkpoint."""


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
    p.add_argument("--checkpoint-dir", default=None,
                   help="where the llada subject's checkpoint is written once (default: <out>_llada_<preset>)")
    p.add_argument("--opt-profile-steps", type=int, default=0,
                   help="split engine.step() of this many more steps into its pieces (0: off)")
    p.add_argument("--jsonl", default=None, help="append each subject's result to this JSON-lines file")
    p.add_argument("--subject-timeout", type=float, default=None, help="seconds allowed to each subject's job")
    p.add_argument("--budget", type=float, default=None,
                   help="no subject starts later than this many seconds after the first (the rest are skipped)")
    p.add_argument("--out", default="bench")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- one subject, inside a deepspeed job ---------------------------------------------------------------------
def run_worker(args: argparse.Namespace) -> None:
    import torch

    from mdm_scale.distributed.env import init_distributed
    from mdm_scale.training.metrics import quiet_third_party_logs
    from tools.bench.common import flops_per_token, parameter_count

    quiet_third_party_logs()
    env = init_distributed()
    name, overrides = parse_subject(args.worker)
    extra = SUBJECTS[name]
    micro = args.micro_batch // 2 if extra and "half_micro_batch" in extra else args.micro_batch
    if extra is None:
        subject, config = _plain(args, env, PLAIN_STAGES[name])
    else:
        from mdm_scale.training.memory_plan import MemoryPlanError

        native = [f"model.path={args.checkpoint_dir}"] if "native_llada" in extra else []
        try:
            subject, config = _mdm_scale(args, env, micro, [o for o in extra if o not in MARKERS] + native + overrides)
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
    losses = [float(loss) for loss in subject.losses]
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
        "source_format": getattr(config, "source_format", None),
        "losses": losses,
    }
    if args.opt_profile_steps:
        trace = Path(args.profile) / args.worker / "optimizer_step.json.gz" if args.profile and env.is_main else None
        result["optimizer_profile"] = subject.optimizer_profile(args.opt_profile_steps, trace)
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
    on this GPU (mdm-scale's also keep each step's loss in ``losses``, a device scalar). With a ``trainer``, the
    breakdown also splits each step into the trainer's sections; ``engine`` is the DeepSpeed engine, ``fused``
    whether it runs ``train.optimizer: fused``."""

    def __init__(self, step, engine, grad_accum: int = 1, trainer=None, fused: bool = False):
        self.step, self.engine, self.grad_accum, self.trainer, self.fused = step, engine, grad_accum, trainer, fused
        self.losses: list = []

    def optimizer_profile(self, steps: int, trace: Path | None) -> dict:
        """``engine.step()`` of ``steps`` more steps split into pieces, and the top operators of one more."""
        from tools.bench.opt_profile import StepProfile, top_ops

        with StepProfile(self.engine, self.fused) as profile:
            for _ in range(steps):
                self.step()
        return {**profile.summary(), "top_ops": top_ops(self.engine, self.step, trace)}

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
    from mdm_scale.config.presets import PRESETS
    from mdm_scale.models.configuration_mdm import MDMConfig
    from tools.bench.plain_loop import PlainLoop

    preset = {**PRESETS[args.preset], "vocab_size": _vocab(args)}
    loop = PlainLoop(preset, args.micro_batch, args.seq_len, env.world_size, zero_stage)
    return Subject(loop.step, loop.engine), MDMConfig(**preset)


def _vocab(args) -> int:
    from mdm_scale.config.presets import PRESETS

    return args.vocab or PRESETS[args.preset].get("vocab_size", 32000)


def _mdm_scale(args, env, micro: int, overrides: list[str]):
    from mdm_scale.config.loader import load_config
    from mdm_scale.training.trainer import Trainer
    from tools.bench.common import random_blocks, random_sft

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
        loss, counts = trainer.train_step()
        subject.losses.append(loss / counts[0])
        return int(counts[3])  # host counts: no device synchronisation

    subject = Subject(step, trainer.engine, cfg.train.grad_accum, trainer, fused=trainer.cfg.train.optimizer == "fused")
    return subject, trainer.engine.module.config


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
    if any(parse_subject(s)[0] == "llada" for s in subjects):
        _llada_checkpoint(args)
    start = time.perf_counter()
    peak, device = _machine()
    results = []
    report = _report(results, args, peak, device)
    for subject in subjects:
        left = None if args.budget is None else args.budget - (time.perf_counter() - start)
        unavailable = _unavailable(subject, args) or (f"skipped: the --budget of {args.budget:.0f} s is spent"
                                                      if left is not None and left <= 0 else None)
        if unavailable:
            print(f"[bench] {subject}: unavailable ({unavailable})", flush=True)
            results.append({"subject": subject, "unavailable": unavailable})
            continue
        results.append(_launch(subject, args, args.subject_timeout))
        report = _report(results, args, peak, device)
        Path(f"{args.out}.json").write_text(json.dumps(report, indent=2))
        Path(f"{args.out}.md").write_text(_markdown(report))
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({k: report[k] for k in ("date", "device", "measured_peak_tflops", "preset")}
                                   | results[-1]) + "\n")
    print(_markdown(report))
    return 0


def _llada_checkpoint(args) -> None:
    """Write the llada subject's checkpoint unless ``--checkpoint-dir`` already holds one of this shape."""
    from tools.bench.llada_checkpoint import llada_config_json, preset_config, write_random_llada

    args.checkpoint_dir = args.checkpoint_dir or f"{args.out}_llada_{args.preset}"
    directory = Path(args.checkpoint_dir)
    config = preset_config(args.preset, _vocab(args))
    if (directory / "config.json").is_file() and \
            json.loads((directory / "config.json").read_text()) == llada_config_json(config):
        print(f"[bench] llada: reusing the checkpoint in {directory}", flush=True)
        return
    shutil.rmtree(directory, ignore_errors=True)
    start = time.perf_counter()
    write_random_llada(directory, config)
    print(f"[bench] llada: wrote a random {args.preset} LLaDA-format checkpoint to {directory} in "
          f"{time.perf_counter() - start:.0f} s", flush=True)


def _unavailable(subject: str, args) -> str | None:
    """The config error a subject's overrides raise on this version of mdm-scale, if any."""
    from mdm_scale.config.loader import load_config
    from mdm_scale.config.schema import ConfigError

    name, extra = parse_subject(subject)
    if SUBJECTS[name] is None:
        return None
    overrides = [o for o in SUBJECTS[name] if o not in MARKERS] + extra
    try:
        load_config(args.config, [*args.set, *overrides])
    except ConfigError as err:
        return str(err)
    return None


def _launch(subject: str, args, timeout: float | None = None) -> dict:
    import signal

    from mdm_scale.distributed.discovery import free_port

    port = free_port()
    result = Path(tempfile.mkdtemp()) / "result.json"
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cmd = [launcher, "--num_gpus", str(args.gpus), "--master_port",
           str(port), "--module", "tools.bench.throughput", "--worker", subject, "--result", str(result)]
    for name in ("preset", "seq_len", "micro_batch", "grad_accum", "warmup", "steps", "breakdown_steps", "data",
                 "opt_profile_steps"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.profile:
        cmd += ["--profile", args.profile]
    if args.vocab:
        cmd += ["--vocab", str(args.vocab)]
    if args.checkpoint_dir:
        cmd += ["--checkpoint-dir", args.checkpoint_dir]
    for item in args.set:
        cmd += ["--set", item]
    for item in args.config:
        cmd += ["--config", item]
    print(f"[bench] {subject}: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"},
                            start_new_session=True)  # its own process group: a timeout ends the launcher's ranks too
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"subject": subject, "failed": f"timed out after {timeout:.0f} s"}
    if code != 0 or not result.is_file():
        return {"subject": subject, "failed": f"exit code {code}"}
    return json.loads(result.read_text())


def _machine() -> tuple[float | None, str]:
    import torch

    if not torch.cuda.is_available():
        return None, "cpu"
    from tools.bench.common import measured_peak_tflops

    peak = measured_peak_tflops()
    torch.cuda.empty_cache()  # leave the subjects' jobs all the memory but this process's context
    return peak, torch.cuda.get_device_name()


def _report(results: list[dict], args, peak: float | None, device: str) -> dict:
    from tools.bench.common import datasheet_peak

    sheet = datasheet_peak(device)
    for r in results:
        if "tokens_per_s_per_gpu" not in r:
            continue
        r["tflops_per_gpu"] = r["flops_per_token"] * r["tokens_per_s_per_gpu"] / 1e12
        r["mfu_measured_peak"] = r["tflops_per_gpu"] / peak if peak else None
        r["mfu_datasheet"] = r["tflops_per_gpu"] / sheet if sheet else None
    for name in ("plain", "uniform"):
        reference = next((r for r in results if r["subject"] == name and "tokens_per_s_per_gpu" in r), None)
        for r in results if reference else []:
            if "tokens_per_s_per_gpu" in r:
                r[f"vs_{name}"] = r["tokens_per_s_per_gpu"] / reference["tokens_per_s_per_gpu"]
    return {"date": time.strftime("%Y-%m-%d"), "device": device, "gpus": args.gpus,
            "measured_peak_tflops": peak, "datasheet_peak_tflops": sheet, "command": " ".join(sys.argv),
            "preset": args.preset, "vocab": args.vocab, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "data": args.data,
            "results": results}


def _markdown(report: dict) -> str:
    from tools.bench.opt_profile import describe

    peak = report["measured_peak_tflops"]
    lines = [f"Device: {report['device']} x {report['gpus']}, date {report['date']}; measured bf16 peak "
             f"{peak:.0f} TFLOP/s" if peak else f"Device: {report['device']} x {report['gpus']}",
             f"Command: `{report['command']}`", "",
             "| subject | micro (x accum) | tokens/s/GPU | vs plain | vs uniform | TFLOP/s/GPU | MFU (measured / "
             "datasheet) | peak mem GiB (plan) | fwd / bwd / opt / comm / sampler / probe / data ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        if "tokens_per_s_per_gpu" not in r:
            why = r.get("unavailable") or r.get("failed") or f"refused: {r.get('refused')}"
            lines.append(f"| {r['subject']} | | {why} | | | | | | |")
            continue
        b = r["breakdown_ms"]
        parts = " / ".join(f"{b[k]:.0f}" if k in b else "-" for k in ("forward", "backward", "optimizer",
                                                                       "communication", "sampler", "probe", "data"))
        mfu = " / ".join(f"{100 * m:.1f}%" if m else "-" for m in (r["mfu_measured_peak"], r["mfu_datasheet"]))
        mem = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "-"
        mem += f" ({r['plan_peak_gb']:.1f})" if r.get("plan_peak_gb") is not None else ""
        micro = f"{r['micro_batch']}" + (f" x {r['grad_accum']}" if r.get("grad_accum", 1) > 1 else "")
        lines.append(f"| {r['subject']} | {micro} | {r['tokens_per_s_per_gpu']:.0f} | "
                     f"{r.get('vs_plain', float('nan')):.3f} | {r.get('vs_uniform', float('nan')):.3f} | "
                     f"{r['tflops_per_gpu']:.1f} | {mfu} | {mem} | {parts} |")
    for r in report["results"]:
        if "optimizer_profile" in r:
            lines += ["", *describe(r["subject"], r["optimizer_profile"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
