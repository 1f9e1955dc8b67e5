"""``mdm-scale export``: a training checkpoint as a Hugging Face directory.

The DeepSpeed shards are consolidated to fp32 (``generation/model_source.py``) and written with
``save_pretrained`` as ``model.safetensors`` + ``config.json``, with the run's tokenizer and
``mdm_scale_export.json`` (prompt encoding, source checkpoint). The built-in model loads back with

    import mdm_scale.models.modeling_mdm                # registers model_type "mdm_scale" with the Auto classes
    AutoModelForMaskedLM.from_pretrained(HF_DIR)

and decodes exactly what the checkpoint decodes (``tests/test_generation.py``). The directory can also be
``model.path`` of a new run (fine-tuning from a pretrained model). Hugging Face models wrapped for training
(BERT, LLaDA, ...) are written as the original model class.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mdm_scale.generation.model_source import EXPORT_INFO, load_generation_model
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion


def export_checkpoint(checkpoint: str | Path, out: str | Path, trust_remote_code: bool = False) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out}: the directory exists and is not empty")
    gm = load_generation_model(checkpoint, torch.device("cpu"), torch.float32, trust_remote_code)
    model = gm.model if isinstance(gm.model, MDMForMaskedDiffusion) else gm.model.model
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    gm.tokenizer.save_pretrained(str(staging))
    info = {"chat_template": gm.chat_template, "source": gm.source, "causal": gm.causal}
    (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    staging.replace(out)
    return out
