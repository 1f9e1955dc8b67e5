"""A LLaDA-format checkpoint of a built-in preset's shape with random weights, for benchmarking the native loader.

    python -m tools.bench.llada_checkpoint --preset 8b --out /tmp/llada_8b

It is what a LLaDA release holds (``model.transformer.*`` tensors as bf16 safetensors shards with
``model.safetensors.index.json``, a ``config.json`` with LLaDA's fields: those of LLaDA-8B with the preset's
shape), written tensor by tensor, so an 8B checkpoint needs memory for one shard only. The weights are
N(0, 0.02) (drawn on the GPU when there is one), norm weights 1: a benchmark measures speed, not what the
model says.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mdm_scale.config.presets import PRESETS
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.formats import source_names, source_parts
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion
from mdm_scale.models.safetensors_dir import write_safetensors

LLADA_FIELDS = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "embedding_dropout": 0.0,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
    "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
    "layer_norm_type": "rms", "layer_norm_with_affine": True, "max_sequence_length": 4096, "mlp_ratio": 4,
    "model_type": "llada", "multi_query_attention": None, "precision": "amp_bf16", "residual_dropout": 0.0,
    "rope": True, "rope_full_precision": True, "scale_logits": False, "torch_dtype": "bfloat16",
    "weight_tying": False,
}
"""The fields of LLaDA-8B's config.json that do not depend on the shape."""


def llada_config_json(config: MDMConfig) -> dict:
    return {**LLADA_FIELDS, "d_model": config.hidden_size, "n_heads": config.num_attention_heads,
            "n_kv_heads": config.num_key_value_heads, "n_layers": config.num_hidden_layers,
            "mlp_hidden_size": config.intermediate_size, "vocab_size": config.vocab_size,
            "embedding_size": config.vocab_size, "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
            "mask_token_id": config.mask_token_id}


def preset_config(preset: str, vocab: int | None = None, mask_token_id: int = 2) -> MDMConfig:
    """The built-in preset's shape (its vocabulary unless ``vocab``), with the benchmark tokenizer's [MASK] id."""
    fields = {**PRESETS[preset], "mask_token_id": mask_token_id}
    if vocab is not None:
        fields["vocab_size"] = vocab
    return MDMConfig(**fields)


def write_random_llada(directory: str | Path, config: MDMConfig, seed: int = 0,
                       max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the checkpoint of ``config``'s shape (module docstring) and return its directory."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in MDMForMaskedDiffusion(config).named_parameters()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # 8B normal draws: seconds on a GPU
    generator = torch.Generator(device).manual_seed(seed)

    def tensors():
        for name, shape in shapes.items():
            rows = source_parts(config, name) or [shape[0]]
            for source, n in zip(source_names("llada", name), rows, strict=True):
                if name.endswith("norm.weight"):
                    yield source, torch.ones(n, dtype=torch.bfloat16)
                else:
                    draw = torch.randn((n, *shape[1:]), generator=generator, device=device)
                    yield source, (0.02 * draw).to(torch.bfloat16).cpu()

    directory = Path(directory)
    write_safetensors(tensors(), directory, max_shard_bytes)
    (directory / "config.json").write_text(json.dumps(llada_config_json(config), indent=2, sort_keys=True) + "\n")
    return directory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the preset's)")
    p.add_argument("--mask-token-id", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    print(write_random_llada(args.out, preset_config(args.preset, args.vocab, args.mask_token_id)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
