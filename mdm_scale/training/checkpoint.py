"""Checkpoints: DeepSpeed's sharded save, made atomic, checkable and prunable by a manifest.

Layout under ``<output_dir>/checkpoints``::

    step_00000100/                    DeepSpeed's files (every rank's model and optimizer shards)
    step_00000100/rng_rank<r>.pt      each rank's torch RNG state (for dropout in Hugging Face models)
    step_00000100/rank_state<r>.pt    each rank's own training state (the t-sampler's, e.g. P-POTS statistics)
    step_00000100/mdm_scale_manifest.json   written by rank 0 last, after all ranks finished writing
    step_00000100/universal/          the same state re-split for any world size (made on demand, see below)
    step_00000100.damaged/            a checkpoint that failed its integrity check (kept for inspection)
    latest                            name of the newest complete checkpoint, replaced atomically

Atomic: each rank fsyncs the files it wrote and the manifest is written only after every rank has, so a crash
mid-save leaves a directory without a manifest, which is never loaded (and is removed by the next save).

Integrity: the manifest records every file's size and CRC-32 (each rank checksums its own shards, in
parallel) and the model's parameter shapes. Resuming checks them all, again split over the ranks, before
DeepSpeed reads anything: a damaged newest checkpoint is reported by file, renamed ``*.damaged`` and the run
falls back to the previous good one; a checkpoint of another model shape is refused by parameter name.

Elastic resume: ZeRO shards are cut for one world size and stage. When the world size or the ZeRO stage changed,
rank 0 converts the checkpoint once into ``universal/`` (DeepSpeed's ``ds_to_universal`` for stages 1-3;
``optimizer/universal.py`` for stage 0, whose optimizer state DeepSpeed's converter does not read) and every rank
loads its new slice from there (``checkpoint.load_universal``). A stage-0 checkpoint holds whole tensors, so at
stage 0 it loads directly on any number of ranks; a checkpoint of stages 1-3 cannot resume at stage 0 (refused
before the model is built; ``train.zero_stage: auto`` avoids it). After loading, each parameter group's weight decay
is the one this run configured (DeepSpeed's stage-3 universal load gives every group the first group's) and the
optimizer's step counts have the type its own step expects. The data stream and the noise are keyed by the global
sample index (``data/loader.py``, ``core/noise.py``), so with the same global batch the run continues on the same
samples with the same noise; a different global batch is refused, naming the ``train.grad_accum`` that keeps
it. The noise services' state is saved per rank (``rank_state<r>.pt``): after a world-size change each rank
takes over the states of some old ranks (``load_rank_parts``), so that the statistics pending on the old ranks
since their last pooling are all pooled, each once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import torch

from mdm_scale.distributed.env import DistEnv, all_gather_objects, barrier
from mdm_scale.training.optimizer.adamw import match_step_types
from mdm_scale.training.optimizer.groups import param_groups
from mdm_scale.training.optimizer.universal import write_universal

MANIFEST = "mdm_scale_manifest.json"
LATEST = "latest"
UNIVERSAL = "universal"


class CheckpointError(RuntimeError):
    pass


def step_of(path: Path) -> int:
    return int(path.name.split("_")[-1])


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, root: Path, env: DistEnv, keep_last: int, log=print):
        self.root, self.env, self.keep_last, self.log = Path(root), env, keep_last, log

    # ---- saving -------------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict, shapes: dict[str, list[int]],
             rank_state: dict | None = None) -> Path:
        """``client_state`` is rank 0's (DeepSpeed keeps it); ``rank_state`` is saved for every rank."""
        tag = f"step_{step:08d}"
        path = self.root / tag
        if self.verify(path) is None:
            return path  # this step is already saved (e.g. a periodic save on the last step)
        if self.env.is_main and path.exists():
            shutil.rmtree(path)  # leftovers of an interrupted save of the same step
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, path / f"rng_rank{self.env.rank}.pt")
        if rank_state is not None:
            torch.save(rank_state, path / f"rank_state{self.env.rank}.pt")
        barrier()
        mine = {name: [(path / name).stat().st_size, file_crc(path / name, sync=True)]
                for name in self._my_files(path)}
        files = dict(sorted(kv for part in self._gather(mine) for kv in part.items()))
        if self.env.is_main:
            manifest = {"step": step, "world_size": self.env.world_size, "files": files, "shapes": shapes,
                        "samples_seen": client_state.get("samples_seen"),
                        "zero_stage": engine.zero_optimization_stage()}
            write_atomic(path / MANIFEST, json.dumps(manifest))
            write_atomic(self.root / LATEST, tag + "\n")
            self._prune()
        barrier()
        return path

    def _prune(self) -> None:
        complete = self.complete()
        for old in complete[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        newest = step_of(complete[-1]) if complete else -1
        for stale in self._step_dirs():
            if not (stale / MANIFEST).is_file() and step_of(stale) < newest:
                shutil.rmtree(stale, ignore_errors=True)

    # ---- finding ------------------------------------------------------------------------------------------
    def _step_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=step_of)

    def complete(self) -> list[Path]:
        return [p for p in self._step_dirs() if (p / MANIFEST).is_file()]

    def verify(self, path: Path, checksums: bool = False) -> str | None:
        """None if ``path`` is a complete, undamaged checkpoint; otherwise what is wrong with it.

        Sizes only by default (cheap, any rank alone); with ``checksums`` every rank must call it: each one
        reads its share of the files and all ranks get the same answer.
        """
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return "incomplete (no manifest: the save was interrupted)"
        try:
            manifest = json.loads(manifest_path.read_text())
            files = {name: (int(size), int(crc)) for name, (size, crc) in manifest["files"].items()}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return f"unreadable manifest {manifest_path}"
        problems = []
        for name, (size, _) in files.items():
            file = path / name
            if not file.is_file():
                problems.append(f"missing file {file}")
            elif file.stat().st_size != size:
                problems.append(f"file {file} has {file.stat().st_size} bytes, the manifest says {size}")
        if checksums:
            for name in self._my_files(path, files):
                file, (size, expected) = path / name, files[name]
                if file.is_file() and file.stat().st_size == size and (crc := file_crc(file)) != expected:
                    problems.append(f"file {file} fails its checksum (CRC-32 {crc:08x}, the manifest says "
                                    f"{expected:08x})")
            problems = [p for part in self._gather(problems) for p in part]
        return problems[0] if problems else None

    def find_resumable(self) -> Path | None:
        """The newest checkpoint that passes ``verify`` with checksums (every rank calls this). Damaged newer
        ones are reported and renamed ``*.damaged``, so that no later save or resume mistakes them for good.
        If every complete checkpoint is damaged, the run stops rather than silently start over."""
        damaged = []
        for path in reversed(self._step_dirs()):
            problem = self.verify(path, checksums=True)
            if problem is None:
                self._set_aside(damaged)
                return path
            if (path / MANIFEST).is_file():
                damaged.append(path)
                self.log(f"checkpoint {path} is damaged: {problem}; falling back to the previous checkpoint")
            else:
                self.log(f"checkpoint {path} is unusable: {problem}; trying the previous one")
        if damaged:
            raise CheckpointError(f"no usable checkpoint in {self.root}: every complete one is damaged (newest: "
                                  f"{damaged[0].name}, see above); repair or remove them, or choose a new "
                                  f"train.output_dir to start over")
        return None

    def _set_aside(self, damaged: list[Path]) -> None:
        barrier()
        if self.env.is_main:
            for path in damaged:
                target = path.with_name(path.name + ".damaged")
                shutil.rmtree(target, ignore_errors=True)
                path.rename(target)
                self.log(f"moved damaged checkpoint {path} to {target.name}")
        barrier()

    @staticmethod
    def saved_zero_stage(path: Path | None) -> int | None:
        """The ZeRO stage that wrote checkpoint ``path`` (None without a checkpoint)."""
        return None if path is None else int(json.loads((path / MANIFEST).read_text()).get("zero_stage", 0))

    def load_settings(self, path: Path | None, zero_stage: int) -> dict:
        """DeepSpeed config entries that loading ``path`` at ``zero_stage`` needs: universal loading when the
        world size or the stage differs from the ones that wrote it; none from stage 0 to stage 0 (whole tensors,
        any number of ranks). A checkpoint of stages 1-3 at stage 0 is refused here, before any model is built."""
        if path is None:
            return {}
        manifest = json.loads((path / MANIFEST).read_text())
        saved = manifest.get("zero_stage", 0)
        if saved >= 1 and zero_stage == 0:
            raise CheckpointError(f"checkpoint {path} holds ZeRO stage-{saved} partitions, which stage 0 cannot load; "
                                  f"resume it with train.zero_stage 1, 2, 3 or auto")
        if saved == zero_stage and (saved == 0 or manifest["world_size"] == self.env.world_size):
            return {}
        return {"checkpoint": {"load_universal": True}}

    # ---- helpers: which rank handles which file, and gathering small results ------------------------------
    def _my_files(self, path: Path, names=None) -> list[str]:
        """This rank's share of the files: the ones a rank number in the name assigns to it (DeepSpeed's
        ``zero_pp_rank_<r>_...``, our ``rng_rank<r>``), rank 0 for the rest; sorted."""
        if names is None:
            names = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST
                     and UNIVERSAL not in p.relative_to(path).parts]
        return sorted(n for n in names if _owner(n, self.env.world_size) == self.env.rank)

    def _gather(self, value) -> list:
        # this manager's world, not the process group's: resolve_checkpoint reads as one rank inside a larger group
        return [value] if self.env.world_size == 1 else all_gather_objects(value)

    # ---- loading ------------------------------------------------------------------------------------------
    def check_compatible(self, path: Path, shapes: dict[str, list[int]], global_batch: int | None) -> None:
        """Refuse a checkpoint of another model shape or global batch (before anything is loaded or written).
        ``global_batch`` None: the weights are only read (no training continues), any batch will do."""
        problem = self.verify(path)
        if problem is not None:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        manifest = json.loads((path / MANIFEST).read_text())
        check_shapes(path, manifest["shapes"], shapes)
        saved_batch = manifest["samples_seen"] // max(manifest["step"], 1)
        if global_batch is not None and saved_batch != global_batch:
            raise CheckpointError(
                f"checkpoint {path} was trained with a global batch of {saved_batch} sequences and this run has "
                f"{global_batch}; keep the global batch when resuming (with {self.env.world_size} ranks: "
                f"train.grad_accum = {saved_batch} / (train.micro_batch_size x {self.env.world_size}))")

    def load(self, engine, path: Path, shapes: dict[str, list[int]], global_batch: int | None) -> dict:
        self.check_compatible(path, shapes, global_batch)
        manifest = json.loads((path / MANIFEST).read_text())
        load_dir, tag = path.parent, path.name
        if self.load_settings(path, engine.zero_optimization_stage()):
            load_dir, tag = path, self._universal(path, manifest, engine)
        weight_decay = [group["weight_decay"] for group in engine.optimizer.param_groups]
        _, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
        for group, decay in zip(engine.optimizer.param_groups, weight_decay, strict=True):
            group["weight_decay"] = decay
        match_step_types(engine.optimizer)
        rng_file = path / f"rng_rank{self.env.rank}.pt"
        if rng_file.is_file() and manifest["world_size"] == self.env.world_size:
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return client_state

    def _universal(self, path: Path, manifest: dict, engine) -> str:
        """Convert ``path`` to DeepSpeed's universal format once (rank 0) and return its tag under ``path``. The
        resuming ``engine``'s model names the optimizer's parameter groups of a stage-0 checkpoint."""
        target = path / UNIVERSAL
        if self.env.is_main and not target.is_dir():
            self.log(f"checkpoint {path} was written by {manifest['world_size']} rank(s) at ZeRO stage "
                     f"{manifest.get('zero_stage', 0)} and this run has {self.env.world_size} at stage "
                     f"{engine.zero_optimization_stage()}: converting it to a universal checkpoint in {target}")
            tmp = path / (UNIVERSAL + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            if manifest.get("zero_stage", 0) == 0:
                write_universal(path, tmp, [group.names for group in param_groups(engine.module, 0.0)])
            else:
                workers = str(max(1, min(8, (os.cpu_count() or 1) // 2)))
                done = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                                       "--input_folder", str(path), "--output_folder", str(tmp),
                                       "--num_extract_workers", workers, "--num_merge_workers", workers],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise CheckpointError(f"converting {path} to a universal checkpoint failed:\n"
                                          f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
            tmp.rename(target)
        barrier()
        return UNIVERSAL


def _owner(name: str, world_size: int) -> int:
    match = re.search(r"rank_?(\d+)", Path(name).name)
    rank = int(match.group(1)) if match else 0
    return rank if rank < world_size else 0


def file_crc(path: Path, sync: bool = False) -> int:
    """CRC-32 of a file, read in 64 MiB blocks; ``sync`` also flushes it to disk first (after writing it)."""
    crc = 0
    with path.open("rb") as f:
        if sync:
            os.fsync(f.fileno())
        while block := f.read(64 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def rank_state(path: Path, rank: int) -> dict:
    """What ``save(rank_state=...)`` stored for ``rank`` in checkpoint ``path`` ({} if nothing)."""
    file = path / f"rank_state{rank}.pt"
    return torch.load(file, weights_only=True) if file.is_file() else {}


def load_rank_parts(parts: dict, path: Path, rank: int, world_size: int) -> None:
    """Restore every per-rank part (a noise service, ``diffusion/service.py``) of this rank from checkpoint ``path``.

    Rank r of ``world_size`` takes over the old ranks r, r + world_size, r + 2 world_size, ... of the run that
    wrote it: its own state when the world size is unchanged; on fewer ranks, those of the dropped ranks too; on
    more ranks, none for the new ones. Each part gets those states and rank 0's (``load_rank_states``): its
    parts that are the same on every rank come from rank 0, its pending per-rank sums are the sum over the old
    ranks it takes over, so every old rank's pending statistics are pooled exactly once."""
    written_by = json.loads((path / MANIFEST).read_text())["world_size"]
    own = [rank_state(path, old) for old in range(rank, written_by, world_size)]
    main = rank_state(path, 0)
    for name, part in parts.items():
        part.load_rank_states([state.get(name, {}) for state in own], main.get(name, {}))


def check_shapes(path: Path, saved: dict[str, list[int]], current: dict[str, list[int]]) -> None:
    for name in sorted(saved.keys() | current.keys()):
        if saved.get(name) != current.get(name):
            raise CheckpointError(
                f"checkpoint {path} is from another model shape: parameter '{name}' is "
                f"{saved.get(name, 'absent')} there and {current.get(name, 'absent')} in this run")


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint that ``path`` names, for reading outside training (eval, export, the variance tool): a
    checkpoint directory (``.../checkpoints/step_N``), a ``checkpoints`` directory or a run's output directory
    (then its newest complete checkpoint whose files all pass their checksums). One process reads every file;
    nothing is renamed."""
    given = Path(path)
    if not given.is_dir():
        raise CheckpointError(f"--checkpoint {path}: no such directory")
    reader = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    if (given / MANIFEST).is_file():
        problem = CheckpointManager(given.parent, reader, 1, lambda _: None).verify(given, checksums=True)
        if problem is not None:
            raise CheckpointError(f"--checkpoint {path}: not a usable checkpoint ({problem})")
        return given
    for root in (given / "checkpoints", given):
        manager = CheckpointManager(root, reader, 1, lambda _: None)
        candidates = manager.complete()
        if candidates:
            for step_dir in reversed(candidates):
                if manager.verify(step_dir, checksums=True) is None:
                    return step_dir
            raise CheckpointError(f"--checkpoint {path}: every checkpoint under {root} is damaged or incomplete")
    raise CheckpointError(f"--checkpoint {path}: not a checkpoint (no {MANIFEST}), a checkpoints directory or a "
                          f"run's output directory")
