"""Read training records from local JSONL or parquet files, checking each one and naming file and line.

Two record kinds:
- SFT: ``{"prompt": str, "response": str}``; the response must not be empty.
- pretraining: ``{"text": str}``; the text must not be empty.

A bad record raises :class:`DataError` ``"<file>:<line>: <problem>"`` or, with ``on_bad="skip"``, is counted
under its problem in the returned :class:`ReadReport`. JSONL is parsed line by line so that the line number
is exact; parquet goes through ``datasets`` and reports the row number. The records come back as a
``datasets.Dataset`` with a ``line`` column, so later checks (tokenized length) can still name the line.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets

SFT_FIELDS = ("prompt", "response")
PRETRAIN_FIELDS = ("text",)


class DataError(ValueError):
    """A data problem, naming the file and line (or row)."""


@dataclass
class ReadReport:
    path: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "parquet" if path.suffix == ".parquet" else "jsonl"


def detect_task(path: Path, fmt: str, task: str) -> str:
    """``sft`` if the first record has prompt/response, ``pretrain`` if it has text."""
    if task != "auto":
        return task
    first = next(iter(_raw_records(path, fmt)), None)
    if first is None:
        raise DataError(f"{path}: the file holds no records")
    where, record = first
    if isinstance(record, dict) and all(k in record for k in SFT_FIELDS):
        return "sft"
    if isinstance(record, dict) and "text" in record:
        return "pretrain"
    raise DataError(f"{path}:{where}: cannot tell the task from the first record; it needs either "
                    f"'prompt' and 'response' (SFT) or 'text' (pretraining), or set data.task")


def read_records(path: str | Path, task: str, fmt: str = "auto", on_bad: str = "error"
                 ) -> tuple[datasets.Dataset, ReadReport]:
    """All valid records of ``path`` as a Dataset with the task's fields plus ``line``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    fmt = detect_format(path, fmt)
    fields = SFT_FIELDS if task == "sft" else PRETRAIN_FIELDS
    report = ReadReport(str(path))
    columns: dict[str, list] = {name: [] for name in (*fields, "line")}
    for where, record in _raw_records(path, fmt):
        problem = record if isinstance(record, DataProblem) else check_record(record, fields)
        if problem is not None:
            reject(report, f"{path}:{where}", problem, on_bad)
            continue
        for name in fields:
            columns[name].append(record[name])
        columns["line"].append(where)
        report.kept += 1
    if report.kept == 0:
        raise DataError(f"{path}: no usable records ({dict(report.skipped) or 'the file is empty'})")
    return datasets.Dataset.from_dict(columns), report


class DataProblem(str):
    """A short name of what is wrong with a record, e.g. ``"not valid JSON (...)"``."""


def check_record(record, fields: tuple[str, ...]) -> DataProblem | None:
    if not isinstance(record, dict):
        return DataProblem(f"expected a JSON object, got {type(record).__name__}")
    for name in fields:
        if name not in record:
            return DataProblem(f"missing field '{name}' (record has {sorted(record)})")
        if not isinstance(record[name], str):
            return DataProblem(f"field '{name}' must be a string, got {type(record[name]).__name__}")
    main = "response" if "response" in fields else "text"
    if not record[main].strip():
        return DataProblem(f"empty {main}")
    return None


def reject(report: ReadReport, where: str, problem: str, on_bad: str) -> None:
    """Raise for ``on_bad='error'``; otherwise count the problem (its kind, before any detail in brackets)."""
    if on_bad == "error":
        raise DataError(f"{where}: {problem} (set data.on_bad_record=skip to skip such records)")
    report.skipped[problem.split(" (")[0]] += 1


def _raw_records(path: Path, fmt: str):
    """Yield (line or row number, record or DataProblem)."""
    if fmt == "parquet":
        try:
            table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        except Exception as err:  # pyarrow raises many types for a broken file
            raise DataError(f"{path}: cannot read parquet ({err})") from None
        for row, record in enumerate(table, start=1):
            yield f"row {row}", record
        return
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield str(number), json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                yield str(number), DataProblem(f"not valid JSON ({err})")
