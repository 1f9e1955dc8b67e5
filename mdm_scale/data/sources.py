"""Sources: what an item of ``data.train_files`` / ``data.eval_files`` (or ``data.train_file``) names, resolved to
files, and the fingerprint that keys its tokenized copy in the data cache.

A source's ``path`` is
- a file: JSONL, parquet or Arrow (``records.detect_format``);
- a glob (``*``, ``?`` or ``[``): the matching files, sorted;
- a token store (``data/store.py``, written by ``mdm-scale data tokenize``): already tokenized;
- a ``datasets.save_to_disk`` directory (``state.json``): its Arrow files; a saved ``DatasetDict``
  (``dataset_dict.json``) holds several splits, and the path must name one of them;
- any other directory: the JSONL, parquet and Arrow files below it, sorted.

**Fingerprint.** Per file: its size, modification time (ns) and a SHA-256 of its first and last MiB; not its
path, so a moved (``mv``) file keeps its cache. This costs milliseconds whatever the size, where hashing every
byte would cost minutes at every start for a corpus of hundreds of GB. Writing a file changes its
modification time, and a copy gets a new one (``cp -p`` excepted: then the content is the same); the head and
tail hashes also catch a rewrite that kept size and time (``touch -r``) unless it changed only the middle.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mdm_scale.config.schema import SourceConfig
from mdm_scale.data.records import DataError, detect_format
from mdm_scale.data.store import is_store
from mdm_scale.data.synthetic import how_to_make

_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
_EDGE = 1 << 20  # bytes hashed at each end of a file


@dataclass(frozen=True)
class Source:
    key: str
    """The config key that names it, e.g. ``data.train_files[1]``."""
    path: str
    weight: float | None
    files: tuple[Path, ...] = ()
    formats: tuple[str, ...] = ()
    store: Path | None = None
    """A token store: the source is already tokenized."""

    @property
    def name(self) -> str:
        return f"{self.key} ({self.path})"

    @cached_property
    def fingerprint(self) -> str:
        """The files' formats, sizes, times and edge bytes, hashed once per resolved source (cache keys)."""
        h = hashlib.sha256()
        for path, fmt in zip(self.files, self.formats):
            h.update(json.dumps([fmt, *_file_fingerprint(path)]).encode())
        return h.hexdigest()


def resolve_sources(sources: list[tuple[str, SourceConfig]], fmt: str) -> list[Source]:
    return [resolve_source(key, spec, fmt) for key, spec in sources]


def resolve_source(key: str, spec: SourceConfig, fmt: str) -> Source:
    path = Path(spec.path)
    if any(c in spec.path for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(spec.path, recursive=True)) if Path(p).is_file()]
        if not files:
            raise FileNotFoundError(f"config key '{key}': no file matches {spec.path}")
    elif path.is_file():
        files = [path]
    elif path.is_dir():
        if is_store(path):
            return Source(key, spec.path, spec.weight, store=path)
        files = _directory_files(key, path)
    else:
        raise FileNotFoundError(f"config key '{key}': file not found: {spec.path}{how_to_make(path)}")
    formats = tuple(detect_format(f, fmt) for f in files)
    return Source(key, spec.path, spec.weight, tuple(files), formats)


def _directory_files(key: str, path: Path) -> list[Path]:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"config key '{key}': {path} holds the splits {', '.join(splits)} of a saved DatasetDict; "
                        f"name one of them, e.g. {path / (splits[0] if splits else 'train')}")
    if (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text())
        files = [path / entry["filename"] for entry in state.get("_data_files", [])]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIXES)
    if not files:
        raise DataError(f"config key '{key}': {path} holds no JSONL, parquet or Arrow file")
    return files


def _file_fingerprint(path: Path) -> list:
    stat = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(_EDGE))
        if stat.st_size > _EDGE:
            f.seek(max(_EDGE, stat.st_size - _EDGE))
            h.update(f.read(_EDGE))
    return [stat.st_size, stat.st_mtime_ns, h.hexdigest()]
