"""The optimizer step (``training/optimizer``): ``train.optimizer: fused`` updates parameters as torch's AdamW with
the same decay groups, clipping and schedule, through the real DeepSpeed engine at every ZeRO stage; a stage-0
checkpoint resumes at stages 2 and 3; ``train.zero_stage: auto`` picks the stage that fits and can resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import final_summary, read_scalars, run_deepspeed, tiny_overrides
from mdm_scale.config.deepspeed_json import build_deepspeed_config
from mdm_scale.config.loader import load_config
from mdm_scale.training.checkpoint import MANIFEST, CheckpointError, CheckpointManager
from mdm_scale.training.lr_schedule import lr_factor
from mdm_scale.training.optimizer.engine import initialize_engine
from mdm_scale.training.optimizer.flat_adamw import INNER_STATE, MASTERS, FlatAdamW
from mdm_scale.training.optimizer.groups import param_groups
from mdm_scale.training.optimizer.universal import MOMENTS, stage0_parameter_states
from mdm_scale.training.trainer import Trainer

QUICKSTART = "configs/quickstart.yaml"
BATCH, VOCAB = 8, 32
LOSS_SCALES = (1.0, 8.0, 0.05, 3.0)
"""Per-step loss factors: gradient norms far apart, some clipped and some not, so that the clipping changes what
Adam does (clipping every step by about the same factor would cancel in m / sqrt(v))."""
TRAIN = {"train.optimizer": "fused", "train.lr": 0.02, "train.weight_decay": 0.3, "train.grad_clip": 0.5,
         "train.adam_beta2": 0.95, "train.adam_eps": 1e-8, "train.warmup_steps": 2,
         "train.max_steps": len(LOSS_SCALES), "train.lr_schedule": "cosine", "train.micro_batch_size": BATCH}


class Toy(nn.Module):
    """Matrices (decayed), vectors (norm weight and bias, not decayed) and a frozen matrix (never updated)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.norm = nn.LayerNorm(16)
        self.frozen = nn.Linear(16, 16, bias=False).requires_grad_(False)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, x, y):
        h = self.head(self.norm(self.frozen(self.embed(x))).relu())
        return nn.functional.cross_entropy(h.reshape(-1, VOCAB), y.reshape(-1))


def batches(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (BATCH, 6), generator=g), torch.randint(0, VOCAB, (BATCH, 6), generator=g),
             scale) for scale in LOSS_SCALES]


