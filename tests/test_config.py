"""Config loading: unknown keys, wrong types and ranges, batch arithmetic, DeepSpeed JSON, LR schedule."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import REPO
from mdm_scale.config.deepspeed_json import build_deepspeed_config
from mdm_scale.config.loader import check_batch_arithmetic, leaves, load_config
from mdm_scale.config.schema import ConfigError, TrainConfig
from mdm_scale.config.variance import MirrorMasksConfig
from mdm_scale.training.lr_schedule import lr_factor

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")  # any working directory
SHIPPED_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


def test_quickstart_config_loads_with_overrides():
    cfg = load_config([QUICKSTART], ["train.lr=1e-4", "variance.masks=mirror",
                                     "model.overrides={num_hidden_layers: 3}"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.variance.masks, MirrorMasksConfig)
    assert cfg.model.overrides == {"num_hidden_layers": 3}
    assert cfg.train.max_steps == 300  # untouched keys keep the file's value


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step' \(did you mean 'train.max_steps'\?\)"):
        load_config([QUICKSTART], ["train.max_step=10"])
    with pytest.raises(ConfigError, match=r"unknown config key 'variance.t_sampeler'.*'variance.t_sampler'"):
        load_config([], ["variance.t_sampeler=uniform"])
    with pytest.raises(ConfigError, match=r"unknown config key 'variance.t_sampler.refit_evry' \(did you mean "
                                          r"'variance.t_sampler.refit_every'\?\)"):
        load_config([], ["variance.t_sampler=ppots", "variance.t_sampler.refit_evry=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'variance.t_sampler.bins': variance.t_sampler 'clipped' "
                                          r"has no such field \(set variance.t_sampler.name to ppots\)"):
        load_config([], ["variance.t_sampler=clipped", "variance.t_sampler.bins=3"])


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  trian_file: x.jsonl\n")
    with pytest.raises(ConfigError, match=r"'data.trian_file' \(did you mean 'data.train_file'\?\)"):
        load_config([path])


@pytest.mark.parametrize("item, message", [
    ("train.max_steps=ten", r"'train.max_steps' = 'ten': expected an integer"),
    ("train.max_steps=1.5", r"'train.max_steps' = 1.5: expected an integer"),
    ("train.lr=fast", r"'train.lr' = 'fast': expected a number"),
    ("variance.mirror=1", r"'variance.mirror' = 1: expected true, false or auto \(deprecated: use variance.masks"),
    ("variance.mirror=maybe", r"'variance.mirror' = 'maybe': expected true, false or auto \(deprecated: use "),
    ("variance.masks=maybe", r"'variance.masks.name' = 'maybe': choose one of \['bernoulli', "),
    ("train.zero_stage=fast", r"'train.zero_stage' = 'fast': expected an integer, or one of \['auto'\]$"),
    ("variance.t_sampler=lognormal", r"'variance.t_sampler.name' = 'lognormal': choose one of \['uniform', "),
    ("variance.t_sampler=[1]", r"'variance.t_sampler' must be a mapping"),
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


def test_zero3_on_one_rank_keeps_every_parameter_gathered():
    """One rank: every parameter persistent (its gathered form views its partition, so no memory is added); several
    ranks or offloaded parameters: DeepSpeed's small-parameter threshold, so that the others are partitioned."""
    def threshold(world_size: int, *sets: str) -> int:
        cfg = load_config([QUICKSTART], ["train.zero_stage=3", *sets])
        return build_deepspeed_config(cfg, world_size, on_gpu=True)["zero_optimization"][
            "stage3_param_persistence_threshold"]

    assert threshold(1) >= 2**62
    assert threshold(2) == threshold(1, "train.offload_params=true") == 10**5


def test_fused_optimizer_at_stage_0_runs_the_engine_in_fp32_mode_without_its_optimizer():
    """``FlatAdamW`` casts, clips and updates itself: the engine must neither wrap it (bf16 section off) nor
    clip (gradient_clipping 0) nor build its own (no optimizer section); at stages 1-3 the JSON is DeepSpeed's."""
    fused0 = load_config([QUICKSTART], ["train.optimizer=fused", "train.zero_stage=0"])
    ds = build_deepspeed_config(fused0, world_size=1, on_gpu=True)
    assert ds["bf16"] == {"enabled": False} and ds["gradient_clipping"] == 0.0 and "optimizer" not in ds
    fused2 = load_config([QUICKSTART], ["train.optimizer=fused", "train.zero_stage=2"])
    plain2 = load_config([QUICKSTART], ["train.zero_stage=2"])
    assert build_deepspeed_config(fused2, 1, True) == build_deepspeed_config(plain2, 1, True)
    with pytest.raises(ConfigError, match="'train.optimizer' = 'fused': the fused step runs on the device"):
        load_config([QUICKSTART], ["train.optimizer=fused", "train.offload_optimizer=true"])


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
    assert {"quickstart.yaml", "pretrain_8b.yaml", "pretrain_1b.yaml"} <= set(SHIPPED_CONFIGS)


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


