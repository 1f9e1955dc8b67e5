"""Causal LMs of families transformers ships (LLaMA, Qwen2, Qwen3) as ``model.path``: read into the built-in
model class, they compute the transformers model exactly while causal, and the adaptation to diffusion is
bidirectional attention plus the shifted reading of the logits (as Dream was made from Qwen2.5). Tiny random
models from transformers' own config classes; nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch
from test_model_sources import no_mask_tokenizer, synth_texts
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from conftest import read_scalars, tiny_overrides
from mdm_scale.cli import main
from mdm_scale.config.loader import load_config
from mdm_scale.config.schema import ConfigError
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion
from mdm_scale.models.native import load_native, native_config, native_format
from mdm_scale.training.trainer import Trainer

SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig, {"rope_theta": 10000.0}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {"rope_theta": 1e6, "tie_word_embeddings": True}),  # q/k/v biases
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, {"head_dim": 16}),  # q/k norms; head_dim != hidden / heads
}


def causal_lm(family: str, path, vocab: int = 96, **extra):
    """A random transformers causal LM saved at ``path``; norms and biases perturbed, so dropping one shows."""
    cls, config_cls, settings = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config_cls(vocab_size=vocab, **SHAPE, **settings, **extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(path))
    return model


def converted(path, objective: str = "mdm", causal: bool | None = None) -> MDMForMaskedDiffusion:
    config = native_config(path, native_format(path), objective)
    if causal is not None:
        config.causal = causal
    return load_native(path, config).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_converted_model_computes_the_causal_lm_and_its_adaptation(family, tmp_path):
    hf = causal_lm(family, tmp_path)
    x = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw = hf(x).logits
        as_arm = converted(tmp_path, "arm")(x).logits
        adapted_causal = converted(tmp_path, causal=True)(x).logits
    assert torch.allclose(as_arm, raw, atol=1e-5)  # ARM objective: the causal LM itself
    assert torch.allclose(adapted_causal, torch.cat([raw[:, :1], raw[:, :-1]], 1), atol=1e-5)  # shifted reading
    adapted = converted(tmp_path)
    assert not adapted.config.causal and adapted.config.logit_shift
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 96
    with torch.no_grad():
        moved = (adapted(x).logits - adapted(y).logits)[:, 1].abs().amax()
        moved_causal = (hf(x).logits - hf(y).logits)[:, 0].abs().amax()
    assert moved > 1e-3 and moved_causal == 0  # position 1 reads state 0, which now sees the last token


def test_adapted_qwen2_trains_with_an_added_mask_token_and_exports(synth_dir, tmp_path, dist_env, capsys):
    """``model.mask_token_id: add`` on a tokenizer without [MASK] whose size is the model's vocabulary: the
    token is added (id = the old size), the tied embedding gets one row, the mean of the others; ZeRO-3 trains
    it as stage 0 does (the tied parameter gets the gradients of both its uses); the export is the built-in
    format (an adapted model is no longer a causal LM) and gives the run's logits."""
    tokenizer = no_mask_tokenizer(synth_texts(synth_dir))
    vocab = len(tokenizer)
    model_dir = tmp_path / "qwen2"
    hf = causal_lm("qwen2", model_dir, vocab=vocab)
    tokenizer.save_pretrained(str(model_dir))
    settings = {"model.path": str(model_dir), "data.tokenizer": str(model_dir), "train.max_steps": 3}
    with pytest.raises(ConfigError, match="no \\[MASK\\] token: .* or to 'add' to add a \\[MASK\\] token"):
        Trainer(load_config([], tiny_overrides(synth_dir, tmp_path / "refused", **settings)), dist_env)
    t = Trainer(load_config([], tiny_overrides(synth_dir, tmp_path / "run", **settings,
                                               **{"model.mask_token_id": "add"})), dist_env)
    assert t.mask_token_id == vocab and t.data.tokenizer.mask_token == "<|mask|>"
    import deepspeed

    module = t.engine.module
    assert module.lm_head.weight is module.model.embed_tokens.weight  # tied: one parameter
    with deepspeed.zero.GatheredParameters([module.model.embed_tokens.weight]):
        embed = module.model.embed_tokens.weight.detach().clone()
    source = hf.model.embed_tokens.weight.detach()
    assert embed.shape[0] == vocab + 1 and torch.equal(embed[:vocab], source)
    assert torch.allclose(embed[vocab], source.mean(0), atol=1e-7)
    losses = read_scalars(t.fit()["tensorboard_dir"], "train/loss")
    plain = Trainer(load_config([], tiny_overrides(synth_dir, tmp_path / "zero0", **settings, **{
        "model.mask_token_id": "add", "train.zero_stage": 0})), dist_env).fit()
    for step, loss in read_scalars(plain["tensorboard_dir"], "train/loss").items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    assert json.loads((tmp_path / "run" / "tokenizer" / "tokenizer_config.json").read_text())["mask_token"] == \
        "<|mask|>"

    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "mdm_scale" and config["logit_shift"] and config["tie_word_embeddings"]
    from mdm_scale.generation.model_source import load_generation_model

    ids = torch.randint(0, vocab + 1, (2, 9), generator=torch.Generator().manual_seed(0))
    run, export = (load_generation_model(p, torch.device("cpu"), torch.float32)
                   for p in (tmp_path / "run", tmp_path / "export"))
    with torch.no_grad():
        assert torch.equal(run.model(input_ids=ids).logits, export.model(input_ids=ids).logits)


@pytest.mark.parametrize("family, extra, field", [
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, "rope_parameters"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, "use_sliding_window"),
])
def test_what_the_class_does_not_compute_is_refused_naming_the_field(family, extra, field, tmp_path):
    causal_lm(family, tmp_path, **extra)
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json: '{field}' = .* is not supported"):
        native_config(tmp_path, native_format(tmp_path))
