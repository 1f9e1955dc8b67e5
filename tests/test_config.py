"""Config loading: unknown keys, wrong types and ranges, batch arithmetic, DeepSpeed JSON, LR schedule."""

from __future__ import annotations

import math

import pytest
import yaml

from conftest import REPO
from mdm_scale.config.deepspeed_json import build_deepspeed_config
from mdm_scale.config.loader import check_batch_arithmetic, leaves, load_config
from mdm_scale.config.schema import ConfigError, TrainConfig
from mdm_scale.training.lr_schedule import lr_factor

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")  # any working directory
SHIPPED_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def test_quickstart_config_loads_with_overrides():
    cfg = load_config([QUICKSTART], ["train.lr=1e-4", "variance.mirror=true", "model.overrides={num_hidden_layers: 3}"])
    assert cfg.train.lr == 1e-4 and cfg.variance.mirror is True
    assert cfg.model.overrides == {"num_hidden_layers": 3}
    assert cfg.train.max_steps == 300  # untouched keys keep the file's value


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step' \(did you mean 'train.max_steps'\?\)"):
        load_config([QUICKSTART], ["train.max_step=10"])
    with pytest.raises(ConfigError, match=r"unknown config key 'variance.t_sampeler'.*'variance.t_sampler'"):
        load_config([], ["variance.t_sampeler=uniform"])


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  trian_file: x.jsonl\n")
    with pytest.raises(ConfigError, match=r"'data.trian_file' \(did you mean 'data.train_file'\?\)"):
        load_config([path])


@pytest.mark.parametrize("item, message", [
    ("train.max_steps=ten", r"'train.max_steps' = 'ten': expected an integer"),
    ("train.max_steps=1.5", r"'train.max_steps' = 1.5: expected an integer"),
    ("train.lr=fast", r"'train.lr' = 'fast': expected a number"),
    ("variance.mirror=1", r"'variance.mirror' = 1: expected true or false, or one of \['auto'\]$"),
    ("variance.mirror=maybe", r"'variance.mirror' = 'maybe': expected true or false, or one of \['auto'\]$"),
    ("train.zero_stage=fast", r"'train.zero_stage' = 'fast': expected an integer, or one of \['auto'\]$"),
    ("variance.t_sampler=lognormal", r"'variance.t_sampler' = 'lognormal': choose one of"),
    ("train.max_steps=0", r"'train.max_steps' = 0: must be >= 1"),
    ("train.zero_stage=4", r"'train.zero_stage' = 4: must be 0, 1, 2, 3 or auto"),
    ("data.eval_fraction=1.0", r"'data.eval_fraction' = 1.0: must be in \[0, 1\)"),
    ("model.preset=huge", r"'model.preset' = 'huge': choose one of"),
    ("train.offload_params=true", r"'train.offload_params' = True: parameter offload needs train.zero_stage = 3"),
    ("train=3", r"'train' must be a mapping"),
])
def test_bad_values_name_key_and_value(item, message):
    overrides = [item] if not item.startswith("train.offload") else [item, "train.zero_stage=2"]
    with pytest.raises(ConfigError, match=message):
        load_config([QUICKSTART], overrides)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="--set expects key=value"):
        load_config([], ["train.lr"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "nope.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        load_config([broken])


def test_batch_arithmetic_is_checked_against_the_world_size():
    cfg = load_config([QUICKSTART], ["train.micro_batch_size=4", "train.grad_accum=2", "train.global_batch_size=16"])
    assert check_batch_arithmetic(cfg, world_size=2) == 16
    with pytest.raises(ConfigError, match=r"global_batch_size' = 16: it must equal .* x world size \(4\) = 32"):
        check_batch_arithmetic(cfg, world_size=4)


def test_deepspeed_json_is_generated_and_passthrough_wins():
    cfg = load_config([QUICKSTART], ["train.micro_batch_size=3", "train.grad_accum=5", "train.grad_clip=0.5",
                                     "deepspeed={zero_optimization: {stage3_prefetch_bucket_size: 123}, "
                                     "flops_profiler: {enabled: true}}"])
    ds = build_deepspeed_config(cfg, world_size=2, on_gpu=False)
    assert ds["train_batch_size"] == 30 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 123  # merged over the generated value
    assert ds["flops_profiler"] == {"enabled": True}
    assert ds["bf16"]["enabled"] is False and ds["optimizer"]["params"]["torch_adam"] is True
    gpu = build_deepspeed_config(cfg, world_size=2, on_gpu=True)
    assert gpu["bf16"]["enabled"] is True and gpu["optimizer"]["params"]["torch_adam"] is False


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule_formulas(schedule):
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr_schedule=schedule, min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    end = {"linear": 0.1 + 0.9 * (1 - 99 / 100), "cosine": 0.1 + 0.45 * (1 + math.cos(math.pi * 0.99)),
           "constant": 1.0}[schedule]
    assert lr_factor(109, cfg) == pytest.approx(end)
    midpoint = {"linear": 0.55, "cosine": 0.55, "constant": 1.0}[schedule]
    assert lr_factor(60, cfg) == pytest.approx(midpoint)


def test_the_shipped_configs_are_found_from_any_working_directory():
    assert {"quickstart.yaml", "llada_8b.yaml", "pretrain_1b.yaml"} <= set(SHIPPED_CONFIGS)


@pytest.mark.parametrize("name", SHIPPED_CONFIGS)
def test_every_shipped_config_loads_with_each_of_its_settings(name):
    """Every key the file sets arrives in the typed config with the file's value (none dropped or renamed)."""
    path = REPO / "configs" / name
    cfg = load_config([path])
    settings = leaves(yaml.safe_load(path.read_text()))
    assert settings, name
    for key, value in settings.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, (name, key)


def test_zero_stage_auto_picks_stage_2_only_when_the_model_states_fit():
    from mdm_scale.config.deepspeed_json import choose_zero_stage

    gib = 2**30
    assert choose_zero_stage(1_158_760_448, 1, 140 * gib)[0] == 2  # 1.1B on one H200: 19.4 GiB
    assert choose_zero_stage(8_015_581_184, 1, 140 * gib)[0] == 3  # 8B on one H200: 134 GiB
    assert choose_zero_stage(8_015_581_184, 8, 140 * gib)[0] == 2  # 8B on 8: 2 + 16/8 bytes each = 30 GiB
    assert choose_zero_stage(1_000_000, 1, None)[0] == 3  # CPU
    limit = 70 * gib / 18  # exactly half of 140 GiB at 18 bytes per parameter on one rank
    assert choose_zero_stage(int(limit), 1, 140 * gib)[0] == 2
    assert choose_zero_stage(int(limit) + 1, 1, 140 * gib)[0] == 3
    assert load_config([QUICKSTART], ["train.zero_stage=auto"]).train.zero_stage == "auto"
    with pytest.raises(ConfigError, match="'model.checkpoint_blocks' = 2: needs model.activation_checkpointing"):
        load_config([QUICKSTART], ["model.checkpoint_blocks=2"])
    with pytest.raises(ConfigError, match="'data.packing' = True: packed rows need the mdm objective"):
        load_config([QUICKSTART], ["data.packing=true", "train.objective=arm"])
