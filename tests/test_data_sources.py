"""Sources and the data cache (data/sources.py, data/cache.py, data/store.py, data/stream.py): every file kind
gives the same examples, the cache gives the batches of the raw files and is built once (by several ranks
together, with the result of one), a second run does not tokenize, and a weighted mixture is keyed by the stream
position only."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_jsonl
from mdm_scale.config.loader import load_config
from mdm_scale.config.schema import ConfigError, DataConfig, SourceConfig
from mdm_scale.data import cache as data_cache
from mdm_scale.data.build import build_data
from mdm_scale.data.cache import Ranks
from mdm_scale.data.examples import TokenizedData
from mdm_scale.data.loader import TrainLoader
from mdm_scale.data.records import DataError
from mdm_scale.data.store import Store
from mdm_scale.data.stream import MixtureStream, largest_remainder


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def all_examples(data) -> list[tuple[list[int], list[bool]]]:
    return [tuple(x.tolist() for x in data.example(i)) for i in range(len(data))]


def thread_ranks(world: int) -> list[Ranks]:
    """``world`` ranks for threads of this process: gather and barrier through a threading.Barrier."""
    barrier, slots = threading.Barrier(world), [None] * world

    def gather(rank, obj):
        slots[rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    return [Ranks(r, world, lambda obj, r=r: gather(r, obj), barrier.wait) for r in range(world)]


def on_ranks(world: int, work) -> list:
    """``work(ranks)`` on ``world`` threads; each rank's result or exception."""
    results: list = [None] * world

    def run(ranks):
        try:
            results[ranks.rank] = work(ranks)
        except Exception as err:  # returned for the test to compare
            results[ranks.rank] = err

    threads = [threading.Thread(target=run, args=(r,)) for r in thread_ranks(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_every_file_kind_gives_the_same_examples(synth_dir, tmp_path):
    """One JSONL file, a glob over two JSONL parts, parquet, an Arrow file, a save_to_disk directory and a
    directory of files: the same records, so the same examples in the same order."""
    import datasets

    records = records_of(synth_dir / "train.jsonl")[:120]
    write_jsonl(tmp_path / "all.jsonl", records)
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "a.jsonl", records[:50])
    write_jsonl(tmp_path / "parts" / "b.jsonl", records[50:])
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "all.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved_dict"))
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))
    assert len(arrow) == 1
    paths = {"jsonl": tmp_path / "all.jsonl", "glob": tmp_path / "parts" / "*.jsonl", "parquet": tmp_path /
             "all.parquet", "arrow": arrow[0], "save_to_disk": tmp_path / "saved", "directory": tmp_path / "parts"}
    built, run_dir = {}, tmp_path / "run"
    for name, path in paths.items():
        built[name] = all_examples(build_data(DataConfig(train_file=str(path), seq_len=192), 0, run_dir).train)
    assert len(built["jsonl"]) == 120
    for name in paths:
        assert built[name] == built["jsonl"], name
    with pytest.raises(DataError, match=r"'data.train_file': .*saved_dict holds the splits train of a saved "
                                        r"DatasetDict; name one of them"):
        build_data(DataConfig(train_file=str(tmp_path / "saved_dict")), 0, run_dir)
    with pytest.raises(FileNotFoundError, match=r"config key 'data.train_files\[1\]': no file matches .*nope\*"):
        build_data(DataConfig(train_files=[SourceConfig(str(paths["jsonl"])), SourceConfig(str(tmp_path / "nope*"))]),
                   0, run_dir)


