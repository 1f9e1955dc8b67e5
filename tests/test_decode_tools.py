"""The decoding benchmarks of tools/bench at a tiny shape on CPU: they run, and measure what they say they do."""

from __future__ import annotations

import json

import pytest
import torch

from mdm_scale.cli import main as cli
from mdm_scale.data.tokenizer import build_char_tokenizer
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion
from tools.bench import decode_accuracy, decode_speed


def test_decode_speed_counts_the_forwards_of_each_subject(tmp_path):
    """Answer 32 in blocks of 16: one token per forward takes 32 forwards (the threshold too: a random model is
    sure of nothing), 4 per forward 8; every subject decodes both blocks within the generous time bound."""
    assert decode_speed.main(["--preset", "tiny", "--batches", "2", "--gen-lengths", "32", "--prompt", "4",
                              "--block", "16", "--tokens-per-step", "4", "--seconds", "600", "--out",
                              str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "decode_speed.jsonl").read_text().splitlines()]
    forwards = {r["subject"]: r["forwards"] for r in rows}
    assert forwards == {"current": 32, "threshold": 32, "threshold+prefix": 32, "threshold+dual": 32,
                        "4/step": 8, "4/step+prefix": 8, "4/step+dual": 8}
    assert all(r["blocks"] == "2/2" and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["vs_current"] == 1.0
    assert (tmp_path / "decode_speed.md").read_text().count("\n") == 2 + len(rows)


def test_decode_speed_records_a_subject_that_runs_out_of_memory_and_goes_on(tmp_path, monkeypatch):
    """One subject whose decoding raises the GPU's out-of-memory error (planted: threshold+prefix) is a failed row;
    the subjects after it are still measured, and the exit status says that one failed."""
    timed = decode_speed.timed_decoding

    def out_of_memory_with_prefix_threshold(model, prompts, cfg, device, seconds):
        if cfg.cache == "prefix" and cfg.threshold is not None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return timed(model, prompts, cfg, device, seconds)

    monkeypatch.setattr(decode_speed, "timed_decoding", out_of_memory_with_prefix_threshold)
    assert decode_speed.main(["--preset", "tiny", "--batches", "1", "--gen-lengths", "8", "--prompt", "2", "--block",
                              "4", "--tokens-per-step", "2", "--seconds", "600", "--out", str(tmp_path)]) == 1
    rows = [json.loads(line) for line in (tmp_path / "decode_speed.jsonl").read_text().splitlines()]
    assert [r["subject"] for r in rows] == ["current", "threshold", "threshold+prefix", "threshold+dual", "2/step",
                                            "2/step+prefix", "2/step+dual"]
    failed = rows[2]
    assert failed["failed"] == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "tokens_per_s" not in failed and failed["vs_current"] is None
    assert all("failed" not in r and r["blocks"] == "2/2" for r in rows[:2] + rows[3:])
    assert "| threshold+prefix | failed: out of memory" in (tmp_path / "decode_speed.md").read_text()


def test_decode_accuracy_scores_what_mdm_scale_eval_scores(synth_dir, tmp_path, capsys):
    """A study of one checkpoint (a random model) whose gold answers are, for half the prompts, what the checkpoint
    decodes (the whole text, --answer-regex '(?s).+'): ``current`` must score what ``mdm-scale eval`` scores with
    the same settings (0.5), and its difference from itself is 0."""
    prompts = [json.loads(line)["prompt"] for line in (synth_dir / "eval.jsonl").read_text().splitlines()[:6]]
    study = tmp_path / "study"
    (study / "data").mkdir(parents=True)
    export_dir = study / "runs" / "standard" / "mb_4" / "seed_1" / "train"
    tokenizer = build_char_tokenizer(prompts)
    torch.manual_seed(0)
    MDMForMaskedDiffusion(MDMConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, mask_token_id=tokenizer.mask_token_id)
                          ).save_pretrained(str(export_dir))
    tokenizer.save_pretrained(str(export_dir))
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in prompts))
    regex, settings = "(?s).+", ["--gen-length", "8", "--steps", "8", "--block-length", "4"]
    assert cli(["eval", "--checkpoint", str(export_dir), "--data", str(probe), "--out", str(tmp_path / "p.jsonl"),
                "--answer-regex", regex, *settings]) == 0
    decoded = [json.loads(line)["answer"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert all(decoded), decoded  # every prediction has text to compare
    golds = [answer if i % 2 == 0 else answer + "z" for i, answer in enumerate(decoded)]
    (study / "data" / "eval.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": g}) + "\n"
                                                       for p, g in zip(prompts, golds)))
    capsys.readouterr()
    assert decode_accuracy.main(["--study", str(study), "--gen-length", "8", "--block-lengths", "8,4",
                                 "--answer-regex", regex, "--out", str(tmp_path / "out")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "decode_accuracy.jsonl").read_text().splitlines()]
    assert [(r["block_length"], r["option"]) for r in rows] == [
        (b, o) for b in (8, 4) for o in ("current", "threshold", "threshold+prefix", "threshold+dual")]
    current = {r["block_length"]: r for r in rows if r["option"] == "current"}
    assert current[4]["accuracy"] == 0.5 and current[4]["forwards_per_prompt"] == 8
    table = (tmp_path / "out" / "decode_accuracy.md").read_text()
    assert "| study | 4 | current | 1 | 50.0 | +0.00 |" in table


def test_decode_accuracy_checks_its_inputs_before_loading_a_model(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "eval.jsonl").write_text('{"prompt": "a", "answer": "1"}\n')
    with pytest.raises(SystemExit, match="no checkpoint matches --runs"):
        decode_accuracy.main(["--study", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
