"""``mdm-scale export``: a training checkpoint as a self-contained Hugging Face directory.

The checkpoint is read by ``training/run_reader.py`` (the DeepSpeed shards consolidated to fp32) and written with
``save_pretrained`` as ``model.safetensors`` + ``config.json``, with the run's tokenizer and
``mdm_scale_export.json`` (prompt encoding, the run's configuration and step, source checkpoint), so that
``read_run`` gives the same configuration, step and weights for the export as for the checkpoint. For the
built-in model the directory also holds its modelling code (``modeling_mdm.py`` and the files it imports
relatively: ``configuration_mdm.py``, ``kernels.py``, ``kv_cache.py``, ``masked_head.py``, copied unchanged
from ``mdm_scale/models``) and ``config.json`` maps the Auto classes to it (``auto_map``), as diffusion LMs such as
LLaDA are shared. So a Python with only torch and transformers loads it:

    AutoModelForMaskedLM.from_pretrained(HF_DIR, trust_remote_code=True)

and with mdm-scale imported it loads with the installed code, no remote code needed. Either way it decodes
exactly what the checkpoint decodes (``tests/test_export.py``, ``tests/test_generation.py``), and the
directory can be ``model.path`` of a new run (fine-tuning from a pretrained model). A model read from a LLaDA
or Dream checkpoint is written back in that format instead (``write_source_format``: the source's key names,
``config.json`` and ``auto_map``); a causal LM adapted to diffusion (LLaMA, Qwen) is no longer a causal LM and
is exported as the built-in model above. Hugging Face models wrapped for training (BERT, ...) are written as
the original model class.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from transformers.dynamic_module_utils import get_relative_import_files

from mdm_scale.models import modeling_mdm
from mdm_scale.models.formats import EXPORTED, source_config_json
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion
from mdm_scale.models.native import source_tensors
from mdm_scale.models.safetensors_dir import write_safetensors
from mdm_scale.training.run_reader import EXPORT_INFO, read_run

AUTO_MAP = {"AutoConfig": "configuration_mdm.MDMConfig", "AutoModel": "modeling_mdm.MDMModel",
            "AutoModelForMaskedLM": "modeling_mdm.MDMForMaskedDiffusion"}
"""config.json's ``auto_map``: which class of the shipped files each Auto class loads."""


def export_checkpoint(checkpoint: str | Path, out: str | Path, trust_remote_code: bool = False) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: the directory exists and is not empty")
    source = read_run(checkpoint)
    loaded, tokenizer, _ = source.load_model(trust_remote_code)
    builtin = isinstance(loaded, MDMForMaskedDiffusion)
    model = loaded if builtin else loaded.model
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    if builtin and model.config.source_format in EXPORTED:
        write_source_format(model, staging)
    elif builtin:
        model.config.auto_map = AUTO_MAP
        model.save_pretrained(str(staging), safe_serialization=True)
        ship_modelling_code(staging)
    else:
        model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    info = {"chat_template": source.chat_template, "source": str(source.path), "causal": source.causal,
            "step": source.step, "config": asdict(source.config) if source.config is not None else None}
    (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    staging.replace(out)
    return out


def write_source_format(model: MDMForMaskedDiffusion, directory: Path) -> None:
    """A model read from a LLaDA or Dream checkpoint, written back in that format: the source's
    ``config.json`` (and ``generation_config.json``) with the fields the run may have changed, and safetensors
    shards with the source's tensor names, in the dtype the source's config names (``torch_dtype`` or
    ``dtype``; float32 if none), so the release's own code (its ``auto_map``: copy its ``.py`` files next to
    the weights) and evaluation scripts load it."""
    config = model.config
    source = source_config_json(config)
    dtype = getattr(torch, str(source.get("torch_dtype") or source.get("dtype") or "float32"))
    state = {name: p.detach() for name, p in model.named_parameters()}
    write_safetensors(source_tensors(state, config, dtype), directory)
    (directory / "config.json").write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    if config.source_generation_config is not None:
        (directory / "generation_config.json").write_text(
            json.dumps(config.source_generation_config, indent=2, sort_keys=True) + "\n")


def ship_modelling_code(directory: Path) -> list[Path]:
    """Copy ``modeling_mdm.py`` and every file it imports relatively (recursively) into ``directory``."""
    source = Path(modeling_mdm.__file__)
    files = [source, *(Path(f) for f in get_relative_import_files(str(source)))]
    return [Path(shutil.copy2(f, directory / f.name)) for f in files]
