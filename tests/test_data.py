"""Data: synthetic task, record checks with file and line, tokenization, packing and rank sharding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mdm_scale.config.schema import DataConfig
from mdm_scale.data.build import build_data
from mdm_scale.data.loader import TrainLoader, eval_batches
from mdm_scale.data.records import DataError, ReadReport, Where, checked_records, detect_format
from mdm_scale.data.stream import DataStream
from mdm_scale.data.synthetic import solve, write_synthetic_task
from mdm_scale.data.tokenizer import build_char_tokenizer


def test_synthetic_task_is_deterministic_and_correct(tmp_path):
    a = write_synthetic_task(tmp_path / "a", train=50, eval=10, seed=3)
    b = write_synthetic_task(tmp_path / "b", train=50, eval=10, seed=3)
    assert a["train"].read_text() == b["train"].read_text()
    records = [json.loads(line) for line in a["train"].read_text().splitlines()]
    eval_prompts = {json.loads(line)["prompt"] for line in a["eval"].read_text().splitlines()}
    assert not eval_prompts & {r["prompt"] for r in records}
    for r in records:  # every worked step is true arithmetic and the answer follows ####
        steps, answer = r["response"].split(" #### ")
        for step in steps.rstrip(".").split(". "):
            lhs, rhs = step.split(" = ")
            assert eval(lhs.replace("/", "//")) == int(rhs)  # noqa: S307 (our own generated text)
        assert int(answer) == int(steps.rstrip(".").split(" = ")[-1])


def test_pretraining_text_never_contains_an_eval_prompt(tmp_path):
    # One-operation problems have a small prompt space: 20,000 unfiltered texts would hold several eval prompts.
    paths = write_synthetic_task(tmp_path, train=10, eval=200, seed=0, min_ops=1, max_ops=1, pretrain=20000)
    eval_prompts = {json.loads(line)["prompt"] for line in paths["eval"].read_text().splitlines()}
    texts = [json.loads(line)["text"] for line in paths["pretrain"].read_text().splitlines()]
    assert len(texts) == 20000
    assert not {t.split("\n")[0] + "\n" for t in texts} & eval_prompts


@pytest.mark.parametrize("family", ["add", "sort", "count", "common", "missing", "minmax", "lookup"])
def test_family_is_deterministic_correct_and_keeps_eval_prompts_out(tmp_path, family):
    a = write_synthetic_task(tmp_path / "a", train=300, eval=100, seed=5, min_ops=1, max_ops=4, pretrain=300,
                             family=family)
    b = write_synthetic_task(tmp_path / "b", train=300, eval=100, seed=5, min_ops=1, max_ops=4, pretrain=300,
                             family=family)
    other = write_synthetic_task(tmp_path / "c", train=300, eval=100, seed=6, min_ops=1, max_ops=4, family=family)
    for name in ("train", "eval", "pretrain"):
        assert a[name].read_text() == b[name].read_text()
    assert a["train"].read_text() != other["train"].read_text()
    train, evals = ([json.loads(line) for line in a[n].read_text().splitlines()] for n in ("train", "eval"))
    texts = [json.loads(line)["text"] for line in a["pretrain"].read_text().splitlines()]
    for r in train + evals:
        answer = r["response"].rsplit("#### ", 1)[1]
        assert answer.isdigit() and answer == solve(family, r["prompt"])  # digits only: never negative
    eval_prompts = {r["prompt"] for r in evals}
    assert len(eval_prompts) == 100
    assert not eval_prompts & {r["prompt"] for r in train}
    assert not eval_prompts & {t.split("\n")[0] + "\n" for t in texts}
    sizes = {len(r["prompt"]) for r in train}  # the size range is used, not one size
    assert max(sizes) - min(sizes) >= 6


def test_too_small_a_problem_space_is_an_error(tmp_path):
    with pytest.raises(DataError, match="problem space is too small"):
        write_synthetic_task(tmp_path, train=500, eval=100, family="add", min_ops=1, max_ops=1)
    with pytest.raises(DataError, match="family lookup needs"):
        write_synthetic_task(tmp_path, family="lookup", min_ops=2, max_ops=14)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_LINES = [
    '{"prompt": "a", "response": "b"}',
    '{"prompt": "a", "response": "b"',          # line 2: broken JSON
    '{"prompt": "a"}',                           # line 3: missing response
    '{"prompt": "a", "response": "   "}',        # line 4: empty response
    '[1, 2]',                                    # line 5: not an object
    '{"prompt": 3, "response": "b"}',            # line 6: wrong type
    '{"prompt": "c", "response": "d"}',
]


def read_records(path: Path, task: str, on_bad: str = "error") -> tuple[list[tuple[str, dict]], ReadReport]:
    """Every valid record of a file with its place (``file:line``), and the report."""
    fmt, report = detect_format(path, "auto"), ReadReport()
    kept = [(str(Where(path, fmt, p)), r) for p, r in checked_records(path, fmt, task, on_bad, report)]
    return kept, report


@pytest.mark.parametrize("line, message", [
    (2, "not valid JSON"), (3, "missing field 'response'"), (4, "empty response"),
    (5, "expected a JSON object"), (6, "field 'prompt' must be a string"),
])
def test_malformed_records_fail_with_file_and_line(tmp_path, line, message):
    lines = [BAD_LINES[0]] + [BAD_LINES[line - 1]]
    path = _write(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=rf"d.jsonl:2: {message}"):
        read_records(path, "sft")


def test_malformed_records_are_skipped_and_counted(tmp_path):
    path = _write(tmp_path / "d.jsonl", BAD_LINES)
    records, report = read_records(path, "sft", on_bad="skip")
    assert [r["prompt"] for _, r in records] == ["a", "c"] and [w for w, _ in records] == [f"{path}:1", f"{path}:7"]
    assert report.skipped == {"not valid JSON": 1, "missing field 'response' or 'messages'": 1, "empty response": 1,
                              "expected a JSON object, got list": 1, "field 'prompt' must be a string, got int": 1}


def test_missing_file_and_parquet(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config key 'data.train_file': file not found: .*none.jsonl"):
        build_data(DataConfig(train_file=str(tmp_path / "none.jsonl")), 0, tmp_path / "tok")
    import datasets

    datasets.Dataset.from_dict({"text": ["hello world", ""]}).to_parquet(str(tmp_path / "p.parquet"))
    with pytest.raises(DataError, match=r"p.parquet:row 2: empty text"):
        read_records(tmp_path / "p.parquet", "pretrain")


def test_sft_tokenization_marks_prompt_and_handles_overlong(tmp_path):
    path = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "ab", "response": "cdef"}),
                                         json.dumps({"prompt": "abcdefghij", "response": "k"}),
                                         json.dumps({"prompt": "a", "response": "bcdefghijk"})])
    cfg = DataConfig(train_file=str(path), seq_len=8, on_bad_record="skip")
    data = build_data(cfg, seed=0, tokenizer_dir=tmp_path / "tok")
    tok = data.tokenizer
    ids, scored = data.train.example(0)
    assert tok.decode(ids[~scored]) == "ab" and scored.tolist() == [False] * 2 + [True] * 5
    assert list(ids[scored]) == tok("cdef", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(data.train) == 2  # the 10-char prompt leaves no room in 8 tokens
    assert data.train.counts["over-long prompt"] == 1 and data.train.counts["truncated (over-long)"] == 1
    assert len(data.train.example(1)[0]) == 8
    with pytest.raises(DataError, match=r"d.jsonl:2: over-long prompt \(10 tokens"):
        build_data(DataConfig(train_file=str(path), seq_len=8), seed=0, tokenizer_dir=tmp_path / "tok2")
    dropped = build_data(DataConfig(train_file=str(path), seq_len=8, on_bad_record="skip", overlong="drop"), 0,
                         tmp_path / "tok3")
    assert len(dropped.train) == 1 and dropped.train.counts["dropped (over-long)"] == 1


def test_pretraining_text_is_packed_into_full_blocks(synth_dir, tmp_path):
    cfg = DataConfig(train_file=str(synth_dir / "pretrain.jsonl"), seq_len=64)
    data = build_data(cfg, seed=0, tokenizer_dir=tmp_path / "tok")
    assert data.task == "pretrain"
    blocks = [data.train.example(i) for i in range(len(data.train))]
    assert all(len(ids) == 64 and scored.all() for ids, scored in blocks)
    tok = data.tokenizer
    stream = [t for line in (synth_dir / "pretrain.jsonl").read_text().splitlines()
              for t in tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert [t for ids, _ in blocks for t in ids.tolist()] == stream[:64 * len(blocks)]
    assert data.train.counts["tail tokens dropped"] == len(stream) - 64 * len(blocks) < 64


def test_char_tokenizer_round_trip(tmp_path):
    tok = build_char_tokenizer(["hello #### 42\n"])
    ids = tok("hello 42", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "hello 42" and len(ids) == 8
    assert tok.mask_token_id == 2 and tok.pad_token_id == 0 and tok.eos_token_id == 1
    tok.save_pretrained(str(tmp_path))
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again("hello 42", add_special_tokens=False)["input_ids"] == ids


@pytest.mark.parametrize("grouped", [False, True])
def test_every_step_is_split_into_the_same_groups_for_any_world_size(synth_dir, tmp_path, grouped):
    data = build_data(DataConfig(train_file=str(synth_dir / "train.jsonl"), seq_len=192), 0, tmp_path / "tok")
    micro, step, splits = 3, 5, {}
    for world, accum in [(1, 4), (2, 2), (4, 1)]:
        groups = []
        for a in range(accum):
            for rank in range(world):
                loader = TrainLoader(data.train, 0, rank, world, micro, accum, 0, 8, 192, group_by_length=grouped)
                groups.append(loader.micro_batch_at(step, a).sample_index.tolist())
        splits[world] = groups
        assert sorted(p for g in groups for p in g) == list(range(step * 12, step * 12 + 12))
    assert splits[1] == splits[2] == splits[4]  # the same micro-batches, whichever rank runs them


def test_grouping_by_length_reduces_padding(synth_dir, tmp_path):
    data = build_data(DataConfig(train_file=str(synth_dir / "train.jsonl"), seq_len=192), 0, tmp_path / "tok")
    padding = {}
    for grouped in (False, True):
        pads = total = 0
        for step in range(20):
            for micro in range(4):
                loader = TrainLoader(data.train, 0, 0, 1, 4, 4, 0, 8, 192, group_by_length=grouped)
                batch = loader.micro_batch_at(step, micro)
                total += batch.input_ids.numel()
                pads += 0 if batch.attention_mask is None else int((~batch.attention_mask).sum())
        padding[grouped] = pads / total
    assert padding[True] < 0.5 * padding[False], padding


def test_data_stream_is_a_permutation_per_epoch():
    stream = DataStream(10, seed=1)
    first, second = stream.example_ids(range(10)), stream.example_ids(range(10, 20))
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10)) and first != second
    assert DataStream(10, seed=1).example_ids(range(10, 20)) == second  # random access, no history needed


def test_collated_batches_mask_only_padding(synth_dir, tmp_path):
    data = build_data(DataConfig(train_file=str(synth_dir / "train.jsonl"), seq_len=192), 0, tmp_path / "tok")
    loader = TrainLoader(data.train, seed=0, rank=1, world=2, micro_batch=4, grad_accum=1, pad_id=0,
                         pad_to_multiple_of=8, seq_len=192)
    batch = loader.micro_batch_at(step=2, micro=0)
    assert batch.sample_index.tolist() == [20, 21, 22, 23]
    assert batch.input_ids.shape[1] % 8 == 0
    for row, index in enumerate(loader.stream.example_ids(range(20, 24))):
        ids, scored = data.train.example(index)
        assert batch.input_ids[row, :len(ids)].tolist() == ids.tolist()
        assert batch.attention_mask[row].sum() == len(ids)
        assert batch.loss_mask[row].nonzero().flatten().tolist() == np.flatnonzero(scored).tolist()


def test_eval_batches_cover_each_example_once_across_ranks(synth_dir, tmp_path):
    data = build_data(DataConfig(train_file=str(synth_dir / "eval.jsonl"), seq_len=192), 0, tmp_path / "tok")
    seen, counts = [], []
    for rank in range(3):
        batches = list(eval_batches(data.train, rank, 3, 5, 40, 0, 8, 192))
        counts.append(len(batches))
        for b in batches:
            seen += b.sample_index[b.valid].tolist()
    assert len(set(counts)) == 1  # same number of forwards on every rank
    assert sorted(seen) == list(range(40))
