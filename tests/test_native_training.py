"""LLaDA and Dream checkpoints as ``model.path`` of a run: training in this process (ZeRO-3, the masked-only
head, P-POTS + MIRROR with the online probe, packing, selective checkpointing, bf16), exact resume, generation,
export back to the source format, the [MASK] id, and one 2-rank ZeRO-3 load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_scalars, run_deepspeed, tiny_overrides
from mdm_scale.cli import main
from mdm_scale.config.loader import load_config
from mdm_scale.config.schema import ConfigError
from mdm_scale.data.tokenizer import build_char_tokenizer
from mdm_scale.generation.model_source import load_generation_model
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion
from mdm_scale.models.native import load_native, native_config, native_format
from mdm_scale.training.trainer import Trainer

CPU = torch.device("cpu")


def trainer(synth, out, env, fixture, **overrides) -> Trainer:
    settings = {"model.path": str(fixture), "model.mask_token_id": 500, **overrides}
    return Trainer(load_config([], tiny_overrides(synth, out, **settings)), env)


def load_directory(directory) -> MDMForMaskedDiffusion:
    return load_native(directory, native_config(directory, native_format(directory))).eval()


def fixture_of(name, llada_fixture, dream_fixture):
    return llada_fixture if name == "llada" else dream_fixture


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_export_of_an_untouched_checkpoint_is_that_checkpoint(name, llada_fixture, dream_fixture, synth_dir,
                                                              tmp_path, capsys):
    """``mdm-scale export`` of a LLaDA / Dream directory writes the same format back: the same config.json (its
    auto_map included) and generation_config.json, the same tensor names, shapes and values, so the release's own
    code loads it as it loads the original (its strict ``load_state_dict`` saw exactly these tensors)."""
    fixture = fixture_of(name, llada_fixture, dream_fixture)
    source = tmp_path / "source"
    shutil.copytree(fixture, source)
    build_char_tokenizer([(synth_dir / "train.jsonl").read_text()]).save_pretrained(str(source))
    assert main(["export", "--checkpoint", str(source), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    for file in ("config.json", "generation_config.json"):
        assert json.loads((out / file).read_text()) == json.loads((fixture / file).read_text()), file
    written, original = load_file(str(out / "model.safetensors")), load_file(str(fixture / "model.safetensors"))
    assert sorted(written) == sorted(original)
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor), key


def test_dream_trains_generates_and_exports_back_to_its_format(dream_fixture, synth_dir, tmp_path, dist_env, capsys):
    """A few ZeRO-3 steps of P-POTS + MIRROR with the online probe on every step; the run decodes; its export is
    Dream's format with the checkpoint's weights: reloaded, it gives the checkpoint's logits."""
    run = tmp_path / "run"
    t = trainer(synth_dir, run, dist_env, dream_fixture, **{
        "train.max_steps": 4, "variance.t_sampler": {"name": "ppots", "x0": 2, "masks": 2, "refit_every": 2},
        "variance.masks": "mirror", "variance.monitor.every": 2, "variance.probe": {"every": 1, "fraction": 0.5}})
    assert type(t.engine.module) is MDMForMaskedDiffusion and t.engine.module.config.logit_shift
    summary = t.fit()
    losses = read_scalars(summary["tensorboard_dir"], "train/loss")
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert len(read_scalars(summary["tensorboard_dir"], "variance/A")) == 2  # the probe ran and was pooled

    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "Mia has 3 shells.", "--gen-length", "4",
                 "--steps", "4", "--block-length", "4"]) == 0
    assert "prediction" in json.loads(capsys.readouterr().out.splitlines()[-1])

    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 0
    export = tmp_path / "export"
    assert json.loads((export / "config.json").read_text()) == json.loads((dream_fixture / "config.json").read_text())
    assert sorted(load_file(str(export / "model.safetensors"))) == sorted(
        load_file(str(dream_fixture / "model.safetensors")))
    gm = load_generation_model(run, CPU, torch.float32)
    ids = load_file(str(dream_fixture / "reference.safetensors"))["input_ids"]
    with torch.no_grad():
        expected = gm.model(input_ids=ids).logits
        assert not torch.allclose(expected, load_directory(dream_fixture)(ids).logits)  # training moved it
    assert torch.equal(load_directory(export)(ids).logits, expected)


