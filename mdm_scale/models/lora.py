"""LoRA adapters (Hu et al. 2021) through ``peft``, on any model mdm-scale trains.

Each targeted linear layer ``y = W x`` becomes ``y = W x + (alpha / r) B A dropout(x)`` with ``A`` (r x in,
Kaiming-uniform) and ``B`` (out x r, zeros), so the adapted model starts equal to the base model. The base
weights are frozen: the optimizer holds only the adapters (and ``model.lora.modules_to_save``), so model states
shrink from 16 bytes per parameter (bf16 weight and gradient, fp32 master weight and two Adam moments) to 2
bytes per frozen parameter (``training/memory_plan.py``), and the backward pass skips the frozen weights'
gradient products (4 N instead of 6 N FLOPs per token, ``models/flops.py``).

The adapters are injected in place (``peft.inject_adapter_in_model``), so the model keeps its class, its
forward and its checkpointing: parameter names gain ``.base_layer`` and ``.lora_A.default`` /
``.lora_B.default``. They are drawn from ``seed`` alone, identically on every rank and for any world size;
under ZeRO-3 the base is already partitioned and DeepSpeed partitions the new adapter tensors when the engine
starts. ``merge_lora`` folds them into the base weights (``mdm-scale export``), ``save_adapter`` writes a PEFT
adapter directory (``PeftModel.from_pretrained(base, DIR)`` loads it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mdm_scale.config.schema import ConfigError, LoRAConfig

ADAPTER = "default"
"""peft's adapter name; it appears in parameter names (``lora_A.default.weight``)."""


def peft_config(lora: LoRAConfig, base_model: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none",
                      modules_to_save=list(lora.modules_to_save) or None, base_model_name_or_path=base_model)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's ``nn.Linear`` modules (what ``target_modules`` names)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def check_targets(model: nn.Module, lora: LoRAConfig) -> None:
    """Every target must name a linear layer and every ``modules_to_save`` entry a module with parameters."""
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    unknown = [t for t in lora.target_modules if not any(_matches(name, t) for name in linear)]
    if unknown:
        raise ConfigError(f"config key 'model.lora.target_modules' = {list(lora.target_modules)}: {unknown} name no "
                          f"linear layer of the model; its linear layers are {linear_layer_names(model)}")
    modules = {name for name, module in model.named_modules() if name and any(True for _ in module.parameters())}
    unknown = [m for m in lora.modules_to_save if not any(_matches(name, m) for name in modules)]
    if unknown:
        tops = sorted({name.rsplit(".", 1)[-1] for name in modules if not name.split(".")[-1].isdigit()})
        raise ConfigError(f"config key 'model.lora.modules_to_save' = {list(lora.modules_to_save)}: {unknown} name no "
                          f"module of the model; its modules are {tops}")


def add_lora(model: nn.Module, lora: LoRAConfig, seed: int) -> nn.Module:
    """Freeze ``model`` and inject the adapters (in place; returns ``model``). Only the adapters and the
    parameters of ``modules_to_save`` require gradients afterwards."""
    from peft import inject_adapter_in_model

    check_targets(model, lora)
    config = peft_config(lora)
    config.modules_to_save = None  # trained in place below: peft's wrapper would keep a second, frozen copy
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, module in model.named_modules():
        if any(_matches(name, m) for m in lora.modules_to_save):
            module.requires_grad_(True)
    return model


def has_lora(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, ``W <- W + (alpha / r) B A``, and put the plain layer back
    (in place; returns ``model``): the parameter names are the base model's again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model


def save_adapter(model: nn.Module, lora: LoRAConfig, out: Path, base_model: str | None) -> Path:
    """A PEFT adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors`` with the adapters
    and the ``modules_to_save`` weights, under the names ``PeftModel`` gives them."""
    from safetensors.torch import save_file

    tensors = {}
    for name, param in model.named_parameters():
        saved = f".{ADAPTER}." in name or any(_matches(name.rsplit(".", 1)[0], m) for m in lora.modules_to_save)
        if saved:
            key = "base_model.model." + name.replace(f".{ADAPTER}.", ".")
            tensors[key] = param.detach().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    peft_config(lora, base_model).save_pretrained(str(out))
    return out
