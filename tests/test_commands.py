"""The ``mdm-scale`` commands and scripts as a user runs them: ``data synth``, ``generate``, the exit statuses of
``train`` (3: too many non-finite steps, 75: stopped by SIGTERM after a checkpoint) and ``launch/quickstart.sh``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, final_summary, free_port, process_env, read_scalars, tiny_overrides
from mdm_scale.cli import main


@pytest.fixture
def keep_signal_handlers():
    """``main(["train", ...])`` installs SIGUSR1/SIGTERM handlers (record, stop at the next step); put pytest's
    back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_data_synth_writes_the_task_it_is_asked_for(tmp_path, capsys):
    from mdm_scale.data.synthetic import write_synthetic_task

    argv = ["data", "synth", "--out", str(tmp_path / "cli"), "--train", "30", "--eval", "7", "--seed", "4",
            "--min-ops", "2", "--max-ops", "2", "--pretrain", "5"]
    assert main(argv) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    direct = write_synthetic_task(tmp_path / "direct", train=30, eval=7, seed=4, min_ops=2, max_ops=2, pretrain=5)
    assert sorted(printed) == sorted(direct)
    for name, path in direct.items():  # the same records as the library call with these arguments
        assert Path(printed[name]).read_text() == path.read_text(), name
    lengths = {name: len(Path(p).read_text().splitlines()) for name, p in printed.items()}
    assert lengths == {"train": 30, "eval": 7, "pretrain": 5}
    record = json.loads(Path(printed["train"]).read_text().splitlines()[0])
    assert record["response"].count(" = ") == 2  # two operations: two worked steps


