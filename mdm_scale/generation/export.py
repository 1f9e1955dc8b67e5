"""``mdm-scale export``: a training checkpoint as a self-contained Hugging Face directory.

The DeepSpeed shards are consolidated to fp32 (``generation/model_source.py``) and written with
``save_pretrained`` as ``model.safetensors`` + ``config.json``, with the run's tokenizer and
``mdm_scale_export.json`` (prompt encoding, source checkpoint). For the built-in model the directory also holds
its modelling code (``modeling_mdm.py`` and the files it imports relatively: ``configuration_mdm.py``,
``kernels.py``, ``masked_head.py``, copied unchanged from ``mdm_scale/models``) and ``config.json`` maps the
Auto classes to it (``auto_map``), as diffusion LMs such as LLaDA are shared. So a Python with only torch and
transformers loads it:

    AutoModelForMaskedLM.from_pretrained(HF_DIR, trust_remote_code=True)

and with mdm-scale imported it loads with the installed code, no remote code needed. Either way it decodes
exactly what the checkpoint decodes (``tests/test_export.py``, ``tests/test_generation.py``), and the
directory can be ``model.path`` of a new run (fine-tuning from a pretrained model). Hugging Face models
wrapped for training (BERT, LLaDA, ...) are written as the original model class.

A LoRA run (``model.lora``) is exported with its adapters merged into the weights (``models/lora.py``), so the
directory is a plain model of the base architecture whose logits equal the adapted model's. With
``--lora-adapter-only`` it is a PEFT adapter directory instead (``adapter_config.json``,
``adapter_model.safetensors`` and the tokenizer), for the run's ``model.path``:
``PeftModel.from_pretrained(base_model, DIR)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers.dynamic_module_utils import get_relative_import_files

from mdm_scale.generation.model_source import EXPORT_INFO, load_generation_model, training_run_config
from mdm_scale.models import modeling_mdm
from mdm_scale.models.lora import has_lora, merge_lora, save_adapter
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion
from mdm_scale.training.checkpoint import CheckpointError

AUTO_MAP = {"AutoConfig": "configuration_mdm.MDMConfig", "AutoModel": "modeling_mdm.MDMModel",
            "AutoModelForMaskedLM": "modeling_mdm.MDMForMaskedDiffusion"}
"""config.json's ``auto_map``: which class of the shipped files each Auto class loads."""


def export_checkpoint(checkpoint: str | Path, out: str | Path, trust_remote_code: bool = False,
                      lora_adapter_only: bool = False) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: the directory exists and is not empty")
    gm = load_generation_model(checkpoint, torch.device("cpu"), torch.float32, trust_remote_code)
    builtin = isinstance(gm.model, MDMForMaskedDiffusion)
    model = gm.model if builtin else gm.model.model
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    if lora_adapter_only:
        _save_adapter_only(checkpoint, model, staging)
    else:
        if has_lora(model):
            merge_lora(model)
        if builtin:
            model.config.auto_map = AUTO_MAP
        model.save_pretrained(str(staging), safe_serialization=True)
        if builtin:
            ship_modelling_code(staging)
    gm.tokenizer.save_pretrained(str(staging))
    info = {"chat_template": gm.chat_template, "source": gm.source, "causal": gm.causal}
    (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    staging.replace(out)
    return out


def _save_adapter_only(checkpoint: str | Path, model, staging: Path) -> None:
    if not has_lora(model):
        raise CheckpointError(f"--lora-adapter-only: {checkpoint} holds no LoRA adapters (model.lora.rank was 0)")
    cfg, _ = training_run_config(Path(checkpoint))
    if cfg.model.path is None:
        raise CheckpointError(f"--lora-adapter-only: the run at {checkpoint} adapted a model built from "
                              f"model.preset, whose base weights exist only in its checkpoints; export without "
                              f"--lora-adapter-only to merge the adapters into them")
    save_adapter(model, cfg.model.lora, staging, cfg.model.path)


def ship_modelling_code(directory: Path) -> list[Path]:
    """Copy ``modeling_mdm.py`` and every file it imports relatively (recursively) into ``directory``."""
    source = Path(modeling_mdm.__file__)
    files = [source, *(Path(f) for f in get_relative_import_files(str(source)))]
    return [Path(shutil.copy2(f, directory / f.name)) for f in files]
