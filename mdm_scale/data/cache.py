"""The data cache: every source is tokenized once, into a token store (``data/store.py``) that later runs,
resumes and every rank memory-map; N ranks of a node then share one copy of it in the page cache.

**Key.** A store's name hashes everything that decides its tokens (:func:`token_options`): the source's
fingerprint (``data/sources.py``: size, modification time and edge hashes of every file), the task, the
tokenizer's fingerprint (``tokenizer.fingerprint``: vocabulary, normaliser, special tokens, chat template; not its
path), ``data.on_bad_record`` (which records a store holds), and for SFT ``data.seq_len``,
``data.response_eos_pad``, ``data.overlong``, ``data.chat_template`` and ``data.chat_turns``; with
``data.eval_fraction`` also the seed and the fraction (which records are held out); and :data:`store.VERSION`,
raised whenever the tokenization changes. Not in it: mixture weights (they change the order, not the tokens)
and, for pretraining, ``data.seq_len`` (blocks are cut when read).

**Location.** ``data.cache_dir``, else ``$MDM_SCALE_DATA_CACHE``, else ``$XDG_CACHE_HOME/mdm-scale/data``
(``~/.cache/mdm-scale/data``): one cache per user, shared by all runs, as Hugging Face's caches are, because
sharing across runs is the point (a multi-seed study tokenizes its data once, not once per run). Stores are
named by key, so runs never collide, and a store is never rewritten; delete the directory to reclaim space.

**Built once, the work split over the ranks.** Which stores are missing is agreed by all ranks. A missing one is
built by every rank together: the source's files are cut into units (whole files, or byte or row ranges of large
ones, in file order) and dealt out to the ranks in contiguous runs of about equal size; each rank reads, checks,
tokenizes and writes its units as shards into a build directory next to the store; the ranks exchange their
reports, so that a bad record stops every rank with the same message (the earliest in the source); then one rank
publishes the store with a single rename, and all memory-map it. The ranks that see each other's marker files in
the build directory share a file system: each such group builds the whole store (a cache on a shared file
system: one copy, built by all ranks; node-local caches: a copy per node).

**Held-out records** (``data.eval_fraction``): record at position p of file f of a source is held out when
``u(seed, p, stream HELDOUT with f in its high bits) < fraction`` (``core/noise.py``), which does not depend on how
many ranks read the source, nor on any other record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mdm_scale.config.schema import DataConfig
from mdm_scale.core.noise import Stream, keyed_uniform
from mdm_scale.data.dataset import RecordEncoder, vocabulary_texts
from mdm_scale.data.records import (
    DataError,
    DataProblem,
    ReadReport,
    RecordError,
    Where,
    checked_records,
    extent,
    reject,
)
from mdm_scale.data.sources import Source
from mdm_scale.data.store import FORMAT, SPLITS, VERSION, ShardWriter, Store, publish, token_dtype
from mdm_scale.data.tokenizer import build_char_tokenizer
from mdm_scale.distributed.env import DistEnv, all_gather_objects, barrier

CACHE_ENV = "MDM_SCALE_DATA_CACHE"
_ENCODE_BATCH = 512  # records tokenized per call


@dataclass(frozen=True)
class Ranks:
    """The processes that build the data together: this one's rank, how many, and two collectives (``gather``:
    every rank's object, in rank order, on every rank; ``barrier``). The default is one process."""

    rank: int = 0
    world: int = 1
    gather: Callable[[Any], list] = field(default=lambda obj: [obj])
    barrier: Callable[[], None] = field(default=lambda: None)

    @classmethod
    def of(cls, env: DistEnv) -> Ranks:
        """Every rank of a training or tool process group (``distributed/env.py``)."""
        return cls(env.rank, env.world_size, all_gather_objects, barrier)


ONE_PROCESS = Ranks()


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mdm-scale" / "data"


