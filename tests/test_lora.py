"""LoRA (``model.lora``, ``models/lora.py``): only the adapters train, a run resumes exactly, ``mdm-scale export``
merges them into weights with the adapted model's logits (or writes a PEFT adapter directory), and an unknown
target module fails before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import final_summary, read_scalars, run_deepspeed, tiny_overrides
from mdm_scale.config.loader import load_config
from mdm_scale.config.schema import ConfigError
from mdm_scale.generation.export import export_checkpoint
from mdm_scale.generation.model_source import load_generation_model
from mdm_scale.models.loading import build_model
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion
from mdm_scale.training.run_reader import consolidated_state_dict
from mdm_scale.training.trainer import Trainer

LORA = {"model.lora.rank": 4, "model.lora.alpha": 8.0, "train.lr": 1e-2}


def trainer(synth, out, env, **overrides) -> Trainer:
    return Trainer(load_config(["configs/quickstart.yaml"], tiny_overrides(synth, out, **overrides)), env)


def initial_weights(t: Trainer) -> dict[str, torch.Tensor]:
    """The run's initial weights: the built-in model and its adapters are drawn from the seed alone, the same at
    every ZeRO stage, so a stage-0 build reproduces them."""
    model = build_model(t.cfg, t.data.tokenizer, t.mask_token_id, None, {"zero_optimization": {"stage": 0}}, t.cfg.seed)
    return {name: p.detach().float() for name, p in model.named_parameters()}


@pytest.mark.parametrize("stage", [0, 3])
def test_only_the_adapters_train_and_the_loss_falls(synth_dir, tmp_path, dist_env, stage):
    t = trainer(synth_dir, tmp_path / "run", dist_env, **LORA, **{"train.zero_stage": stage, "train.max_steps": 12})
    before, eval_before = initial_weights(t), t.evaluate()
    adapters = {n for n in before if ".lora_A." in n or ".lora_B." in n}
    assert adapters and all(".base_layer." in n or n in adapters or "lora" not in n for n in before)
    opt = t.engine.optimizer  # ZeRO-3: the parameters it keeps fp32 states of; stage 0 on CPU: plain AdamW
    optimized = [p for group in getattr(opt, "fp16_groups", [g["params"] for g in opt.param_groups]) for p in group]
    assert sum(getattr(p, "ds_numel", p.numel()) for p in optimized) == sum(before[n].numel() for n in adapters)
    summary = t.fit()
    after = consolidated_state_dict(Path(summary["checkpoint"]))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == adapters
    assert summary["eval_loss"] < eval_before - 0.2, (eval_before, summary["eval_loss"])  # fixed-key held-out loss
    # ZeRO-3 left torch's own linear in place: DeepSpeed's replacement would keep the frozen base layers' inputs,
    # activations the memory plan does not count (deepspeed_json.py, memory_efficient_linear)
    assert torch.nn.functional.linear is torch._C._nn.linear


def test_resume_continues_exactly_with_adapter_dropout_ppots_and_mirror(synth_dir, tmp_path, dist_env):
    """LoRA composes with the variance methods: P-POTS (refit every 2 steps, so its state crosses the checkpoint)
    and MIRROR pairs, with adapter dropout, whose RNG state the checkpoint carries."""
    common = {**LORA, "model.lora.dropout": 0.1, "train.grad_accum": 2, "train.max_steps": 6,
              "variance.t_sampler": {"name": "ppots", "x0": 2, "masks": 2, "refit_every": 2},
              "variance.masks": "mirror", "variance.monitor.every": 2}
    straight = trainer(synth_dir, tmp_path / "straight", dist_env, **common).fit()
    interrupted = trainer(synth_dir, tmp_path / "split", dist_env, **common)
    for _ in range(3):
        interrupted.train_step()
    interrupted.save()
    torch.manual_seed(1234)  # the resumed run must restore the dropout RNG, not depend on the process's
    resumed = trainer(synth_dir, tmp_path / "split", dist_env, **common).fit()
    a = read_scalars(straight["tensorboard_dir"], "train/loss")
    b = read_scalars(resumed["tensorboard_dir"], "train/loss")
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


@pytest.mark.distributed
def test_two_zero3_ranks_draw_the_same_adapters_and_match_one_rank(synth_dir, tmp_path, dist_env):
    """The adapters are injected after the base is partitioned and drawn from the seed alone, whatever the world
    size (DeepSpeed then partitions rank 0's): 2 ZeRO-3 ranks and 1 rank accumulating 2 micro-batches take the
    same steps from the same weights."""
    steps = {**LORA, "train.max_steps": 3, "train.zero_stage": 3, "logging.tensorboard": True}
    args = ["train", "--config", "configs/quickstart.yaml"]
    for item in tiny_overrides(synth_dir, tmp_path / "two", **steps):
        args += ["--set", item]
    proc = run_deepspeed(args, ranks=2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    two = read_scalars(final_summary(proc.stdout)["tensorboard_dir"], "train/loss")
    one = read_scalars(trainer(synth_dir, tmp_path / "one", dist_env, **steps, **{"train.grad_accum": 2}).fit()[
        "tensorboard_dir"], "train/loss")
    assert one[1] == pytest.approx(two[1], rel=1e-5)
    for step in (2, 3):  # float summation order differs slightly (all-reduce vs accumulation)
        assert one[step] == pytest.approx(two[step], rel=1e-3), step


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_merges_adapters_with_the_adapted_models_logits(synth_dir, tmp_path, dist_env):
    run = tmp_path / "run"
    trainer(synth_dir, run, dist_env, **LORA, **{"train.max_steps": 4, "model.lora.modules_to_save": ["lm_head"]}
            ).fit()
    loaded = load_generation_model(run, torch.device("cpu"), torch.float32)
    ids = torch.randint(4, len(loaded.tokenizer), (2, 40))
    merged = MDMForMaskedDiffusion.from_pretrained(str(export_checkpoint(run, tmp_path / "hf")), dtype=torch.float32)
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
    expected = _logits(loaded.model, ids)
    for module in loaded.model.modules():  # the adapters did move: without them the logits differ
        if hasattr(module, "lora_B"):
            module.lora_B["default"].weight.data.zero_()
    assert not torch.allclose(_logits(loaded.model, ids), expected, atol=1e-3)
    torch.testing.assert_close(_logits(merged.eval(), ids), expected, rtol=1e-5, atol=1e-5)


def test_adapter_only_export_loads_with_peft_on_the_base_model(synth_dir, tmp_path, dist_env):
    from peft import PeftModel

    trainer(synth_dir, tmp_path / "base_run", dist_env, **{"train.max_steps": 2}).fit()
    base_dir = export_checkpoint(tmp_path / "base_run", tmp_path / "base")
    run = tmp_path / "lora_run"
    trainer(synth_dir, run, dist_env, **LORA, **{"train.max_steps": 4, "model.path": str(base_dir),
                                                  "data.tokenizer": str(base_dir),
                                                  "model.lora.modules_to_save": ["lm_head"]}).fit()
    adapter_dir = export_checkpoint(run, tmp_path / "adapter", lora_adapter_only=True)
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(MDMForMaskedDiffusion.from_pretrained(str(base_dir)), str(adapter_dir))
    adapted = load_generation_model(run, torch.device("cpu"), torch.float32).model
    ids = torch.randint(4, 40, (2, 30))
    torch.testing.assert_close(_logits(peft_model.eval(), ids), _logits(adapted, ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="no LoRA adapters"):
        export_checkpoint(tmp_path / "base_run", tmp_path / "nothing", lora_adapter_only=True)


def test_unknown_target_module_fails_naming_the_linear_layers(synth_dir, tmp_path, dist_env):
    with pytest.raises(ConfigError, match=r"\['q_proj'\].*down_proj.*gate_up_proj.*o_proj.*qkv_proj"):
        trainer(synth_dir, tmp_path / "run", dist_env, **LORA, **{"model.lora.target_modules": ["q_proj", "o_proj"],
                                                                  "data.train_file": "missing.jsonl"})
