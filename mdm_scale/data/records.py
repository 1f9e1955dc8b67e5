"""Read records from local files, checking each one and naming file and line.

Record kinds:
- SFT: ``{"prompt": str, "response": str}``; the response must not be blank.
- chat (SFT): ``{"messages": [{"role": str, "content": str}, ...]}``; roles ``system``, ``user``, ``assistant``
  and ``tool``, every content a string, at least one assistant turn and none blank (``data/chat.py`` renders them).
- pretraining: ``{"text": str}``; the text must not be blank.

File formats: JSONL (parsed line by line, so the line number is exact), parquet, and Arrow (the IPC stream that
``datasets.save_to_disk`` writes, or an IPC file), the last two read in batches with pyarrow (row numbers). A file
is read whole or in a *range*: of bytes for JSONL (the records whose line starts inside it), of rows otherwise, so
that several ranks can each read a part of one file (``data/cache.py``). A record's *position* is the byte offset
of its line (JSONL) or its row (0-based): known without reading what precedes it, and stable while the file is.

A bad record raises :class:`DataError` ``"<file>:<line>: <problem>"`` or, with ``on_bad="skip"``, is counted
under its problem in a :class:`ReadReport`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SFT_FIELDS = ("prompt", "response")
PRETRAIN_FIELDS = ("text",)
ROLES = ("system", "user", "assistant", "tool")
_BATCH_ROWS = 1024  # rows per pyarrow batch


class DataError(ValueError):
    """A data problem, naming the file and line (or row), or the source."""


class RecordError(DataError):
    """A bad record; ``where`` is its place."""

    def __init__(self, where: Where, message: str):
        super().__init__(message)
        self.where = where


class DataProblem(str):
    """A short name of what is wrong with a record, e.g. ``"not valid JSON (...)"``."""


@dataclass
class ReadReport:
    """Records kept, and the skipped ones counted by problem (``data.on_bad_record: skip``)."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class Where:
    """A record's place, printed as ``file:line`` (JSONL) or ``file:row N``; the line is counted only when printed."""

    path: Path
    fmt: str
    position: int

    def __str__(self) -> str:
        if self.fmt != "jsonl":
            return f"{self.path}:row {self.position + 1}"
        newlines, done = 0, 0
        with self.path.open("rb") as f:
            while done < self.position:
                chunk = f.read(min(1 << 24, self.position - done))
                if not chunk:
                    break
                newlines += chunk.count(b"\n")
                done += len(chunk)
        return f"{self.path}:{newlines + 1}"


def detect_format(path: Path, fmt: str) -> str:
    """``data.format``, or by file name: ``.parquet``, ``.arrow``, anything else JSONL."""
    if fmt != "auto":
        return fmt
    return {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix, "jsonl")


def record_task(record) -> str | None:
    """``sft`` for a prompt/response or chat record, ``pretrain`` for a text record, else None."""
    if not isinstance(record, dict):
        return None
    if record.get("messages") is not None or all(k in record for k in SFT_FIELDS):
        return "sft"
    return "pretrain" if "text" in record else None


def first_record(path: Path, fmt: str) -> tuple[Where, object] | None:
    """The file's first record (or the problem of its first line), with its place; None for an empty file."""
    for position, record in raw_records(path, fmt):
        return Where(path, fmt, position), record
    return None


def check_record(record, task: str) -> DataProblem | None:
    """What is wrong with a record of ``task`` (``sft``: prompt/response or chat; ``pretrain``), or None."""
    if not isinstance(record, dict):
        return DataProblem(f"expected a JSON object, got {type(record).__name__}")
    if task == "sft" and record.get("messages") is not None:
        return check_messages(record["messages"])
    fields = SFT_FIELDS if task == "sft" else PRETRAIN_FIELDS
    for name in fields:
        if name not in record:
            hint = " or 'messages'" if task == "sft" else ""
            return DataProblem(f"missing field '{name}'{hint} (record has {sorted(record)})")
        if not isinstance(record[name], str):
            return DataProblem(f"field '{name}' must be a string, got {type(record[name]).__name__}")
    main = "response" if task == "sft" else "text"
    if not record[main].strip():
        return DataProblem(f"empty {main}")
    return None


