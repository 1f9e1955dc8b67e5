"""Token stores: one tokenized source on disk, memory-mapped by every rank. The data cache (``data/cache.py``)
and ``mdm-scale data tokenize`` write them; a training source may name one directly.

A store is a directory::

    index.json             what the store holds (below); written last, so a store with it is complete
    main-00003.tokens      token ids of shard 3 of the split ``main``, raw little-endian uint16 or uint32
    main-00003.scored      SFT: one byte per token, 1 where the token is scored (masked and predicted)
    main-00003.lengths     SFT: uint32 tokens per example
    main.offsets.npy       SFT: int64 first token of every example of the split, then the total
    heldout-*              the same for the split held out by ``data.eval_fraction``
    tokenizer/             the character tokenizer (``data.tokenizer: char``) the ids belong to

A split's token stream is its shards' tokens in shard order, which is the records' order in the source, however
many ranks wrote the shards. SFT examples are delimited by the offsets; a pretraining stream is cut into blocks
of ``data.seq_len`` when it is read (``examples.TokenBlocks``), so one pretraining store serves any sequence
length.

``index.json``: ``{"format": "mdm-scale-tokens", "version", "task", "dtype", "tokenizer" (fingerprint),
"options" (everything that decided the tokens, ``cache.token_options``), "source", "counts" (records skipped,
truncated, dropped), "splits": {name: {"shards": [...], "examples", "tokens"}}}``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from mdm_scale.data.examples import TokenArray, TokenBlocks, TokenizedData
from mdm_scale.data.records import DataError

FORMAT, VERSION = "mdm-scale-tokens", 1
SPLITS = ("main", "heldout")
_FLUSH_TOKENS = 1 << 20


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class ShardWriter:
    """Appends one shard's examples to its files (SFT: tokens, scored flags, lengths; pretraining: tokens)."""

    def __init__(self, directory: Path, name: str, dtype: str, sft: bool):
        self.directory, self.name, self.dtype, self.sft = directory, name, dtype, sft
        self.examples = self.tokens = 0
        self._ids: list[np.ndarray] = []
        self._scored: list[np.ndarray] = []
        self._lengths: list[int] = []
        self._buffered = 0
        for suffix in self._suffixes():
            (directory / f"{name}.{suffix}").write_bytes(b"")

    def _suffixes(self) -> tuple[str, ...]:
        return ("tokens", "scored", "lengths") if self.sft else ("tokens",)

    def add(self, ids, scored: np.ndarray | None = None) -> None:
        self._ids.append(np.asarray(ids, dtype=self.dtype))
        if self.sft:
            self._scored.append(np.asarray(scored, dtype=np.uint8))
            self._lengths.append(len(ids))
        self.examples += 1
        self.tokens += len(ids)
        self._buffered += len(ids)
        if self._buffered >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        parts = {"tokens": self._ids, "scored": self._scored,
                 "lengths": [np.asarray(self._lengths, dtype=np.uint32)]}
        for suffix in self._suffixes():
            if parts[suffix]:
                with (self.directory / f"{self.name}.{suffix}").open("ab") as f:
                    np.concatenate(parts[suffix]).tofile(f)
        self._ids, self._scored, self._lengths, self._buffered = [], [], [], 0

    def close(self) -> dict:
        self.flush()
        return {"name": self.name, "examples": self.examples, "tokens": self.tokens}


def publish(build: Path, target: Path, index: dict, shards: dict[str, list[dict]]) -> None:
    """Finish the store being built in ``build`` (every shard closed) and move it to ``target`` in one rename.
    Empty shards are removed; SFT splits get their offsets. If ``target`` appeared meanwhile (another job built
    the same store), it is kept and ``build`` removed."""
    sft = index["task"] == "sft"
    index["splits"] = {}
    for split, written in shards.items():
        kept = [s for s in written if s["tokens"]]
        for shard in written:
            if not shard["tokens"]:
                for path in build.glob(f"{shard['name']}.*"):
                    path.unlink()
        if sft:
            lengths = [np.fromfile(build / f"{s['name']}.lengths", dtype=np.uint32) for s in kept]
            offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths or [np.zeros(0)]), dtype=np.int64)])
            np.save(build / f"{split}.offsets.npy", offsets)
        index["splits"][split] = {"shards": [s["name"] for s in kept], "examples": sum(s["examples"] for s in kept),
                                  "tokens": sum(s["tokens"] for s in kept)}
    (build / "index.json.tmp").write_text(json.dumps(index, indent=1, sort_keys=True))
    os.replace(build / "index.json.tmp", build / "index.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(build, target)
    except OSError:
        if not (target / "index.json").is_file():
            raise
        shutil.rmtree(build, ignore_errors=True)


def is_store(path: Path) -> bool:
    return (path / "index.json").is_file() and _read_index(path).get("format") == FORMAT


def _read_index(path: Path) -> dict:
    try:
        return json.loads((path / "index.json").read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}/index.json: cannot read ({err})") from None


class Store:
    """A complete token store, opened read-only; ``split`` memory-maps one of its splits."""

    def __init__(self, path: Path):
        self.path, self.index = Path(path), _read_index(Path(path))
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise DataError(f"{path}: not a token store of this mdm-scale version (format "
                            f"{self.index.get('format')!r}, version {self.index.get('version')!r}; expected "
                            f"{FORMAT!r}, {VERSION}); write it again with mdm-scale data tokenize")
        self.identity = self.index["key"]  # the content's name: the same wherever a copy of the store lies
        self.task: str = self.index["task"]
        self.counts = Counter(self.index.get("counts", {}))

    def split(self, split: str, seq_len: int) -> TokenizedData | TokenBlocks:
        shards = self.index["splits"][split]["shards"]

        def mapped(suffix: str, dtype: str) -> TokenArray:
            return TokenArray([np.memmap(self.path / f"{name}.{suffix}", dtype=dtype, mode="r") for name in shards])

        tokens, identity = mapped("tokens", self.index["dtype"]), f"{self.identity}/{split}"
        counts = self.counts if split == "main" else Counter()
        if self.task == "pretrain":
            return TokenBlocks(tokens, seq_len, counts, identity)
        offsets = np.load(self.path / f"{split}.offsets.npy", mmap_mode="r")
        return TokenizedData(tokens, offsets, mapped("scored", "uint8"), counts, identity)
