"""End-to-end training in this process (one ZeRO-3 rank): loss falls, TensorBoard files, exact resume,
a local Hugging Face masked LM, and the errors that must come before any expensive work."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import read_scalars, tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.config.schema import ConfigError
from mdm_scale.training.checkpoint import CheckpointError
from mdm_scale.training.trainer import Trainer


def trainer(synth, out, env, **overrides) -> Trainer:
    return Trainer(load_config(["configs/quickstart.yaml"], tiny_overrides(synth, out, **overrides)), env)


def run(synth, out, env, **overrides) -> dict:
    return trainer(synth, out, env, **overrides).fit()


def test_loss_decreases_and_tensorboard_reads_back(synth_dir, tmp_path, dist_env):
    summary = run(synth_dir, tmp_path / "run", dist_env, **{"train.max_steps": 40, "train.eval_every": 20})
    losses = read_scalars(summary["tensorboard_dir"], "train/loss")
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 0.5, (first, last)
    evals = read_scalars(summary["tensorboard_dir"], "eval/loss")
    assert sorted(evals) == [20, 40] and evals[40] == pytest.approx(summary["eval_loss"])
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/masked_fraction"):
        assert len(read_scalars(summary["tensorboard_dir"], tag)) == 40
    fractions = list(read_scalars(summary["tensorboard_dir"], "train/masked_fraction").values())
    assert 0.35 < sum(fractions) / len(fractions) < 0.65  # E[pi(t)] = 1/2 under uniform t
    out = tmp_path / "run"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000040"
    assert json.loads((out / "run.json").read_text())["config"]["train"]["max_steps"] == 40
    assert (out / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("mirror, packing", [(False, False), (True, False), (True, True)])
def test_resume_continues_exactly(synth_dir, tmp_path, dist_env, mirror, packing):
    common = {"train.grad_accum": 2, "variance.masks": "mirror" if mirror else "bernoulli", "train.max_steps": 6,
              "train.warmup_steps": 2,
              "data.packing": packing}
    straight = run(synth_dir, tmp_path / "straight", dist_env, **common)
    interrupted = trainer(synth_dir, tmp_path / "split", dist_env, **common)
    for _ in range(3):
        interrupted.train_step()
    interrupted.save()
    resumed = run(synth_dir, tmp_path / "split", dist_env, **common)
    a = read_scalars(straight["tensorboard_dir"], "train/loss")
    b = read_scalars(resumed["tensorboard_dir"], "train/loss")
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-6)
    # The compute spent carries over the checkpoint: forward rows (6 steps x 2 micro-batches x rows) and tokens.
    rows = 6 * 2 * 4 * (2 if mirror else 1)  # tiny_overrides: micro-batch 4
    assert (resumed["rows"], resumed["tokens"], resumed["flops"]) == (rows, straight["tokens"], straight["flops"])
    assert read_scalars(straight["tensorboard_dir"], "train/tokens_seen")[6] == pytest.approx(straight["tokens"])


def test_local_bert_masked_lm_trains_through_the_same_path(synth_dir, tmp_path, dist_env):
    from transformers import BertConfig, BertForMaskedLM

    from mdm_scale.data.tokenizer import build_char_tokenizer

    vocab = len(build_char_tokenizer([(synth_dir / "train.jsonl").read_text()])) + 8
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=256)).save_pretrained(tmp_path / "bert")
    summary = run(synth_dir, tmp_path / "run", dist_env, **{"model.path": str(tmp_path / "bert"),
                                                            "train.max_steps": 30, "train.lr": 1e-3})
    losses = read_scalars(summary["tensorboard_dir"], "train/loss")
    assert sum(losses[s] for s in range(26, 31)) < sum(losses[s] for s in range(1, 6)) - 1.0
    assert summary["eval_loss"] == pytest.approx(read_scalars(summary["tensorboard_dir"], "eval/loss")[30])
    assert summary["eval_loss"] < sum(losses[s] for s in range(1, 6)) / 5 - 0.5  # held-out loss fell too


def test_errors_before_any_model_is_built(synth_dir, tmp_path, dist_env):
    with pytest.raises(FileNotFoundError, match="data.train_file': file not found"):
        run(synth_dir, tmp_path / "a", dist_env, **{"data.train_file": str(tmp_path / "missing.jsonl")})
    with pytest.raises(FileNotFoundError, match="'model.path' = .*no config.json"):
        run(synth_dir, tmp_path / "b", dist_env, **{"model.path": str(tmp_path)})
    with pytest.raises(ConfigError, match="global_batch_size' = 5"):
        run(synth_dir, tmp_path / "c", dist_env, **{"train.global_batch_size": 5})
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # nothing written


def test_checkpoints_of_another_run_are_refused(synth_dir, tmp_path, dist_env):
    run(synth_dir, tmp_path / "run", dist_env, **{"train.max_steps": 2})
    with pytest.raises(ConfigError, match=r"holds another run \(model.preset: 'tiny' there, 'small' here\)"):
        run(synth_dir, tmp_path / "run", dist_env, **{"train.max_steps": 4, "model.preset": "small"})
    with pytest.raises(ConfigError, match=r"holds another run \(variance.probe.every: 25 there, 5 here\)"):
        run(synth_dir, tmp_path / "run", dist_env, **{"train.max_steps": 4, "variance.probe.every": 5})
    # A run written by an mdm-scale without a key ran with that key's default: it continues.
    run_file = tmp_path / "run" / "run.json"
    written = json.loads(run_file.read_text())
    del written["config"]["variance"]["probe"]["every"], written["config"]["data"]["packing"]
    run_file.write_text(json.dumps(written))
    assert run(synth_dir, tmp_path / "run", dist_env, **{"train.max_steps": 3})["step"] == 3
    with pytest.raises(ConfigError, match="already holds checkpoints and train.resume=never"):
        run(synth_dir, tmp_path / "run", dist_env, **{"train.max_steps": 4, "train.resume": "never"})
    cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(
        synth_dir, tmp_path / "other", **{"train.max_steps": 4, "model.overrides": {"hidden_size": 32},
                                          "train.resume": str(tmp_path / "run" / "checkpoints" / "step_00000002")}))
    with pytest.raises(CheckpointError, match=r"another model shape: parameter 'lm_head.weight' is \[\d+, 64\] there "
                                              r"and \[\d+, 32\] in this run"):
        Trainer(cfg, dist_env)


def test_a_run_written_with_the_old_flat_variance_keys_resumes(synth_dir, tmp_path, dist_env):
    """``run.json`` of a run from before the nested ``variance`` sections (its section as mdm-scale wrote it then)
    is read under the new keys: the same run resumes, with one warning line naming the file; another is refused
    naming the new key. P-POTS's old cadence was also the online monitor's, so that run had monitor.every 2."""
    from mdm_scale.config.legacy import ConfigDeprecation

    same = {"variance.t_sampler": {"name": "ppots", "x0": 2, "bins": 8, "masks": 2, "refit_every": 2},
            "variance.masks": "mirror", "variance.monitor.every": 2}
    run(synth_dir, tmp_path / "run", dist_env, **same, **{"train.max_steps": 2})
    run_file = tmp_path / "run" / "run.json"
    written = json.loads(run_file.read_text())
    written["config"]["variance"] = {
        "t_sampler": "ppots", "mirror": True, "mirror_plus_threshold": None, "eps": 0.001, "ppots_x0": 2,
        "ppots_masks": 2, "ppots_bins": 8, "ppots_forward_tokens": None, "ppots_restarts": 20, "ppots_refit_every": 2,
        "ppots_half_life": 200.0, "ppots_mix_uniform": 0.0, "ppots_max_weight": None, "ppots_target": "loss",
        "ppots_loss_max": None, "t_coupling": "independent", "clip_low": 0.3, "clip_high": 0.8, "isad_token_ids": [],
        "isad_delta": 0.2, "ema_bins": 0, "ema_rate": 0.01, "probe_every": 25, "probe_fraction": 0.0625}
    run_file.write_text(json.dumps(written))
    with pytest.warns(ConfigDeprecation, match=f"^{run_file}: read the deprecated keys variance.mirror, "):
        with pytest.raises(ConfigError, match=r"holds another run \(variance.monitor.every: 2 there, 50 here\)"):
            run(synth_dir, tmp_path / "run", dist_env, **{**same, "variance.monitor.every": 50, "train.max_steps": 3})
    with pytest.warns(ConfigDeprecation):
        assert run(synth_dir, tmp_path / "run", dist_env, **same, **{"train.max_steps": 3})["step"] == 3


def test_zero3_with_leaf_blocks_trains_like_plain_data_parallel(synth_dir, tmp_path, dist_env):
    """ZeRO-3 (blocks gathered as units, fused qkv/gate-up projections) and ZeRO stage 0 take the same steps."""
    losses = {}
    for stage in (0, 3):
        summary = run(synth_dir, tmp_path / f"zero{stage}", dist_env, **{"train.zero_stage": stage,
                                                                         "train.max_steps": 4})
        losses[stage] = read_scalars(summary["tensorboard_dir"], "train/loss")
    assert losses[0][1] == pytest.approx(losses[3][1], rel=1e-6)
    for step in (2, 3, 4):
        assert losses[0][step] == pytest.approx(losses[3][step], rel=1e-4), step


def assert_early_corruption_trains_as_drawing_at_use(synth, tmp_path, env, monkeypatch, settings) -> Trainer:
    """Train with ``settings`` twice, with the trainer's early corruption (``Trainer._prefetch``) and drawing
    every micro-batch when it is used: every step's loss must be the same. Returns the first trainer."""
    early = trainer(synth, tmp_path / "early", env, **settings)
    early_summary = early.fit()
    monkeypatch.setattr(Trainer, "_prefetch", lambda self, step, micro: None)
    at_use = run(synth, tmp_path / "at_use", env, **settings)
    a, b = (read_scalars(s["tensorboard_dir"], "train/loss") for s in (early_summary, at_use))
    assert sorted(a) == list(range(1, settings["train.max_steps"] + 1))
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), step
    return early