def test_zero_stage_auto_picks_the_fastest_stage_that_fits_and_can_resume():
    from mdm_scale.config.deepspeed_json import choose_zero_stage

    gib = 2**30
    assert choose_zero_stage(1_158_760_448, 1, 80 * gib)[0] == 0  # 1.1B on one H100: 19.4 GiB at stage 0
    assert choose_zero_stage(1_158_760_448, 2, 80 * gib)[0] == 2  # several GPUs: stage 2 divides the step
    stage, why = choose_zero_stage(1_158_760_448, 1, 80 * gib, resumed_stage=2)
    assert stage == 2 and "cannot load the stage-2 checkpoint" in why  # stage 0 cannot load ZeRO partitions
    assert choose_zero_stage(1_158_760_448, 1, 80 * gib, resumed_stage=0)[0] == 0
    assert choose_zero_stage(8_015_581_184, 1, 140 * gib)[0] == 3  # 8B on one H200: 134 GiB
    assert choose_zero_stage(8_015_581_184, 8, 140 * gib)[0] == 2  # 8B on 8: 2 + 16/8 bytes each = 30 GiB
    assert choose_zero_stage(1_000_000, 1, None)[0] == 3  # CPU
    limit = 70 * gib / 18  # exactly half of 140 GiB at 18 bytes per parameter on one rank
    assert choose_zero_stage(int(limit), 1, 140 * gib)[0] == 0
    assert choose_zero_stage(int(limit) + 1, 1, 140 * gib)[0] == 3
    assert load_config([QUICKSTART], ["train.zero_stage=auto"]).train.zero_stage == "auto"
    with pytest.raises(ConfigError, match="'model.checkpoint_blocks' = 2: needs model.activation_checkpointing"):
        load_config([QUICKSTART], ["model.checkpoint_blocks=2"])
    with pytest.raises(ConfigError, match="'data.packing' = True: packed rows need the mdm objective"):
        load_config([QUICKSTART], ["data.packing=true", "train.objective=arm"])


# ---- choice sections and the old flat variance keys ---------------------------------------------------------
def test_a_choice_section_is_read_by_its_name_and_a_new_name_replaces_it(tmp_path):
    """A string is the name; fields of the same kind merge over the files; a new name (string, ``name`` key or a
    mapping with another ``name``) replaces the section, so the other kind's fields do not follow it."""
    from mdm_scale.config.variance import BernoulliMasksConfig, PPOTSConfig, UniformTConfig

    cfg = load_config([QUICKSTART], ["variance.t_sampler=ppots", "variance.t_sampler.bins=16"])
    assert cfg.variance.t_sampler == PPOTSConfig(bins=16)
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("variance:\n  t_sampler: {name: ppots, bins: 16}\n")
    second.write_text("variance:\n  t_sampler: {refit_every: 5}\n")
    assert load_config([first, second]).variance.t_sampler == PPOTSConfig(bins=16, refit_every=5)
    assert load_config([first], ["variance.t_sampler.name=ppots"]).variance.t_sampler == PPOTSConfig(bins=16)
    for items in (["variance.t_sampler=uniform"], ["variance.t_sampler.name=uniform"]):
        assert load_config([first], items).variance.t_sampler == UniformTConfig()
    second.write_text("variance:\n  t_sampler: {name: clipped, low: 0.2}\n")
    assert load_config([first, second]).variance.t_sampler.low == 0.2
    second.write_text("variance:\n  t_sampler: uniform\n  masks: mirror\n")
    cfg = load_config([first, second], ["variance.masks.single_above=0.9"])
    assert cfg.variance.t_sampler == UniformTConfig() and cfg.variance.masks == MirrorMasksConfig(single_above=0.9)
    assert load_config([]).variance.masks == BernoulliMasksConfig()
    with pytest.raises(ConfigError, match=r"'variance.t_sampler.name' = 'ppots': this section is a ClippedTConfig"):
        from mdm_scale.config.variance import ClippedTConfig

        ClippedTConfig(name="ppots")


OLD_FLAT_VARIANCE = {  # the variance section as mdm-scale wrote it before the nested sections (main at ac45eb8)
    "t_sampler": "ppots", "mirror": True, "mirror_plus_threshold": 0.9, "eps": 0.01, "ppots_x0": 3,
    "ppots_masks": 4, "ppots_bins": 16, "ppots_forward_tokens": None, "ppots_restarts": 5, "ppots_refit_every": 10,
    "ppots_half_life": 40.0, "ppots_mix_uniform": 0.1, "ppots_max_weight": 8.0, "ppots_target": "grad",
    "ppots_loss_max": 20.0, "t_coupling": "symmetric", "clip_low": 0.3, "clip_high": 0.8, "isad_token_ids": [5, 6],
    "isad_delta": 0.3, "ema_bins": 10, "ema_rate": 0.05, "probe_every": 7, "probe_fraction": 0.5}
