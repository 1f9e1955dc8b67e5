"""The built-in model: Hugging Face save/load round trip, attention direction, padding, presets, initial weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM

from conftest import tiny_overrides
from mdm_scale.config.deepspeed_json import build_deepspeed_config
from mdm_scale.config.loader import load_config
from mdm_scale.config.presets import PRESETS
from mdm_scale.data.tokenizer import build_char_tokenizer
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.loading import build_model
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion


def tiny(**kw) -> MDMForMaskedDiffusion:
    torch.manual_seed(0)
    return MDMForMaskedDiffusion(MDMConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, **kw)).eval()


def test_hf_save_load_round_trip(tmp_path):
    model = tiny(mask_token_id=3)
    x = torch.randint(0, 40, (2, 12))
    model.save_pretrained(str(tmp_path))
    config = AutoConfig.from_pretrained(str(tmp_path))
    assert config.model_type == "mdm_scale" and config.mask_token_id == 3 and config.num_key_value_heads == 2
    loaded = AutoModelForMaskedLM.from_pretrained(str(tmp_path)).eval()
    assert isinstance(loaded, MDMForMaskedDiffusion)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_bidirectional_sees_the_future_and_causal_does_not():
    x = torch.randint(0, 40, (1, 10))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 40
    for causal in (False, True):
        model = tiny(causal=causal)
        with torch.no_grad():
            changed = (model(x).logits - model(y).logits).abs().amax(-1)[0]
        assert changed[7:].gt(0).all()
        assert changed[:7].gt(0).all() != causal  # bidirectional: earlier positions change too


def test_padding_keys_do_not_affect_real_positions():
    model = tiny()
    x = torch.randint(0, 40, (1, 8))
    padded = torch.cat([x, torch.full((1, 4), 0)], dim=1)
    mask = torch.tensor([[True] * 8 + [False] * 4])
    with torch.no_grad():
        alone = model(x).logits
        with_pads = model(padded, mask).logits[:, :8]
    assert torch.allclose(alone, with_pads, atol=1e-5)


@pytest.mark.parametrize("name, low, high", [("1b", 1.0e9, 1.2e9), ("8b", 7.5e9, 8.5e9)])
def test_large_presets_have_the_documented_size(name, low, high):
    config = MDMConfig(**PRESETS[name])
    d, f, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    params = layers * (4 * d * d + 3 * d * f + 2 * d) + 2 * v * d + d
    assert low < params < high
    with torch.device("meta"):  # the real module, without allocating 8B parameters
        model = MDMForMaskedDiffusion(config)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.slow
def test_fused_kernels_match_eager():
    """torch.compile'd RMSNorm / rotary / SwiGLU give the eager values and gradients (CPU inductor, ~1 min)."""
    model = tiny().train()
    x = torch.randint(0, 40, (2, 16))
    positions, targets, coef = torch.tensor([1, 5, 20]), torch.tensor([3, 4, 5]), torch.ones(3)
    eager = model(x, loss_positions=positions, loss_targets=targets, loss_coef=coef).loss
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    model.set_kernels(fused=True)
    fused = model(x, loss_positions=positions, loss_targets=targets, loss_coef=coef).loss
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    assert torch.allclose(eager, fused, rtol=1e-5)
    for a, b in zip(eager_grads, fused_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_eager_kernels_swaps_every_module_for_the_block_and_restores_them_even_on_error():
    """The P-POTS estimate runs eagerly inside ``eager_kernels`` and training gets its fused kernels back."""
    from mdm_scale.models.kernels import EAGER, Kernels, eager_kernels

    model = tiny()
    marker = Kernels(*(lambda *a: None for _ in range(3)))  # stands in for the compiled set (no compile on CPU)
    holders = [m for m in model.modules() if hasattr(m, "kernels")]
    assert holders
    for module in holders:
        module.kernels = marker
    with pytest.raises(RuntimeError, match="inside"):
        with eager_kernels(model):
            assert all(m.kernels is EAGER for m in holders)
            raise RuntimeError("inside")
    assert all(m.kernels is marker for m in holders)


def test_selective_checkpointing_recomputes_only_the_chosen_blocks_and_keeps_the_gradient():
    x = torch.randint(0, 40, (2, 12))
    grads, calls = [], []
    for blocks in (None, 0, 1):
        model = tiny().train()
        model.set_activation_checkpointing(blocks != 0, blocks)
        counts = [0, 0]
        for i, layer in enumerate(model.model.layers):
            def counted(*args, i=i, forward=layer.forward, counts=counts):
                counts[i] += 1
                return forward(*args)
            layer.forward = counted
        model(x).logits.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        calls.append(counts)
    assert calls == [[2, 2], [1, 1], [2, 1]]  # a recomputed block runs its forward twice
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[2], grads[1], atol=1e-6)


def test_a_zero3_build_has_the_initial_weights_of_a_stage0_build(synth_dir, dist_env):
    """The initial weights come from the seed alone: ZeRO-3 builds the parameters partitioned on the accelerator
    (on a GPU, in bf16; CUDA's generator would draw other numbers from the same seed) and initialises them there
    module by module, yet gets the stage-0 build's values (built on the CPU), as the trainer builds both. On a CPU
    host both are drawn on the CPU; the GPU run of this test (``DS_ACCELERATOR=cuda``, docs/testing.md) is the one
    that sees the device."""
    import deepspeed

    cfg = load_config(["configs/quickstart.yaml"], tiny_overrides(synth_dir, synth_dir / "unused"))
    tokenizer = build_char_tokenizer(["abc"])

    def build(stage: int) -> torch.nn.Module:
        ds_config = build_deepspeed_config(cfg, dist_env.world_size, dist_env.on_gpu)
        ds_config["zero_optimization"]["stage"] = stage
        return build_model(cfg, tokenizer, tokenizer.mask_token_id, None, ds_config, seed=7)

    zero3, stage0 = build(3), build(0)
    assert all(hasattr(p, "ds_id") for p in zero3.parameters())
    for (name, a), (_, b) in zip(zero3.named_parameters(), stage0.named_parameters(), strict=True):
        with deepspeed.zero.GatheredParameters([a]):
            assert a.device.type == ("cuda" if dist_env.on_gpu else "cpu"), name
            assert torch.equal(a.detach().cpu(), b.detach().to(a.dtype)), name
