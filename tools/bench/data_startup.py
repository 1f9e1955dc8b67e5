"""Data start-up of N ranks on one node: seconds to the first training micro-batch, and memory per rank, for an
SFT set of R records (the synthetic arithmetic task), with this checkout's code or another's (``--code``).

    python tools/bench/data_startup.py --records 1000000 --ranks 8 --work /tmp/bench_data --label after \\
        --out /tmp/bench_data/results.jsonl
    git archive main mdm_scale | tar -x -C /tmp/main_code          # the code before, for comparison
    python tools/bench/data_startup.py ... --code /tmp/main_code --label before

Each rank is a process with no model: it joins a gloo process group, waits for the others, then builds the data
as the trainer does (``data.build.build_data``; with this checkout's code the ranks share the work and the
data cache in ``--work/cache``), and loads its first micro-batch of the training stream. It reports the seconds
that took and its memory then: RSS, PSS and USS (psutil, from ``/proc/<pid>/smaps``): PSS divides each page
shared by several processes (a memory-mapped token store in the page cache) among them, USS counts the pages
only this process holds; ``*_data_mb`` is the growth over the same process just before the data was built
(Python, torch and the tokenizers already imported). ``--repeat 2`` starts again on the same cache: a second
run, or a resume. Every rank writes one JSON line to ``--out`` per attempt, and the launcher a summary line
per attempt.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SEQ_LEN, MICRO_BATCH = 256, 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--work", required=True, help="directory for the data set and the cache")
    p.add_argument("--code", default=str(Path(__file__).resolve().parents[2]),
                   help="directory holding the mdm_scale package to measure (default: this checkout)")
    p.add_argument("--label", required=True, help="name of this measurement in the results")
    p.add_argument("--repeat", type=int, default=2, help="attempts on the same cache")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per attempt")
    p.add_argument("--out", required=True, help="JSON lines, appended")
    p.add_argument("--touch-all", action="store_true",
                   help="after the first micro-batch, read every token and flag of the training set (all pages of a "
                        "memory-mapped store become resident: shows how the ranks share them)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # the rank, in a worker
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--attempt", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def dataset(args: argparse.Namespace) -> Path:
    """The SFT file, written once per size (``data synth``'s generator)."""
    path = Path(args.work) / f"sft_{args.records}" / "train.jsonl"
    if not path.is_file():
        from mdm_scale.data.synthetic import write_synthetic_task

        write_synthetic_task(path.parent, train=args.records, eval=0, seed=0)
    return path


def worker(args: argparse.Namespace) -> dict:
    """One rank: build the data, load the first micro-batch, report time and memory (with the ``mdm_scale`` of
    ``--code``, which the launcher puts first on the workers' ``PYTHONPATH``)."""
    start = time.perf_counter()
    import numpy as np
    import psutil
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.worker,
                            world_size=args.ranks)
    from mdm_scale.config.schema import DataConfig
    from mdm_scale.data.build import build_data
    from mdm_scale.data.loader import TrainLoader

    imported = time.perf_counter() - start
    cfg = DataConfig(train_file=str(dataset(args)), seq_len=SEQ_LEN)
    extra = []
    if "ranks" in inspect.signature(build_data).parameters:  # this checkout: the ranks build together
        from mdm_scale.data.cache import Ranks
        from mdm_scale.distributed.env import DistEnv

        extra = [Ranks.of(DistEnv(args.worker, args.ranks, args.worker, torch.device("cpu")))]
    dist.barrier()
    base = psutil.Process().memory_full_info()  # the process before any data: Python, torch, tokenizers
    start = time.perf_counter()
    data = build_data(cfg, 0, Path(args.work) / "no_saved_tokenizer", *extra)
    loader = TrainLoader(data.train, 0, args.worker, args.ranks, MICRO_BATCH, 1, 0, 8, SEQ_LEN)
    batch = loader.micro_batch_at(0, 0)
    seconds = time.perf_counter() - start
    if args.touch_all:
        for name in ("tokens", "scored"):
            array = getattr(data.train, name, None)
            for piece in getattr(array, "pieces", [] if array is None else [array]):
                int(np.asarray(piece).sum())
    memory = psutil.Process().memory_full_info()
    dist.barrier()  # every rank holds its data while the others measure
    dist.destroy_process_group()
    return {"label": args.label, "attempt": args.attempt, "rank": args.worker, "ranks": args.ranks,
            "records": args.records, "sequences": len(data.train), "batch_rows": int(batch.input_ids.shape[0]),
            "seconds": round(seconds, 2), "import_seconds": round(imported, 2),
            **{f"{k}_mb": getattr(memory, k) / 2**20 for k in ("rss", "pss", "uss")},
            **{f"{k}_data_mb": (getattr(memory, k) - getattr(base, k)) / 2**20 for k in ("rss", "pss", "uss")}}


def launch(args: argparse.Namespace, attempt: int) -> list[dict]:
    from mdm_scale.distributed.discovery import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "MDM_SCALE_DATA_CACHE": str(Path(args.work) / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [args.code, os.environ.get("PYTHONPATH")]))}
    port = free_port()
    cmd = [sys.executable, __file__, "--records", str(args.records), "--ranks", str(args.ranks), "--work", args.work,
           "--code", args.code, "--label", args.label, "--out", args.out, "--port", str(port), "--attempt",
           str(attempt), *(["--touch-all"] if args.touch_all else [])]
    procs = [subprocess.Popen([*cmd, "--worker", str(r)], env=env, stdout=subprocess.PIPE, text=True)
             for r in range(args.ranks)]
    lines = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=args.timeout)
            lines.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            proc.kill()
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)), flush=True)
        return 0
    Path(args.work).mkdir(parents=True, exist_ok=True)
    dataset(args)
    with open(args.out, "a") as results:
        for attempt in range(args.repeat):
            load = os.getloadavg()[0]  # before the ranks start: what else runs on the machine
            ranks = launch(args, attempt)
            summary = {"label": args.label, "attempt": attempt, "ranks": args.ranks, "records": args.records,
                       "load_average_before": load, "cpus": os.cpu_count(),
                       "seconds_max": max(r["seconds"] for r in ranks),
                       **{f"{k}_mean": sum(r[k] for r in ranks) / len(ranks)
                          for k in ("rss_mb", "pss_mb", "uss_mb", "rss_data_mb", "pss_data_mb", "uss_data_mb")},
                       "pss_total_mb": sum(r["pss_mb"] for r in ranks)}
            for line in [*ranks, summary]:
                results.write(json.dumps(line) + "\n")
            results.flush()
            print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
