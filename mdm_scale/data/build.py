"""Everything the training loop needs from the data section: tokenizer, tokenized train and eval sets.

Order of checks: sources exist and name files, the task is clear (every source holds records of one task), then
the tokenizer, then each source from the data cache (``data/cache.py``), tokenized first if it is not there:
every record valid (file and line on error), lengths checked. Nothing here touches a model, so a data problem
fails in seconds. Every rank calls :func:`build_data` with the same ``ranks``; tokenizing is split over them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mdm_scale.config.schema import ConfigError, DataConfig, SourceConfig
from mdm_scale.data.cache import (
    ONE_PROCESS,
    Ranks,
    build_store,
    cache_root,
    cached_store,
    char_tokenizer,
    pretokenized,
    token_options,
)
from mdm_scale.data.examples import Concatenation, Examples, TokenBlocks, TokenizedData
from mdm_scale.data.records import DataError, first_record, record_task
from mdm_scale.data.sources import Source, resolve_source, resolve_sources
from mdm_scale.data.store import Store
from mdm_scale.data.stream import MixtureStream, largest_remainder
from mdm_scale.data.tokenizer import fingerprint, load_tokenizer


@dataclass
class RunData:
    task: str
    tokenizer: PreTrainedTokenizerBase
    train: Examples
    eval: Examples | None
    notes: list[str] = field(default_factory=list)
    """Where each source came from: the cache, or tokenized now."""

    def summary(self) -> str:
        parts = [f"task={self.task}", f"vocab={len(self.tokenizer)}",
                 f"train={len(self.train)} sequences / {self.train.num_tokens} tokens"]
        if self.eval is not None:
            parts.append(f"eval={len(self.eval)} sequences")
        for name, data in (("train", self.train), ("eval", self.eval)):
            if data is not None and data.counts:
                parts.append(f"{name} " + ", ".join(f"{k}: {v}" for k, v in sorted(data.counts.items())))
        return "; ".join(parts + self.notes)


def build_data(cfg: DataConfig, seed: int, tokenizer_dir: Path, ranks: Ranks = ONE_PROCESS) -> RunData:
    """``tokenizer_dir``: a run's saved tokenizer, which wins for ``data.tokenizer: char`` (a resume)."""
    train_sources = resolve_sources(cfg.train_sources(), cfg.format)
    eval_sources = resolve_sources(cfg.eval_sources(), cfg.format)
    sources = train_sources + eval_sources
    task = detect_task(sources, cfg.task)
    _check_weights(train_sources)
    root = cache_root(cfg)
    tokenizer = _tokenizer(cfg, tokenizer_dir, sources, task, ranks, root)
    if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"config key 'data.chat_template' = True: the tokenizer ({cfg.tokenizer}) has no chat "
                          f"template")
    heldout = cfg.eval_fraction if not eval_sources else 0.0
    notes: list[str] = []
    tokenizer_key = fingerprint(tokenizer)

    def store(source: Source, fraction: float) -> Store:
        options = token_options(cfg, task, tokenizer_key, seed, fraction)
        if source.store is not None:
            notes.append(f"{source.name}: token store")
            return pretokenized(source, options)
        found, note = cached_store(source, task, tokenizer, cfg, seed, fraction, options, ranks, root)
        notes.append(note)
        return found

    train_stores = [store(s, heldout) for s in train_sources]
    weights = [s.weight for s in train_sources] if train_sources[0].weight is not None else None
    train = _combine([s.split("main", cfg.seq_len) for s in train_stores], weights)
    evaluation = None
    if eval_sources:
        evaluation = _combine([store(s, 0.0).split("main", cfg.seq_len) for s in eval_sources])
    elif heldout:
        evaluation = _combine([s.split("heldout", cfg.seq_len) for s in train_stores])
        if len(evaluation) == 0:
            raise DataError(f"data.eval_fraction = {heldout} held out no complete sequence of the training sources; "
                            f"raise it or set data.eval_file")
    return RunData(task, tokenizer, train, evaluation, notes)


def tokenize_source(cfg: DataConfig, seed: int, path: str, out: Path, ranks: Ranks = ONE_PROCESS) -> dict:
    """``mdm-scale data tokenize``: one source (a file, glob or directory) into a token store at ``out``, with
    ``cfg``'s tokenizer and options (and its held-out split with ``data.eval_fraction``)."""
    if out.exists():
        raise FileExistsError(f"--out {out} exists; a token store is written to a new directory")
    source = resolve_source("--input", SourceConfig(path), cfg.format)
    if source.store is not None:
        raise DataError(f"--input {path} is already a token store")
    task = detect_task([source], cfg.task)
    tokenizer = char_tokenizer([source], task, cfg, ranks, None) if cfg.tokenizer == "char" else \
        load_tokenizer(cfg.tokenizer)
    start = time.perf_counter()
    options = token_options(cfg, task, fingerprint(tokenizer), seed, cfg.eval_fraction)
    build_store(source, task, tokenizer, cfg, seed, cfg.eval_fraction, options, ranks, out)
    store = Store(out)
    return {"store": str(out), "task": task, "seconds": round(time.perf_counter() - start, 1),
            **{split: {k: store.index["splits"][split][k] for k in ("examples", "tokens")}
               for split in store.index["splits"]}}


def detect_task(sources: list[Source], task: str) -> str:
    """``data.task``, or the task of the sources' first records, which must agree."""
    if task != "auto":
        return task
    found: list[tuple[str, str]] = []
    for source in sources:
        if source.store is not None:
            found.append((Store(source.store).task, source.name))
            continue
        first = next((f for f in map(first_record, source.files, source.formats) if f is not None), None)
        if first is None:
            continue  # an empty source fails later, naming itself
        where, record = first
        kind = record_task(record)
        if kind is None:
            raise DataError(f"{where}: cannot tell the task from the first record; it needs 'prompt' and "
                            f"'response' or 'messages' (SFT) or 'text' (pretraining), or set data.task")
        found.append((kind, source.name))
    if not found:
        raise DataError(f"{sources[0].name}: holds no records")
    for kind, name in found[1:]:
        if kind != found[0][0]:
            raise DataError(f"{name} holds {kind} records but {found[0][1]} holds {found[0][0]} records; a run "
                            f"trains one task")
    return found[0][0]


def _check_weights(sources: list[Source]) -> None:
    if sources[0].weight is None:
        return
    quotas = largest_remainder([s.weight for s in sources], MixtureStream.WINDOW)
    for source, quota in zip(sources, quotas):
        if quota == 0:
            raise ConfigError(f"config key '{source.key}.weight' = {source.weight}: too small to draw one example "
                              f"per window of {MixtureStream.WINDOW} (data/stream.py)")


def _tokenizer(cfg: DataConfig, saved_dir: Path, sources: list[Source], task: str, ranks: Ranks, root: Path
               ) -> PreTrainedTokenizerBase:
    """The tokenizer directory; for ``char``: the run's saved one, a token store's, or one built from the
    records (cached)."""
    if cfg.tokenizer != "char" or (saved_dir / "tokenizer.json").is_file():
        return load_tokenizer(cfg.tokenizer, saved_dir)
    stored = [s.store / "tokenizer" for s in sources if s.store is not None and (s.store / "tokenizer").is_dir()]
    if stored:
        return AutoTokenizer.from_pretrained(str(stored[0]))
    return char_tokenizer([s for s in sources if s.store is None], task, cfg, ranks, root)


def _combine(parts: list[TokenizedData | TokenBlocks], weights: list[float] | None = None) -> Examples:
    return parts[0] if len(parts) == 1 else Concatenation(parts, weights)
