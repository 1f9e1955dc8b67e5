"""Everything the training loop needs from the data section: tokenizer, tokenized train and eval sets.

Order of checks: files exist, every record is valid (file and line on error), then tokenization and length
checks. Nothing here touches a model, so a data problem fails in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from mdm_scale.config.schema import DataConfig
from mdm_scale.data.dataset import TokenizedData, tokenize_records
from mdm_scale.data.records import detect_format, detect_task, read_records
from mdm_scale.data.synthetic import how_to_make
from mdm_scale.data.tokenizer import load_tokenizer


@dataclass
class RunData:
    task: str
    tokenizer: PreTrainedTokenizerBase
    train: TokenizedData
    eval: TokenizedData | None

    def summary(self) -> str:
        parts = [f"task={self.task}", f"vocab={len(self.tokenizer)}",
                 f"train={len(self.train)} sequences / {self.train.num_tokens} tokens"]
        if self.eval is not None:
            parts.append(f"eval={len(self.eval)} sequences")
        for name, data in (("train", self.train), ("eval", self.eval)):
            if data is not None and data.counts:
                parts.append(f"{name} " + ", ".join(f"{k}: {v}" for k, v in sorted(data.counts.items())))
        return "; ".join(parts)


def build_data(cfg: DataConfig, seed: int, tokenizer_dir: Path) -> RunData:
    train_path = Path(cfg.train_file)
    for key, name in (("data.train_file", cfg.train_file), ("data.eval_file", cfg.eval_file)):
        if name is not None and not Path(name).is_file():
            raise FileNotFoundError(f"config key '{key}': file not found: {name}{how_to_make(Path(name))}")
    task = detect_task(train_path, detect_format(train_path, cfg.format), cfg.task)
    train_records, train_report = read_records(train_path, task, cfg.format, cfg.on_bad_record)
    eval_records = eval_report = None
    if cfg.eval_file is not None:
        eval_records, eval_report = read_records(cfg.eval_file, task, cfg.format, cfg.on_bad_record)
    elif cfg.eval_fraction > 0:
        split = train_records.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        train_records, eval_records, eval_report = split["train"], split["test"], train_report

    text_columns = ["prompt", "response"] if task == "sft" else ["text"]
    texts = (row[c] for records in (train_records, eval_records) if records is not None
             for row in records for c in text_columns)
    tokenizer = load_tokenizer(cfg.tokenizer, tokenizer_dir, texts)
    train = tokenize_records(train_records, train_report, task, tokenizer, cfg)
    evaluation = None if eval_records is None else tokenize_records(eval_records, eval_report, task, tokenizer, cfg)
    return RunData(task, tokenizer, train, evaluation)
