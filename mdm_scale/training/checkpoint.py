"""Checkpoints: DeepSpeed's sharded save, made atomic, checkable and prunable by a manifest.

Layout under ``<output_dir>/checkpoints``::

    step_00000100/                    DeepSpeed's files (every rank's model and optimizer shards)
    step_00000100/rng_rank<r>.pt      each rank's torch RNG state (for dropout in Hugging Face models)
    step_00000100/rank_state<r>.pt    each rank's own training state (the t-sampler's, e.g. P-POTS statistics)
    step_00000100/mdm_scale_manifest.json   written by rank 0 last, after all ranks finished writing
    latest                            name of the newest complete checkpoint, replaced atomically

A directory without a manifest is an interrupted save and is never loaded. The manifest records every file's
size and the model's parameter shapes, so a truncated file or a checkpoint of another model is reported by
name before DeepSpeed reads anything; a damaged newest checkpoint falls back to the previous good one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mdm_scale.distributed.env import DistEnv, barrier

MANIFEST = "mdm_scale_manifest.json"
LATEST = "latest"


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
        if self.env.is_main:
            files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
            manifest = {"step": step, "world_size": self.env.world_size, "files": files, "shapes": shapes}
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

    def verify(self, path: Path) -> str | None:
        """None if ``path`` is a complete, undamaged checkpoint; otherwise what is wrong with it."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return "incomplete (no manifest: the save was interrupted)"
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            return f"unreadable manifest {manifest_path}"
        for name, size in manifest["files"].items():
            file = path / name
            if not file.is_file():
                return f"missing file {file}"
            if file.stat().st_size != size:
                return f"file {file} has {file.stat().st_size} bytes, the manifest says {size}"
        return None

    def find_resumable(self) -> Path | None:
        """The newest checkpoint that passes ``verify``; damaged newer ones are reported and skipped."""
        for path in reversed(self._step_dirs()):
            problem = self.verify(path)
            if problem is None:
                return path
            self.log(f"checkpoint {path} is unusable: {problem}; trying the previous one")
        return None

    # ---- loading ------------------------------------------------------------------------------------------
    def load(self, engine, path: Path, shapes: dict[str, list[int]]) -> dict:
        problem = self.verify(path)
        if problem is not None:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        manifest = json.loads((path / MANIFEST).read_text())
        check_shapes(path, manifest["shapes"], shapes)
        if manifest["world_size"] != self.env.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {manifest['world_size']} ranks and this run has "
                f"{self.env.world_size}; ZeRO shards cannot be re-split directly")
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
        rng_file = path / f"rng_rank{self.env.rank}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return client_state


def rank_state(path: Path, rank: int) -> dict:
    """What ``save(rank_state=...)`` stored for ``rank`` in checkpoint ``path`` ({} if nothing)."""
    file = path / f"rank_state{rank}.pt"
    return torch.load(file, weights_only=True) if file.is_file() else {}


def check_shapes(path: Path, saved: dict[str, list[int]], current: dict[str, list[int]]) -> None:
    for name in sorted(saved.keys() | current.keys()):
        if saved.get(name) != current.get(name):
            raise CheckpointError(
                f"checkpoint {path} is from another model shape: parameter '{name}' is "
                f"{saved.get(name, 'absent')} there and {current.get(name, 'absent')} in this run")
