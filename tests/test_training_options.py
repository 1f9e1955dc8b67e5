"""Training options of the README that change how a step is computed, not what it computes: activation
checkpointing and ZeRO CPU offload give the same losses and gradients; and the ARM baseline end to end (train,
``mdm-scale eval``, ``mdm-scale variance --methods arm``)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import read_scalars, tiny_overrides
from mdm_scale.config.errors import ConfigError
from mdm_scale.config.loader import load_config
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.loading import HFMaskedLMAdapter, enable_activation_checkpointing
from mdm_scale.models.modeling_mdm import Block, MDMForMaskedDiffusion
from mdm_scale.training.optimizer.engine import require_cpu_adam
from mdm_scale.training.trainer import Trainer

QUICKSTART = "configs/quickstart.yaml"


def loss_and_grads(model, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    positions, targets = torch.tensor([1, 5, 20, 30]), torch.tensor([3, 4, 5, 6])
    loss = model(x, loss_positions=positions, loss_targets=targets, loss_coef=torch.full((4,), 0.5)).loss
    return loss.detach(), [g for g in torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
                           if g is not None]


def test_activation_checkpointing_recomputes_blocks_and_leaves_loss_and_gradients_unchanged(monkeypatch):
    """Same loss and gradients (fp64); with checkpointing every block runs twice per step (the second time in
    the backward pass), without it once."""
    torch.manual_seed(0)
    model = MDMForMaskedDiffusion(MDMConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4)).double().train()
    x = torch.randint(0, 40, (2, 16))
    calls, forward = [], Block.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Block, "forward", counted)
    plain = loss_and_grads(model, x)
    assert len(calls) == 2
    enable_activation_checkpointing(model)
    calls.clear()
    checkpointed = loss_and_grads(model, x)
    assert len(calls) == 4
    assert torch.equal(plain[0], checkpointed[0])
    for a, b in zip(plain[1], checkpointed[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_activation_checkpointing_of_a_hugging_face_masked_lm(synth_dir):
    from transformers import BertConfig, BertForMaskedLM

    from mdm_scale.data.tokenizer import build_char_tokenizer
    from mdm_scale.models.loading import build_model

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)).double().train()
    adapter = HFMaskedLMAdapter(bert)
    x = torch.randint(0, 40, (2, 16))
    plain = loss_and_grads(adapter, x)
    enable_activation_checkpointing(adapter)
    assert bert.is_gradient_checkpointing
    checkpointed = loss_and_grads(adapter, x)
    assert torch.equal(plain[0], checkpointed[0])
    for a, b in zip(plain[1], checkpointed[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # model.activation_checkpointing reaches the built model
    cfg = load_config([QUICKSTART], tiny_overrides(synth_dir, synth_dir / "unused",
                                                    **{"model.activation_checkpointing": True}))
    tokenizer = build_char_tokenizer(["abc"])
    built = build_model(cfg, tokenizer, tokenizer.mask_token_id, None, {"zero_optimization": {"stage": 0}}, 0)
    assert built.model.checkpointed_blocks == len(built.model.layers) > 0


def test_cpu_offload_of_optimizer_and_parameters_trains_like_no_offload(synth_dir, tmp_path, dist_env):
    """ZeRO-3 with optimizer and parameter offload to CPU (DeepSpeed's CPU Adam) takes the same steps as the
    plain run (torch AdamW) and the same path with activation checkpointing on. Skipped, saying why, on a host
    where DeepSpeed cannot compile its CPU Adam op (the next test covers the run's message there)."""
    offload = {"train.offload_optimizer": True, "train.offload_params": True, "model.activation_checkpointing": True}
    configs = {name: load_config([QUICKSTART], tiny_overrides(synth_dir, tmp_path / name, **extra,
                                                              **{"train.max_steps": 4}))
               for name, extra in (("plain", {}), ("offload", offload))}
    try:
        require_cpu_adam(configs["offload"])
    except ConfigError as err:
        pytest.skip(str(err))
    losses = {}
    for name, cfg in configs.items():
        trainer = Trainer(cfg, dist_env)
        zero = trainer.engine.zero_optimization_stage(), trainer.engine.zero_cpu_offload()
        assert zero == (3, name == "offload")
        losses[name] = read_scalars(trainer.fit()["tensorboard_dir"], "train/loss")
    for step in range(1, 5):
        assert losses["offload"][step] == pytest.approx(losses["plain"][step], rel=1e-5), step
    assert losses["plain"][4] != pytest.approx(losses["plain"][1], rel=1e-2)  # the steps did change the model


def test_optimizer_offload_stops_before_any_build_when_cpu_adam_does_not_compile(synth_dir, tmp_path, dist_env,
                                                                               monkeypatch):
    """A host where DeepSpeed's CPU Adam op does not compile (here a planted compiler error, as DeepSpeed issue
    7556 reports for AVX-512 on some AMD hosts) stops an offloaded run before its data and model are built, with
    one message naming the key and the compiler's error."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    compiler_output = ("Error building extension 'cpu_adam': [1/3] c++ -O3 -march=native -D__AVX512__ ...\n"
                       "simd.h:51:34: error: inlining failed in call to 'always_inline' '_mm512_slli_epi32': "
                       "target specific option mismatch\nninja: build stopped: subcommand failed.")

    def does_not_compile(self, verbose=True):
        raise RuntimeError(compiler_output)

    def built_anyway(*args, **kwargs):
        raise AssertionError("the data was built before the optimizer check")

    monkeypatch.setattr(CPUAdamBuilder, "load", does_not_compile)
    monkeypatch.setattr("mdm_scale.training.trainer.build_data", built_anyway)
    cfg = load_config([QUICKSTART], tiny_overrides(synth_dir, tmp_path / "run", **{"train.offload_optimizer": True}))
    with pytest.raises(ConfigError, match=r"^config key 'train.offload_optimizer' = True: DeepSpeed's CPU Adam op "
                                          r"\(cpu_adam\) does not build on this host \(simd.h:51:34: error: inlining "
                                          r"failed .* target specific option mismatch\)"):
        Trainer(cfg, dist_env)


def test_arm_baseline_trains_evaluates_and_has_only_data_variance(synth_dir, tmp_path, dist_env, capsys):
    from mdm_scale.cli import main
    from mdm_scale.generation.model_source import load_generation_model
    from mdm_scale.generation.sampler import greedy_generate
    from mdm_scale.variance.runner import ToolSettings, run_variance

    run = tmp_path / "arm"
    arm = {"train.objective": "arm", "train.max_steps": 20, "data.response_eos_pad": 24}
    summary = Trainer(load_config([QUICKSTART], tiny_overrides(synth_dir, run, **arm)), dist_env).fit()
    losses = read_scalars(summary["tensorboard_dir"], "train/loss")
    assert sum(losses[s] for s in range(17, 21)) < sum(losses[s] for s in range(1, 5)) - 0.5
    assert json.loads((run / "run.json").read_text())["config"]["train"]["objective"] == "arm"

    data = tmp_path / "eval.jsonl"
    data.write_text("".join((synth_dir / "eval.jsonl").read_text().splitlines(True)[:3]))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", str(data), "--out", str(tmp_path / "pred.jsonl"),
                 "--gen-length", "12"]) == 0
    predictions = [json.loads(line)["prediction"] for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    gm = load_generation_model(run, torch.device("cpu"), torch.float32)
    assert gm.causal and gm.model.config.causal
    eos = gm.tokenizer.eos_token_id
    for record, prediction in zip(data.read_text().splitlines(), predictions, strict=True):
        prompt = json.loads(record)["prompt"]
        ids = greedy_generate(gm.model, [[*gm.tokenizer(prompt, add_special_tokens=False)["input_ids"]]], 0, eos, 12,
                              torch.device("cpu"))[0].tolist()
        expected = ids[:ids.index(eos)] if eos in ids else ids
        assert prediction == gm.tokenizer.decode(expected)

    settings = ToolSettings(methods=["arm"], num_x0=6, num_t=2, num_masks=2, grad_dim=8)
    cfg = load_config([QUICKSTART], tiny_overrides(synth_dir, tmp_path / "unused", **arm))
    report = run_variance(cfg, settings, tmp_path / "variance" / "report.json", str(run), env=dist_env)
    for quantity in ("loss", "grad"):
        terms = report["methods"]["arm"][quantity]
        assert (terms["A"], terms["B"]) == (0.0, 0.0), quantity  # no masking pattern, no masking rate
        assert terms["C"] == pytest.approx(terms["direct"], rel=1e-9) and terms["C"] > 0, quantity