@pytest.fixture(scope="module")
def hf_model_dir(synth_dir, tmp_path_factory) -> Path:
    """A random tiny built-in model and the char tokenizer of the synthetic task, as ``mdm-scale export`` lays
    them out (no training needed to check decoding)."""
    from mdm_scale.data.tokenizer import build_char_tokenizer
    from mdm_scale.models.configuration_mdm import MDMConfig
    from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion

    out = tmp_path_factory.mktemp("hf_model")
    tokenizer = build_char_tokenizer([(synth_dir / name).read_text() for name in ("train.jsonl", "eval.jsonl")])
    torch.manual_seed(0)
    MDMForMaskedDiffusion(MDMConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    mask_token_id=tokenizer.mask_token_id)).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def test_generate_prints_each_prompts_decoding_in_order(synth_dir, hf_model_dir, tmp_path, capsys):
    """The decoded text of every prompt, exactly what the sampler gives with these settings (cut at EOS), in
    input order; ``--out`` writes the same records; ``--data`` reads prompts from a file."""
    from mdm_scale.data.dataset import encode_prompts
    from mdm_scale.generation.evaluate import decode_answer
    from mdm_scale.generation.model_source import load_generation_model
    from mdm_scale.generation.sampler import SamplingConfig, diffusion_generate

    prompts = [json.loads(line)["prompt"] for line in (synth_dir / "eval.jsonl").read_text().splitlines()[:3]]
    decoding = ["--gen-length", "12", "--steps", "6", "--block-length", "4", "--temperature", "0.8", "--seed", "9"]
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(hf_model_dir), *[a for p in prompts for a in ("--prompt", p)],
                 *decoding]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    gm = load_generation_model(hf_model_dir, torch.device("cpu"), torch.float32)
    cfg = SamplingConfig(gen_length=12, steps=6, block_length=4, temperature=0.8, seed=9)
    expected = []
    for index, prompt in enumerate(prompts):  # one at a time: the noise is keyed by the record, not the batch
        ids = encode_prompts(gm.tokenizer, [prompt], False)
        out = diffusion_generate(gm.model, ids, [index], gm.mask_token_id, gm.tokenizer.pad_token_id, cfg,
                                 torch.device("cpu"))[0, -12:].tolist()
        expected.append({"prompt": prompt, "prediction": decode_answer(gm.tokenizer, out, gm.tokenizer.eos_token_id)})
    assert printed == expected
    assert len({p["prediction"] for p in printed}) > 1  # the model does not print one constant text

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "generated.jsonl"
    assert main(["generate", "--checkpoint", str(hf_model_dir), "--data", str(data), "--out", str(out),
                 *decoding]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == expected
    assert main(["generate", "--checkpoint", str(hf_model_dir)]) == 2
    assert "give --prompt TEXT (repeatable) or --data FILE.jsonl" in capsys.readouterr().err


def train_argv(synth: Path, out: Path, **extra) -> list[str]:
    argv = ["train", "--config", str(REPO / "configs" / "quickstart.yaml")]
    for item in tiny_overrides(synth, out, **extra):
        argv += ["--set", item]
    return argv


def test_train_exits_3_after_too_many_non_finite_steps(synth_dir, tmp_path, dist_env, capsys, keep_signal_handlers):
    """A learning rate of 1e30 sends the weights to ~1e30 after step 1, so every later step's loss overflows:
    steps 2 and 3 are skipped and the run stops with status 3 and the last good state (step 1) saved."""
    out = tmp_path / "run"
    status = main(train_argv(synth_dir, out, **{"train.lr": 1e30, "train.max_nonfinite_steps": 2,
                                                "train.max_steps": 10}))
    err = capsys.readouterr().err
    assert status == 3, err[-2000:]
    assert "mdm-scale: error: 2 optimiser steps in a row (2..3) had a non-finite loss or gradient" in err
    assert "no update was applied since step 1" in err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert read_scalars(out / "tensorboard", "train/skipped_steps") == {1: 0.0, 2: 1.0}  # step 3 raised


def test_sigterm_checkpoints_and_exits_75_then_the_same_command_resumes(synth_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mdm_scale.cli", *train_argv(synth_dir, out, **{"train.max_steps": 500})]
    env = process_env(MASTER_PORT=str(free_port()))
    log = tmp_path / "train.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while "[train step 2]" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 75, log.read_text()[-3000:]
    text = log.read_text()
    summary = final_summary(text)
    step = summary["step"]
    assert summary["stopped_by"] == "SIGTERM" and 2 <= step < 500 and summary["eval_loss"] is None
    assert f"stopped by SIGTERM at step {step}; checkpoint {out / 'checkpoints' / f'step_{step:08d}'}" in text
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"

    cmd = [sys.executable, "-m", "mdm_scale.cli", *train_argv(synth_dir, out, **{"train.max_steps": step + 2})]
    again = subprocess.run(cmd, cwd=REPO, env=process_env(MASTER_PORT=str(free_port())), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'} at step {step}" in again.stdout
    assert final_summary(again.stdout)["step"] == step + 2


@pytest.mark.distributed
def test_quickstart_script_trains_two_ranks_and_reports_the_held_out_loss(tmp_path):
    """``bash launch/quickstart.sh`` with its knobs for a test: the task in a temporary directory, setup skipped
    (this environment is set up), 3 steps, the usual quickstart model and 2 ZeRO-3 ranks."""
    data, out = tmp_path / "synth", tmp_path / "run"
    env = process_env(QUICKSTART_DATA=str(data), QUICKSTART_SETUP="0", MASTER_PORT=str(free_port()))
    knobs = [f"train.output_dir={out}", "train.max_steps=3", "train.warmup_steps=0", "train.micro_batch_size=4",
             "train.eval_samples=16", "logging.progress_bar=never"]
    proc = subprocess.run(["bash", "launch/quickstart.sh", *[a for k in knobs for a in ("--set", k)]], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert len((data / "train.jsonl").read_text().splitlines()) == 20000  # mdm-scale data synth's default
    summary = final_summary(proc.stdout)
    assert summary["step"] == 3 and "2 rank(s) on cpu" in proc.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["config"]["model"]["preset"] == "quickstart"
    assert run["config"]["data"]["train_file"] == str(data / "train.jsonl")
    assert f"final eval loss: {summary['eval_loss']:.4f} (step 3)" in proc.stdout
    assert read_scalars(out / "tensorboard", "eval/loss")[3] == pytest.approx(summary["eval_loss"])
    assert f"TensorBoard logs: {out / 'tensorboard'}" in proc.stdout