NEW_NESTED_VARIANCE = [  # the same run in the current keys
    "variance.t_sampler={name: ppots, x0: 3, masks: 4, bins: 16, restarts: 5, refit_every: 10, half_life: 40, "
    "mix_uniform: 0.1, max_weight: 8, target: grad, loss_max: 20}", "variance.masks={name: mirror, single_above: 0.9}",
    "variance.eps=0.01", "variance.t_coupling=symmetric", "variance.isad={token_ids: [5, 6], delta: 0.3}",
    "variance.ema={bins: 10, rate: 0.05}", "variance.probe={every: 7, fraction: 0.5}",
    "variance.monitor={every: 10, half_life: 40}"]


def test_old_flat_keys_load_as_the_new_ones_with_a_note_naming_each_new_key(tmp_path):
    """A YAML file and ``--set`` items in the old flat spelling give the same configuration as the new keys, with
    one deprecation warning per old key that names its successor (P-POTS's cadence also sets the monitor's, on
    which the online estimates ran)."""
    from mdm_scale.config.legacy import ConfigDeprecation

    new = load_config([QUICKSTART], NEW_NESTED_VARIANCE)
    old_file = tmp_path / "old.yaml"
    old_file.write_text(yaml.safe_dump({"variance": OLD_FLAT_VARIANCE}))
    with pytest.warns(ConfigDeprecation) as caught:
        assert load_config([QUICKSTART, old_file]) == new
    notes = {str(w.message) for w in caught}
    assert len(notes) == len(OLD_FLAT_VARIANCE) - 3  # t_sampler, eps and t_coupling kept their names
    assert "config key 'variance.ppots_refit_every' is deprecated: use variance.monitor.every and " \
           "variance.t_sampler.refit_every (with variance.t_sampler: ppots)" in notes
    assert "config key 'variance.mirror' is deprecated: use variance.masks (bernoulli, mirror or auto)" in notes
    assert "config key 'variance.probe_every' is deprecated: use variance.probe.every" in notes
    items = [f"variance.{key}={json.dumps(value)}" for key, value in OLD_FLAT_VARIANCE.items()]
    with pytest.warns(ConfigDeprecation):
        assert load_config([QUICKSTART], items) == new
        # P-POTS's old keys wait for the final t-sampler: given before it they still apply; not ppots, ignored.
        assert load_config([], ["variance.ppots_bins=16", "variance.t_sampler=ppots"]).variance.t_sampler.bins == 16
        uniform = load_config([], ["variance.ppots_bins=16", "variance.ppots_refit_every=10"]).variance
        assert uniform.t_sampler.name == "uniform" and uniform.monitor.every == 10
        # Old and new spellings of one key: the new one wins.
        assert load_config([], ["variance.t_sampler={name: ppots, bins: 8}",
                                "variance.ppots_bins=16"]).variance.t_sampler.bins == 8
    with pytest.raises(ConfigError, match="unknown config key 'variance.ppots_bin' .*did you mean"):
        load_config([], ["variance.ppots_bin=16"])


def test_the_config_of_an_old_run_json_loads_as_the_new_keys():
    """``run.json`` of a run written before the nested sections (its whole flat section, defaults included) reads
    as the same run in the new keys, with one warning line; mdm-scale's default run.json of then reads as today's
    defaults, so resuming an old run with today's configs changes nothing."""
    from dataclasses import asdict

    from mdm_scale.config.legacy import ConfigDeprecation
    from mdm_scale.config.loader import from_dict
    from mdm_scale.config.schema import Config

    stored = asdict(load_config([QUICKSTART], NEW_NESTED_VARIANCE))
    stored["variance"] = OLD_FLAT_VARIANCE
    with pytest.warns(ConfigDeprecation, match=r"^a stored configuration: read the deprecated keys variance.mirror, "):
        assert from_dict(Config, stored) == load_config([QUICKSTART], NEW_NESTED_VARIANCE)
    defaults_then = {"t_sampler": "uniform", "mirror": False, "mirror_plus_threshold": None, "eps": 0.001,
                     "ppots_x0": 10, "ppots_masks": 10, "ppots_bins": 64, "ppots_forward_tokens": None,
                     "ppots_restarts": 20, "ppots_refit_every": 50, "ppots_half_life": 200.0, "ppots_mix_uniform": 0.0,
                     "ppots_max_weight": None, "ppots_target": "loss", "ppots_loss_max": None,
                     "t_coupling": "independent", "clip_low": 0.3, "clip_high": 0.8, "isad_token_ids": [],
                     "isad_delta": 0.2, "ema_bins": 0, "ema_rate": 0.01, "probe_every": 25, "probe_fraction": 0.0625}
    with pytest.warns(ConfigDeprecation):
        assert from_dict(Config, {"variance": defaults_then}) == Config()