def check_messages(messages, need_answer: bool = True) -> DataProblem | None:
    """A chat record's ``messages``: a non-empty list of {role, content}, known roles, string contents, no blank
    assistant turn, and (``need_answer``) at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        return DataProblem(f"field 'messages' must be a non-empty list (got {messages!r:.40})")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return DataProblem(f"message not an object (message {number}: {type(message).__name__})")
        role = message.get("role")
        if role not in ROLES:
            return DataProblem(f"unknown role (message {number}: {role!r}; roles are {', '.join(ROLES)})")
        content = message.get("content")
        if not isinstance(content, str):
            return DataProblem(f"content not a string (message {number}, {role}: {type(content).__name__})")
        if role == "assistant" and not content.strip():
            return DataProblem(f"empty assistant turn (message {number})")
    if need_answer and not any(message["role"] == "assistant" for message in messages):
        return DataProblem("no assistant turn (nothing to score)")
    return None


def reject(report: ReadReport, where: Where, problem: str, on_bad: str) -> None:
    """Raise for ``on_bad='error'``; otherwise count the problem (its kind, before any detail in brackets)."""
    if on_bad == "error":
        raise RecordError(where, f"{where}: {problem} (set data.on_bad_record=skip to skip such records)")
    report.skipped[problem.split(" (")[0]] += 1


def checked_records(path: Path, fmt: str, task: str, on_bad: str, report: ReadReport, start: int = 0,
                    stop: int | None = None) -> Iterator[tuple[int, dict]]:
    """(position, record) of every valid record in the range; bad ones raise or are counted in ``report``."""
    for position, record in raw_records(path, fmt, start, stop):
        problem = record if isinstance(record, DataProblem) else check_record(record, task)
        if problem is not None:
            reject(report, Where(path, fmt, position), problem, on_bad)
            continue
        report.kept += 1
        yield position, record


def extent(path: Path, fmt: str) -> int:
    """What a range of ``path`` counts: its bytes (JSONL) or rows."""
    if fmt == "jsonl":
        return path.stat().st_size
    if fmt == "parquet":
        return _parquet(path).metadata.num_rows
    return sum(len(batch) for _, batch in _arrow_batches(path))


def raw_records(path: Path, fmt: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, object]]:
    """Yield (position, record or DataProblem) for the records in ``[start, stop)`` of the file."""
    if fmt == "jsonl":
        yield from _jsonl_records(path, start, stop)
        return
    batches = _parquet_batches(path, start) if fmt == "parquet" else _arrow_batches(path)
    for first, batch in batches:
        last = first + len(batch)
        lo, hi = max(start, first), last if stop is None else min(stop, last)
        if lo < hi:
            yield from zip(range(lo, hi), batch.slice(lo - first, hi - lo).to_pylist())
        if stop is not None and last >= stop:
            return


def _jsonl_records(path: Path, start: int, stop: int | None) -> Iterator[tuple[int, object]]:
    with path.open("rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of a line that starts before ``start`` belongs to the range before
        position = f.tell()
        while stop is None or position < stop:
            raw = f.readline()
            if not raw:
                return
            if raw.strip():
                try:
                    yield position, json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    yield position, DataProblem(f"not valid JSON ({err})")
            position += len(raw)


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises many types for a broken file
        raise DataError(f"{path}: cannot read parquet ({err})") from None


def _parquet_batches(path: Path, start: int):
    """(first row, batch) of the row groups from the one holding row ``start`` on."""
    parquet = _parquet(path)
    first = 0
    for group in range(parquet.metadata.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if first + rows > start:
            for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, row_groups=[group]):
                yield first, batch
                first += len(batch)
        else:
            first += rows


def _arrow_batches(path: Path):
    """(first row, batch) of every record batch, memory-mapped."""
    import pyarrow as pa

    first = 0
    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        for batch in batches:
            yield first, batch
            first += len(batch)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot read Arrow ({err})") from None