def torch_adamw(model: Toy, cfg) -> dict[str, torch.Tensor]:
    """The reference: plain torch AdamW, the same groups, clip_grad_norm_ before each step, the same schedule."""
    t = cfg.train
    groups = [{"params": [model.embed.weight, model.head.weight], "weight_decay": t.weight_decay},
              {"params": [model.norm.weight, model.norm.bias, model.head.bias], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, t))
    for x, y, scale in batches():
        (scale * model(x, y)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        schedule.step()
        opt.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def engine_adamw(model: Toy, cfg) -> dict[str, torch.Tensor]:
    import deepspeed

    engine = initialize_engine(model, cfg, build_deepspeed_config(cfg, world_size=1, on_gpu=False), on_gpu=False)
    for x, y, scale in batches():
        engine.backward(scale * engine(x, y))
        engine.step()
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone().reshape(getattr(p, "ds_shape", p.shape)) for name, p in params.items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fused_step_updates_parameters_as_torch_adamw(stage, dist_env):
    """Four steps of the real engine (fp32, CPU) with ``train.optimizer: fused`` leave every parameter where torch's
    AdamW leaves it with the same decay groups, clipping (active: the norms exceed 0.5) and warm-up + cosine
    schedule; the frozen matrix does not move. Tolerance: float rounding of two formulas of the same update."""
    cfg = load_config([QUICKSTART], [f"{k}={v}" for k, v in {**TRAIN, "train.zero_stage": stage}.items()])
    torch.manual_seed(0)
    reference = Toy()
    ours = Toy()
    ours.load_state_dict(reference.state_dict())
    initial = {name: p.detach().clone() for name, p in reference.named_parameters()}
    expected, got = torch_adamw(reference, cfg), engine_adamw(ours, cfg)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = {name: (expected[name] - p).abs().max().item() for name, p in initial.items()}
    assert moved.pop("frozen.weight") == 0 and min(moved.values()) > 1e-3, moved  # the others moved


def test_fused_stage3_step_on_one_rank_updates_the_gathered_parameters_in_place(dist_env):
    """On one rank at ZeRO-3 every parameter is persistent (``config/deepspeed_json.py``) and, gathered, views its
    own partition, so the fused step writes the parameters the next forward reads: from the second step on (the
    first forward, which records DeepSpeed's module trace, releases some) it releases none before the update
    (DeepSpeed's step releases all and gathers them again after it). The stage-3 case of the equivalence with
    torch's AdamW above shows that the forwards read the new values."""
    cfg = load_config([QUICKSTART], [f"{k}={v}" for k, v in {**TRAIN, "train.zero_stage": 3}.items()])
    torch.manual_seed(0)
    engine = initialize_engine(Toy(), cfg, build_deepspeed_config(cfg, world_size=1, on_gpu=False), on_gpu=False)
    offload = engine.optimizer.parameter_offload
    releases = []
    release_all = offload.partition_all_parameters
    offload.partition_all_parameters = lambda: (releases.append(engine.global_steps), release_all())
    for x, y, scale in batches():
        engine.backward(scale * engine(x, y))
        engine.step()
        assert engine.was_step_applied()
        for p in engine.module.parameters():
            assert p.ds_persist and p.data_ptr() == p.ds_tensor.data_ptr()
    assert releases == [0]


@pytest.mark.parametrize("stage", [2, 3])
def test_fused_step_in_bf16_leaves_the_same_parameters_as_deepspeeds_step(stage, dist_env):
    """With bf16 parameters and gradients (DeepSpeed's bf16 mode, on CPU), the fused ZeRO step keeps fp32 master
    weights and moments and writes the same bf16 parameters as DeepSpeed's own step, bit for bit."""
    import deepspeed

    final = {}
    for optimizer in ("deepspeed", "fused"):
        overrides = {**TRAIN, "train.zero_stage": stage, "train.optimizer": optimizer, "train.precision": "bf16"}
        cfg = load_config([QUICKSTART], [f"{k}={v}" for k, v in overrides.items()])
        torch.manual_seed(0)
        engine = initialize_engine(Toy(), cfg, build_deepspeed_config(cfg, world_size=1, on_gpu=False), on_gpu=False)
        for x, y, scale in batches():
            engine.backward(scale * engine(x, y))
            engine.step()
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            final[optimizer] = [p.detach().clone() for p in params]
    assert all(p.dtype == torch.bfloat16 for p in final["fused"])
    for theirs, ours in zip(final["deepspeed"], final["fused"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fused_step_skips_a_nonfinite_step(stage, dist_env):
    """A NaN loss: no parameter moves, ``was_step_applied()`` is False (the trainer's non-finite guard counts it),
    the learning-rate schedule stays and the reported norm is infinite; the next finite step applies."""
    cfg = load_config([QUICKSTART], [f"{k}={v}" for k, v in {**TRAIN, "train.zero_stage": stage}.items()])
    torch.manual_seed(0)
    engine = initialize_engine(Toy(), cfg, build_deepspeed_config(cfg, world_size=1, on_gpu=False), on_gpu=False)
    x, y, _ = batches()[0]

    def snapshot() -> torch.Tensor:
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([p.detach().reshape(-1).clone() for p in params])

    before, lr = snapshot(), engine.get_lr()
    engine.backward(engine(x, y) * float("nan"))
    engine.step()
    assert not engine.was_step_applied() and engine.get_global_grad_norm() == float("inf")
    assert torch.equal(snapshot(), before) and engine.get_lr() == lr
    engine.backward(engine(x, y))
    engine.step()
    assert engine.was_step_applied() and not torch.equal(snapshot(), before) and engine.get_lr() != lr


def test_stage0_checkpoints_use_the_layout_of_deepspeeds_bf16_optimizer(dist_env):
    """``FlatAdamW`` reads the state dict of DeepSpeed's bf16 stage-0 optimizer (``FP16_Optimizer``, built here
    around torch's AdamW on CPU; on GPU it wraps FusedAdam), and the universal conversion splits that layout into
    the right parameters: each name gets its slice of the group's flat master weights and moments."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    torch.manual_seed(0)
    model = Toy().to(torch.bfloat16)
    groups = param_groups(model, 0.1)
    theirs = FP16_Optimizer(torch.optim.AdamW([g.as_torch() for g in groups], lr=0.01),
                            low_precision_dtype=torch.bfloat16, clip_grad=0.5)
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    theirs.step()  # non-zero moments
    saved = theirs.state_dict()
    states, hyper = stage0_parameter_states(saved, model.state_dict(), [g.names for g in groups])
    assert [h["weight_decay"] for h in hyper] == [0.1, 0.0]
    for index, group in enumerate(groups):
        inner, offset = saved[INNER_STATE]["state"][index], 0
        for name, p in zip(group.names, group.params):
            piece = {"fp32": saved[MASTERS][index], **{key: inner[key] for key in MOMENTS}}
            for key, flat_tensor in piece.items():
                torch.testing.assert_close(states[name][key], flat_tensor[offset:offset + p.numel()].view_as(p))
            assert states[name]["step"] == int(inner["step"]) == 2  # FP16_Optimizer's first step initialises
            offset += p.numel()
    ours = FlatAdamW([g.as_torch() for g in groups], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                     max_grad_norm=0.5)
    ours.load_state_dict(saved)
    for master, state, saved_master, saved_state in zip(ours.masters, ours.state_dict()[INNER_STATE]["state"].values(),
                                                        saved[MASTERS], saved[INNER_STATE]["state"].values()):
        torch.testing.assert_close(master, saved_master, rtol=0, atol=0)
        for key in MOMENTS:
            torch.testing.assert_close(state[key], saved_state[key], rtol=0, atol=0)


def tiny_trainer(synth, out, env, **overrides) -> Trainer:
    return Trainer(load_config([QUICKSTART], tiny_overrides(synth, out, **overrides)), env)


@pytest.mark.parametrize("optimizer, saved, resumed", [("fused", 0, 3), ("deepspeed", 0, 2), ("fused", 2, 2)])
def test_checkpoint_resumes_exactly_at_another_or_the_same_stage(synth_dir, tmp_path, dist_env, optimizer, saved,
                                                                 resumed):
    """A checkpoint saved at step 3 and resumed continues as the uninterrupted run of the saving stage: the same
    losses and held-out loss up to float rounding. A stage-0 checkpoint (flat optimizer state with ``fused``, one
    state per parameter with DeepSpeed's fp32 optimizer) resumed at ZeRO stage 2 or 3 goes through the universal
    layout, and each group keeps its own weight decay (DeepSpeed's stage-3 universal load would give the norms the
    matrices' decay); the fused ZeRO-2 step's own checkpoint loads directly."""
    common = {"train.optimizer": optimizer, "train.max_steps": 6, "train.warmup_steps": 2, "train.weight_decay": 0.1}
    straight = tiny_trainer(synth_dir, tmp_path / "straight", dist_env, **common, **{"train.zero_stage": saved}).fit()
    interrupted = tiny_trainer(synth_dir, tmp_path / "split", dist_env, **common, **{"train.zero_stage": saved})
    for _ in range(3):
        interrupted.train_step()
    interrupted.save()
    again = tiny_trainer(synth_dir, tmp_path / "split", dist_env, **common, **{"train.zero_stage": resumed})
    universal = (tmp_path / "split" / "checkpoints" / "step_00000003" / "universal").is_dir()
    assert again.step == 3 and universal == (saved != resumed)
    assert [g["weight_decay"] for g in again.engine.optimizer.param_groups] == [0.1, 0.0]
    summary = again.fit()
    a, b = (read_scalars(s["tensorboard_dir"], "train/loss") for s in (straight, summary))
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    assert summary["eval_loss"] == pytest.approx(straight["eval_loss"], rel=1e-5)


def test_zero_checkpoints_are_refused_at_stage_0_and_converted_when_stage_or_world_changes(tmp_path, dist_env):
    """What loading needs, decided before any model is built: nothing from stage 0 to stage 0 (any world size) or
    at the same stage and world size; the universal layout when either changes; an error for stages 1-3 at 0."""
    manager, path = CheckpointManager(tmp_path, dist_env, 1), tmp_path / "step_00000003"
    path.mkdir()
    universal = {"checkpoint": {"load_universal": True}}

    def written(stage: int, world: int) -> Path:
        (path / MANIFEST).write_text(json.dumps({"zero_stage": stage, "world_size": world}))
        return path

    assert manager.load_settings(written(0, 4), 0) == {}
    assert manager.load_settings(written(0, 1), 2) == universal
    assert manager.load_settings(written(2, 1), 2) == {}
    assert manager.load_settings(written(2, 1), 3) == universal
    assert manager.load_settings(written(3, 2), 3) == universal
    with pytest.raises(CheckpointError, match="holds ZeRO stage-2 partitions, which stage 0 cannot load"):
        manager.load_settings(written(2, 1), 0)


@pytest.mark.distributed
def test_stage0_checkpoint_of_one_rank_resumes_on_two_ranks_at_stage_2(synth_dir, tmp_path, dist_env):
    """The move ``train.zero_stage: auto`` makes when a one-GPU run (stage 0) goes on with two GPUs (stage 2): a
    1-rank run (2 accumulated micro-batches) saved at step 3 resumes under the deepspeed launcher on 2 ranks
    (1 micro-batch each: the same global batch, samples and noise) and ends where the uninterrupted 1-rank run
    ends, up to float summation order (all-reduce against accumulation)."""
    run = {"train.optimizer": "fused", "train.max_steps": 6, "train.save_every": 3, "train.keep_last": 2,
           "train.warmup_steps": 2}
    one = tiny_trainer(synth_dir, tmp_path / "one", dist_env, **run,
                       **{"train.zero_stage": 0, "train.grad_accum": 2}).fit()
    out = tmp_path / "two"
    shutil.copytree(tmp_path / "one" / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    for name in ("tokenizer", "run.json"):
        (shutil.copytree if name == "tokenizer" else shutil.copy)(tmp_path / "one" / name, out / name)
    args = ["train", "--config", QUICKSTART]
    for item in tiny_overrides(synth_dir, out, **run, **{"train.zero_stage": 2}):
        args += ["--set", item]
    proc = run_deepspeed(args, ranks=2)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "at ZeRO stage 0 and this run has 2 at stage 2: converting it to a universal checkpoint" in proc.stdout
    two = final_summary(proc.stdout)
    a, b = (read_scalars(s["tensorboard_dir"], "train/loss") for s in (one, two))
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