def token_options(cfg: DataConfig, task: str, tokenizer_key: str, seed: int, heldout: float) -> dict:
    """Everything besides the source that decides a store's tokens (see the module's docstring);
    ``tokenizer_key``: ``tokenizer.fingerprint`` of the tokenizer (computed once per run: it hashes the whole
    tokenizer)."""
    options = {"version": VERSION, "task": task, "tokenizer": tokenizer_key,
               "data.on_bad_record": cfg.on_bad_record}
    if task == "sft":
        options.update({f"data.{k}": getattr(cfg, k) for k in ("seq_len", "response_eos_pad", "overlong",
                                                                "chat_template", "chat_turns")})
    if heldout:
        options.update({"seed": seed, "data.eval_fraction": heldout})
    return options


def store_name(source: Source, options: dict) -> str:
    key = hashlib.sha256(json.dumps({"source": source.fingerprint, "options": options}, sort_keys=True).encode())
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', Path(source.path).name)[:40]}-{key.hexdigest()[:20]}"


def cached_store(source: Source, task: str, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, seed: int,
                 heldout: float, options: dict, ranks: Ranks, root: Path) -> tuple[Store, str]:
    """The source's store in the cache (its name from ``options``, ``token_options``), built first if any rank
    lacks it; and a line saying which happened."""
    target = root / store_name(source, options)
    if not any(ranks.gather(not (target / "index.json").is_file())):
        return Store(target), f"{source.name}: cached {target}"
    start = time.perf_counter()
    build_store(source, task, tokenizer, cfg, seed, heldout, options, ranks, target)
    return Store(target), f"{source.name}: tokenized into {target} in {time.perf_counter() - start:.1f} s"


def pretokenized(source: Source, wanted: dict) -> Store:
    """A source that is a token store, checked against the run's ``token_options``: same task, tokenizer and
    token options."""
    store = Store(source.store)
    theirs = store.index.get("options", {})
    for key in sorted(set(wanted) | set(theirs)):
        if wanted.get(key) != theirs.get(key):
            raise DataError(f"{source.name}: the token store was made with {key} = {theirs.get(key)!r}, this run "
                            f"has {wanted.get(key)!r}; tokenize it again with this run's settings "
                            f"(mdm-scale data tokenize)")
    return store


@dataclass(frozen=True)
class Unit:
    """A part of a source: ``[start, stop)`` of file ``file`` (bytes of JSONL, rows otherwise)."""

    index: int
    source: int
    file: int
    start: int
    stop: int
    cost: float  # bytes, to balance the ranks' shares