@pytest.mark.parametrize("accum", [1, 2])
def test_early_corruption_trains_exactly_as_drawing_at_use(synth_dir, tmp_path, dist_env, monkeypatch, accum):
    """The trainer corrupts the next micro-batch before the optimiser step (``Trainer._prefetch``). Across a
    P-POTS refit (every 2 steps here) the draw must wait for the new p(t)."""
    settings = {"variance.t_sampler": {"name": "ppots", "x0": 2, "bins": 8, "masks": 2, "refit_every": 2},
                "variance.masks": "mirror",
                "train.grad_accum": accum, "train.max_steps": 6, "train.warmup_steps": 2}
    assert_early_corruption_trains_as_drawing_at_use(synth_dir, tmp_path, dist_env, monkeypatch, settings)


def test_early_corruption_waits_for_mirror_auto_decisions(synth_dir, tmp_path, dist_env, monkeypatch):
    """``variance.masks: auto`` with decisions forced to alternate at every pooling (every 2 steps): a switch
    changes the masks and the sequences per micro-batch of the next step, so the trainer must not corrupt that
    step's first micro-batch before the decision (``VarianceMonitor.changes_after``)."""
    from mdm_scale.diffusion.online_variance import VarianceMonitor

    monkeypatch.setattr(VarianceMonitor, "_decide", lambda self, report: not self.mirror_on)
    settings = {"variance.masks": "auto", "variance.monitor.every": 2, "variance.probe.every": 1,
                "variance.probe.fraction": 0.5, "train.max_steps": 6, "train.zero_stage": 0}
    early = assert_early_corruption_trains_as_drawing_at_use(synth_dir, tmp_path, dist_env, monkeypatch, settings)
    assert early.service(VarianceMonitor).decisions == [(2, True), (4, False), (6, True)]