def test_any_cut_of_a_file_into_ranges_reads_each_record_once(tmp_path):
    """Ranks read parts of one file: for every cut point, the two ranges together give every record once, in
    order, with its position (a line's byte offset; a row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mdm_scale.data.records import extent, raw_records

    records = [{"text": "x" * n} for n in (3, 0, 12, 1, 7)]
    lines = [json.dumps(r) for r in records]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")  # a blank line too
    starts = [0] + [len(lines[0]) + 2 + sum(len(x) + 1 for x in lines[1:i]) for i in range(1, 5)]
    table = pa.Table.from_pylist(records)
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
    for name, writer in (("stream.arrow", pa.ipc.new_stream), ("file.arrow", pa.ipc.new_file)):
        with writer(str(tmp_path / name), table.schema) as out:  # record batches of 2 rows
            for batch in table.to_batches(max_chunksize=2):
                out.write_batch(batch)
    for path, fmt, positions in ((jsonl, "jsonl", starts), (tmp_path / "d.parquet", "parquet", range(5)),
                                 (tmp_path / "stream.arrow", "arrow", range(5)),
                                 (tmp_path / "file.arrow", "arrow", range(5))):
        end = extent(path, fmt)
        assert list(raw_records(path, fmt)) == list(zip(positions, records))
        for cut in range(end + 1):
            both = list(raw_records(path, fmt, 0, cut)) + list(raw_records(path, fmt, cut, end))
            assert both == list(zip(positions, records)), (fmt, cut)


def test_the_cache_gives_the_batches_of_the_raw_records(synth_dir, tmp_path):
    """Batches from the memory-mapped cache equal batches from the records tokenized here, in memory: the same
    ids, scored positions and stream positions, step after step (packed rows too)."""
    cfg = DataConfig(train_file=str(synth_dir / "train.jsonl"), seq_len=192, response_eos_pad=40)
    data = build_data(cfg, 0, tmp_path / "run")
    tok, eos = data.tokenizer, data.tokenizer.eos_token_id
    pieces, prompt_lens = [], []
    for record in records_of(synth_dir / "train.jsonl"):
        prompt = tok(record["prompt"], add_special_tokens=False)["input_ids"]
        response = tok(record["response"], add_special_tokens=False)["input_ids"]
        response = (response + [eos] * max(1, 40 - len(response)))[:40]
        pieces.append(prompt + response)
        prompt_lens.append(len(prompt))
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    raw = TokenizedData.from_prompt_lens(np.concatenate(pieces), offsets, prompt_lens)
    assert isinstance(data.train.tokens.pieces[0], np.memmap)
    for packing in (False, True):
        loaders = [TrainLoader(d, 5, 0, 1, 4, 2, 0, 8, 192, group_by_length=True, packing=packing)
                   for d in (data.train, raw)]
        for step in (0, 1, 7, 150):  # 150: the second epoch
            for micro in range(2):
                cached, direct = (loader.micro_batch_at(step, micro) for loader in loaders)
                for name in ("input_ids", "loss_mask", "sample_index", "attention_mask", "document_ids"):
                    a, b = getattr(cached, name), getattr(direct, name)
                    assert (a is None and b is None) or torch.equal(a, b), (packing, step, name)


def test_a_second_run_reads_nothing_but_the_cache(synth_dir, tmp_path, monkeypatch):
    cfg = DataConfig(train_file=str(synth_dir / "train.jsonl"), eval_file=str(synth_dir / "eval.jsonl"), seq_len=192)
    first = build_data(cfg, 0, tmp_path / "run")
    first.tokenizer.save_pretrained(str(tmp_path / "saved"))  # a resume reloads the run's saved tokenizer

    def no_reading(*args, **kwargs):
        raise AssertionError("read or tokenized records although the cache holds them")

    with monkeypatch.context() as patched:
        for name in ("checked_records", "RecordEncoder", "build_char_tokenizer"):
            patched.setattr(data_cache, name, no_reading)
        for saved in (tmp_path / "run", tmp_path / "saved"):  # a new run, and a resume with the saved tokenizer
            again = build_data(cfg, 0, saved)
            assert all_examples(again.train) == all_examples(first.train)
            assert all_examples(again.eval) == all_examples(first.eval)
            assert "cached" in again.summary() and "tokenized" not in again.summary()
        # mixture weights change the order, not the tokens: still cached
        weighted = build_data(DataConfig(train_files=[SourceConfig(str(synth_dir / "train.jsonl"), 2.0),
                                                      SourceConfig(str(synth_dir / "eval.jsonl"), 1.0)],
                                         seq_len=192), 0, tmp_path / "saved")
        assert len(weighted.train) == len(first.train) + len(first.eval)
        with pytest.raises(AssertionError, match="read or tokenized"):  # another seq_len: other tokens
            build_data(DataConfig(train_file=cfg.train_file, seq_len=64), 0, tmp_path / "saved")
    edited = tmp_path / "train.jsonl"
    write_jsonl(edited, records_of(synth_dir / "train.jsonl")[:-1])
    before = len(list(data_cache.cache_root(cfg).iterdir()))
    build_data(DataConfig(train_file=str(edited), seq_len=192), 0, tmp_path / "saved")
    write_jsonl(edited, records_of(synth_dir / "train.jsonl")[:-2])  # new content: a new store
    build_data(DataConfig(train_file=str(edited), seq_len=192), 0, tmp_path / "saved")
    assert len(list(data_cache.cache_root(cfg).iterdir())) == before + 2


def test_ranks_build_one_store_together_equal_to_one_rank_and_agree_on_the_first_bad_record(synth_dir, tmp_path):
    """Three ranks split the tokenizing (units of the file) and publish one store, identical in content to the
    one a single process builds, held-out split included; with two bad records every rank raises the same
    error, naming the earlier one."""
    records = records_of(synth_dir / "train.jsonl")
    source = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = DataConfig(train_file=str(source), seq_len=192, eval_fraction=0.1, cache_dir=str(tmp_path / "three"))
    tokenizer_dir = tmp_path / "run"
    one = build_data(replace(cfg, cache_dir=str(tmp_path / "one")), 0, tokenizer_dir)
    three = on_ranks(3, lambda ranks: build_data(cfg, 0, tokenizer_dir, ranks))
    stores = [p for p in (tmp_path / "three").iterdir() if not p.name.startswith("char-")]
    assert len(stores) == 1 and not list((tmp_path / "three").glob(".*"))  # one store, no build left over
    assert len(Store(stores[0]).index["splits"]["main"]["shards"]) >= 3  # written in parts by the ranks
    for data in three:
        assert not isinstance(data, Exception), data
        assert all_examples(data.train) == all_examples(one.train)
        assert all_examples(data.eval) == all_examples(one.eval)
    assert 0.05 * len(records) < len(one.eval) < 0.15 * len(records)

    bad = [*records]
    bad[250], bad[450] = '{"prompt": "x"', {"prompt": "y"}
    write_jsonl(source, bad)
    one.tokenizer.save_pretrained(str(tmp_path / "saved"))
    for saved in (tokenizer_dir, tmp_path / "saved"):  # found building the char tokenizer, or the store
        errors = on_ranks(3, lambda ranks, saved=saved: build_data(cfg, 0, saved, ranks))
        assert all(isinstance(e, DataError) for e in errors), errors
        assert len({str(e) for e in errors}) == 1 and str(errors[0]).startswith(f"{source}:251: not valid JSON")


def test_a_weighted_mixture_is_exact_per_window_and_the_same_for_any_world_size(synth_dir, tmp_path):
    """Every window of the stream holds each source's share of positions, each source runs through its
    examples without repeats before it recycles them, and the micro-batches of a step are the same on 1 and 2
    ranks and for a fresh loader (a resume)."""
    cfg = load_config([], [f"data.train_files=[{{path: {synth_dir / 'train.jsonl'}, weight: 3}}, "
                           f"{{path: {synth_dir / 'eval.jsonl'}, weight: 1}}]", "data.seq_len=192"]).data
    data = build_data(cfg, 0, tmp_path / "run")
    sizes = data.train.sizes
    assert sizes == [600, 64]
    stream, width = MixtureStream(sizes, [3, 1], seed=4), MixtureStream.WINDOW
    for window in range(2):
        ids = stream.example_ids(range(window * width, (window + 1) * width))
        by_source = Counter(int(e >= sizes[0]) for e in ids)
        assert [by_source[0], by_source[1]] == largest_remainder([3, 1], width).tolist() == [49152, 16384]
        if window == 0:  # the first pass over each source holds each of its examples once
            assert sorted([e for e in ids if e < sizes[0]][:600]) == list(range(600))
            assert sorted([e for e in ids if e >= sizes[0]][:64]) == list(range(600, 664))
    fresh = MixtureStream(sizes, [3, 1], seed=4)  # random access: a position far ahead needs no history
    assert fresh.example_ids(range(width + 100, width + 164)) == ids[100:164]

    micro, step, groups = 3, 40, {}
    for world, accum in [(1, 2), (2, 1)]:
        groups[world] = [TrainLoader(data.train, 7, rank, world, micro, accum, 0, 8, 192).micro_batch_at(step, a)
                         .sample_index.tolist() for a in range(accum) for rank in range(world)]
    assert groups[1] == groups[2]
    examples = {w: [TrainLoader(data.train, 7, 0, 1, micro, 2, 0, 8, 192).stream.example_ids(g) for g in gs]
                for w, gs in groups.items()}
    assert examples[1] == examples[2] and any(e >= sizes[0] for g in examples[1] for e in g)
    with pytest.raises(ConfigError, match=r"data.train_files\[1\].weight' = 1e-06: too small"):
        build_data(DataConfig(train_files=[SourceConfig(cfg.train_files[0].path, 1.0),
                                           SourceConfig(cfg.train_files[1].path, 1e-6)]), 0, tmp_path / "run")