def test_native_resume_continues_exactly(dream_fixture, synth_dir, tmp_path, dist_env):
    """Dream (shifted logits) with MIRROR on packed rows, interrupted after 3 of 6 steps."""
    common = {"train.grad_accum": 2, "variance.masks": "mirror", "train.max_steps": 6, "train.warmup_steps": 2,
              "data.packing": True}
    straight = trainer(synth_dir, tmp_path / "straight", dist_env, dream_fixture, **common).fit()
    interrupted = trainer(synth_dir, tmp_path / "split", dist_env, dream_fixture, **common)
    for _ in range(3):
        interrupted.train_step()
    interrupted.save()
    resumed = trainer(synth_dir, tmp_path / "split", dist_env, dream_fixture, **common).fit()
    a = read_scalars(straight["tensorboard_dir"], "train/loss")
    b = read_scalars(resumed["tensorboard_dir"], "train/loss")
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-6)


def test_bf16_packing_and_selective_checkpointing_on_a_native_model(llada_fixture, synth_dir, tmp_path, dist_env):
    """ZeRO-3 builds the model in bf16: the loaded weights are the checkpoint's cast to bf16; packed rows and
    one recomputed block of two train it."""
    t = trainer(synth_dir, tmp_path / "run", dist_env, llada_fixture, **{
        "train.precision": "bf16", "data.packing": True, "model.activation_checkpointing": True,
        "model.checkpoint_blocks": 1, "train.max_steps": 2})
    module = t.engine.module
    assert module.model.checkpointed_blocks == 1
    source = load_file(str(llada_fixture / "model.safetensors"))
    embed = module.model.embed_tokens.weight
    import deepspeed

    with deepspeed.zero.GatheredParameters([embed]):
        assert embed.dtype == torch.bfloat16
        assert torch.equal(embed, source["model.transformer.wte.weight"].to(torch.bfloat16))
    losses = read_scalars(t.fit()["tensorboard_dir"], "train/loss")
    assert all(torch.isfinite(torch.tensor(list(losses.values()))))


def test_mask_id_of_the_model_config_and_of_the_tokenizer(llada_fixture, synth_dir, tmp_path, dist_env):
    """The checkpoint's mask_token_id (500) against a tokenizer whose own mask token is another id: refused
    until model.mask_token_id says which one to train with; an id past the model's rows is refused."""
    from mdm_scale.models.loading import load_hf_config, resolve_mask_token_id, sized_native_config

    tokenizer = build_char_tokenizer([(synth_dir / "train.jsonl").read_text()])
    cfg = load_config([], tiny_overrides(synth_dir, tmp_path, **{"model.path": str(llada_fixture)}))
    with pytest.raises(ConfigError, match=r"mask token \(id 2, .*differs from the model's mask_token_id 500"):
        resolve_mask_token_id(cfg, tokenizer, load_hf_config(cfg))
    for choice in (500, 2):
        cfg = load_config([], tiny_overrides(synth_dir, tmp_path, **{"model.path": str(llada_fixture),
                                                                     "model.mask_token_id": choice}))
        assert resolve_mask_token_id(cfg, tokenizer, load_hf_config(cfg)) == choice
    with pytest.raises(ConfigError, match=r"\[MASK\] id 600 .* outside the 512 embedding rows"):
        sized_native_config(load_hf_config(cfg), 600)


def test_parameters_of_a_native_checkpoint_are_counted_before_loading(llada_fixture, synth_dir, tmp_path):
    """``train.zero_stage: auto`` sizes the model before any weight is read: the fixture has 172,352."""
    from mdm_scale.models.loading import count_parameters, load_hf_config

    tokenizer = build_char_tokenizer([(synth_dir / "train.jsonl").read_text()])
    cfg = load_config([], tiny_overrides(synth_dir, tmp_path, **{"model.path": str(llada_fixture)}))
    assert count_parameters(cfg, tokenizer, 500, load_hf_config(cfg)) == 172_352


@pytest.mark.distributed
def test_two_rank_zero3_load_partitions_every_parameter_and_only_rank_0_reads(llada_fixture, synth_dir, tmp_path):
    proc = run_deepspeed([str(tmp_path), str(synth_dir), str(llada_fixture)], ranks=2,
                         script="tests/native_zero3_worker.py")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert len(ranks[0]["reads"]) == 21 and ranks[1]["reads"] == []  # the fixture's 21 tensors, by rank 0 alone
    for name, (local, full) in ranks[1]["partitions"].items():
        assert 2 * local - 2 < full, (name, local, full)  # each rank holds half (rounded up), never the whole
    single = load_directory(llada_fixture)
    for name, tensor in single.state_dict().items():
        for rank in ranks:
            assert torch.equal(rank["weights"][name], tensor), name
    reference = load_file(str(llada_fixture / "reference.safetensors"))["logits"]
    for rank in ranks:
        assert (rank["logits"] - reference).abs().max() <= 1e-5
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in ranks)  # and a step trains