def plan_units(source: Source, workers: int, source_index: int = 0) -> list[Unit]:
    """Whole files, large ones cut into about ``workers x`` their share of the bytes, in file order."""
    sizes = [path.stat().st_size for path in source.files]
    total, units = sum(sizes) or 1, []
    for f, (path, fmt, size) in enumerate(zip(source.files, source.formats, sizes)):
        n = extent(path, fmt)
        pieces = max(1, min(n, round(workers * size / total)))
        for j in range(pieces):
            units.append(Unit(len(units), source_index, f, n * j // pieces, n * (j + 1) // pieces, size / pieces))
    return units


def deal(units: list[Unit], workers: int) -> list[list[Unit]]:
    """Contiguous runs of units of about equal cost, one per worker."""
    total, done = sum(u.cost for u in units) or 1.0, 0.0
    shares: list[list[Unit]] = [[] for _ in range(workers)]
    for unit in units:
        shares[min(workers - 1, int((done + unit.cost / 2) / total * workers))].append(unit)
        done += unit.cost
    return shares


def held_out(seed: int, file: int, positions: list[int], fraction: float) -> np.ndarray:
    if not fraction:
        return np.zeros(len(positions), dtype=bool)
    u = keyed_uniform(seed, torch.tensor(positions, dtype=torch.int64), int(Stream.HELDOUT) | (file << 8))
    return (u < fraction).numpy()


def build_store(source: Source, task: str, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, seed: int,
                heldout: float, options: dict, ranks: Ranks, target: Path) -> None:
    """Tokenize ``source`` into a store at ``target``, the work split over ``ranks`` (every rank calls this);
    ``options``: ``token_options`` of these arguments, recorded in the store's index."""
    probe = target.parent / f".{target.name}.build-{ranks.gather(secrets.token_hex(8))[0]}"
    group = _file_system_group(probe, ranks)
    build = probe / f"group-{group[0]}"
    build.mkdir(exist_ok=True)
    mine = deal(plan_units(source, len(group)), len(group))[group.index(ranks.rank)]
    splits = SPLITS if heldout else SPLITS[:1]
    report = _write_units(source, mine, task, tokenizer, cfg, seed, heldout, build, splits)
    reports = ranks.gather(report)
    leader = ranks.rank == group[0]
    ours = [reports[r] for r in group]
    failure = _first_failure(reports)
    if failure is None and not sum(s["examples"] for r in ours for s in r["shards"]["main"]):
        skipped = sum((Counter(r["counts"]) for r in ours), Counter())
        failure = (0, f"{source.name}: no usable records ({dict(skipped) or 'the source is empty'})")
    if failure is not None:
        ranks.barrier()
        if leader:
            shutil.rmtree(probe, ignore_errors=True)
        raise (DataError if failure[0] == 0 else RuntimeError)(failure[1])
    if leader:
        if cfg.tokenizer == "char":
            tokenizer.save_pretrained(str(build / "tokenizer"))
        index = {"format": FORMAT, "version": VERSION, "task": task, "dtype": token_dtype(len(tokenizer)),
                 "tokenizer": options["tokenizer"], "options": options, "key": store_name(source, options),
                 "source": [str(p) for p in source.files],
                 "counts": dict(sum((Counter(r["counts"]) for r in ours), Counter()))}
        shards = {split: sorted((s for r in ours for s in r["shards"][split]), key=lambda s: s["unit"])
                  for split in splits}
        publish(build, target, index, shards)
    ranks.barrier()
    if leader:
        shutil.rmtree(probe, ignore_errors=True)


def _file_system_group(probe: Path, ranks: Ranks, attempts: int = 5) -> list[int]:
    """The ranks that see this rank's marker file in ``probe`` (which every rank creates): those sharing its file
    system. Views that do not form groups (a network file system slow to show other clients' files) are looked
    at again a second later; if they never do, every rank builds alone."""
    try:
        probe.mkdir(parents=True, exist_ok=True)
        (probe / f".rank-{ranks.rank}").touch()
    except OSError as err:
        raise DataError(f"cannot write a token store in {probe.parent} ({err}); choose a writable data.cache_dir "
                        f"(or ${CACHE_ENV}), or --out") from None
    for _ in range(attempts):
        ranks.barrier()
        views = ranks.gather(sorted(int(p.name.split("-")[1]) for p in probe.glob(".rank-*")))
        if all(views[member] == view for view in views for member in view):
            return views[ranks.rank]
        time.sleep(1)
    return [ranks.rank]


def _write_units(source: Source, units: list[Unit], task: str, tokenizer: PreTrainedTokenizerBase,
                 cfg: DataConfig, seed: int, heldout: float, build: Path, splits: tuple[str, ...]) -> dict:
    """Read, check, tokenize and write this rank's units, one shard per unit and split. The report holds the
    shards, the counts, and the first failure: (sort key, kind, message)."""
    encoder, report = RecordEncoder(tokenizer, cfg, task), ReadReport()
    dtype, shards = token_dtype(len(tokenizer)), {split: [] for split in splits}
    for unit in units:
        path, fmt = source.files[unit.file], source.formats[unit.file]
        writers = {split: ShardWriter(build, f"{split}-{unit.index:05d}", dtype, task == "sft") for split in splits}
        try:
            records = checked_records(path, fmt, task, cfg.on_bad_record, report, unit.start, unit.stop)
            for batch in _batches(records):
                positions = [position for position, _ in batch]
                results = encoder.encode([record for _, record in batch])
                for position, hold, result in zip(positions, held_out(seed, unit.file, positions, heldout), results):
                    if isinstance(result, DataProblem):
                        reject(report, Where(path, fmt, position), result, cfg.on_bad_record)
                        continue
                    for sequence in result:
                        writers[SPLITS[1] if hold else SPLITS[0]].add(sequence.ids, sequence.scored)
        except Exception as err:  # reported to every rank, which all raise the earliest failure
            return {"failure": _failure(err, unit)}
        for split, writer in writers.items():
            shards[split].append({**writer.close(), "unit": unit.index})
    return {"failure": None, "shards": shards, "counts": dict(report.skipped + encoder.counts)}


def _batches(records: Iterator[tuple[int, dict]]) -> Iterator[list[tuple[int, dict]]]:
    batch = []
    for item in records:
        batch.append(item)
        if len(batch) == _ENCODE_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _failure(err: Exception, unit: Unit) -> tuple:
    """(where in the sources, 0 for a data error or 1 for anything else, message)."""
    if isinstance(err, RecordError):
        return (unit.source, unit.file, err.where.position), 0, str(err)
    if isinstance(err, DataError):
        return (unit.source, unit.file, unit.start), 0, str(err)
    return (unit.source, unit.file, unit.start), 1, f"building the data failed: {type(err).__name__}: {err}"


def _first_failure(reports: list[dict]) -> tuple[int, str] | None:
    """The earliest failure in the sources among every rank's report: (kind, message), or None."""
    failures = [r["failure"] for r in reports if r["failure"] is not None]
    return min(failures)[1:] if failures else None


def char_tokenizer(sources: list[Source], task: str, cfg: DataConfig, ranks: Ranks, root: Path | None
                   ) -> PreTrainedTokenizerBase:
    """The character tokenizer of ``sources``' records (``tokenizer.build_char_tokenizer``): from the cache
    (``root``, keyed by the sources' fingerprints), or from one pass over the records split over the ranks."""
    key = hashlib.sha256(json.dumps(["char", task, VERSION, [s.fingerprint for s in sources]]).encode())
    target = None if root is None else root / f"char-tokenizer-{key.hexdigest()[:20]}"
    if target is not None and all(ranks.gather((target / "tokenizer.json").is_file())):
        return AutoTokenizer.from_pretrained(str(target))
    units = [u for s, source in enumerate(sources) for u in plan_units(source, ranks.world, s)]
    chars: set[str] = set()
    failure = None
    for unit in deal(units, ranks.world)[ranks.rank]:
        source = sources[unit.source]
        path, fmt = source.files[unit.file], source.formats[unit.file]
        try:
            for _, record in checked_records(path, fmt, task, cfg.on_bad_record, ReadReport(), unit.start,
                                             unit.stop):
                for text in vocabulary_texts(record, task):
                    chars.update(text)
        except Exception as err:  # as in build_store: every rank raises the earliest
            failure = _failure(err, unit)
            break
    reports = ranks.gather({"failure": failure, "chars": "".join(sorted(chars))})
    failure = _first_failure(reports)
    if failure is not None:
        raise (DataError if failure[0] == 0 else RuntimeError)(failure[1])
    tokenizer = build_char_tokenizer(["".join(sorted(set("".join(r["chars"] for r in reports))))])
    if target is not None:  # every rank, so that node-local caches get it too; the first rename wins
        partial = target.parent / f".{target.name}.{secrets.token_hex(8)}"
        try:
            tokenizer.save_pretrained(str(partial))
            os.rename(partial, target)
        except OSError:  # saved meanwhile by another rank or run; or not writable, which building the store reports
            shutil.rmtree(partial, ignore_errors=True)
    return tokenizer
