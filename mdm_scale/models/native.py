"""Released checkpoints (LLaDA, Dream, LLaMA, Qwen2, Qwen3) read natively into ``MDMForMaskedDiffusion``.

No modelling code of the checkpoint runs: ``config.json`` is translated into an ``MDMConfig``
(``formats.mdm_config_fields``) and the safetensors tensors are copied into the model's parameters by name
(``formats.source_names``, q/k/v and gate/up concatenated). Loading is ZeRO-3 aware (``zero3.py``): the model
is built partitioned under ``zero.Init``, then, module by module, its parameters are gathered, **rank 0 reads
that module's tensors from disk** (``safe_open``: one tensor at a time) and writes them, and leaving the
gather broadcasts them and partitions them again. So no rank ever holds more than one module whole (for
LLaDA-8B: the 126464 x 4096 embedding), only rank 0 reads the weights (other ranks read the headers, to check
names and shapes before any collective, so a bad checkpoint fails on every rank alike), and a multi-node job
needs the weights only where global rank 0 runs. Without ZeRO-3 the model is built on the meta device (no
random initialisation of 8B parameters) and every rank reads all tensors.

If the run's tokenizer gained a [MASK] token one past the checkpoint's rows (``model.mask_token_id: add``),
the embedding (and an untied head) get one more row, initialised to the mean of the existing rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from mdm_scale.config.schema import ConfigError
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.formats import (
    detect_format,
    ignorable,
    mdm_config_fields,
    read_config_json,
    source_names,
    source_parts,
)
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion
from mdm_scale.models.safetensors_dir import SafetensorsDir
from mdm_scale.models.zero3 import gathered_modules, parameter_shapes

GROWABLE = ("model.embed_tokens.weight", "lm_head.weight")
"""Parameters that may have more rows than the checkpoint's tensor (a [MASK] token added to the vocabulary)."""


def native_format(path: str | Path, trust_remote_code: bool = False) -> str | None:
    """The format the native loader reads at ``path``, or None: another model (an mdm-scale export, a
    transformers masked LM), or a LLaDA directory whose own code the user asked for with ``trust_remote_code``.
    Dream's own code is refused: it returns raw logits, and training on them would ignore Dream's shift."""
    fmt = detect_format(read_config_json(path))
    if fmt == "dream" and trust_remote_code:
        raise ConfigError(f"{path} is a Dream checkpoint: its own code (model.trust_remote_code / "
                          f"--trust-remote-code) returns unshifted logits; leave it off, mdm-scale reads Dream "
                          f"natively")
    return None if fmt == "llada" and trust_remote_code else fmt


def native_config(path: str | Path, fmt: str, objective: str = "mdm", overrides: dict | None = None) -> MDMConfig:
    """The ``MDMConfig`` of the checkpoint at ``path``. For ``objective = "arm"`` a causal LM stays causal and
    unshifted (and LLaDA becomes causal, like the built-in model); Dream, trained shifted, is refused.
    ``overrides`` (``model.overrides``) are applied last: settings such as ``loss_head`` or
    ``head_chunk_tokens``; a shape field that disagrees with the weights fails when they are read."""
    file = Path(path) / "config.json"
    source = read_config_json(path)
    fields = mdm_config_fields(fmt, source, file)
    if objective == "arm":
        if fmt == "dream":
            raise ConfigError(f"train.objective = 'arm' with a Dream checkpoint ({file}): Dream is a diffusion model "
                              f"with shifted logits; use train.objective = 'mdm'")
        fields.update(causal=True, logit_shift=False)
    generation = Path(path) / "generation_config.json"
    fields.update(source_config=source,
                  source_generation_config=json.loads(generation.read_text()) if generation.is_file() else None)
    fields.update(overrides or {})
    try:
        return MDMConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{file} with model.overrides = {overrides!r}: {err}") from None


def load_native(path: str | Path, config: MDMConfig, ds_config: dict | None = None, zero3: bool = False
                ) -> MDMForMaskedDiffusion:
    """The model of ``config`` with the weights of the checkpoint at ``path`` (module docstring)."""
    import deepspeed

    checkpoint = SafetensorsDir(path)
    if zero3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = MDMForMaskedDiffusion(config)
    else:
        with torch.device("meta"):
            model = MDMForMaskedDiffusion(config)
        model.to_empty(device="cpu")
        model.tie_weights()  # to_empty gives every parameter new storage, which unties a tied head
    shapes = parameter_shapes(model)
    _check_tensors(checkpoint, config, shapes)
    reads = not zero3 or not dist.is_initialized() or dist.get_rank() == 0
    with torch.no_grad():
        for _, own in gathered_modules(model):
            if reads:
                for name, param in own:
                    param.data.copy_(_read(checkpoint, config, name, shapes[name][0]))
    return model


def _check_tensors(checkpoint: SafetensorsDir, config: MDMConfig, shapes: dict[str, list[int]]) -> None:
    """Every parameter's source tensors exist with fitting shapes, and no tensor of the checkpoint is left over
    (a tensor with nowhere to go means the config describes another network)."""
    fmt, where = config.source_format, checkpoint.directory
    used, names = set(), checkpoint.names()
    for name, shape in shapes.items():
        sources = source_names(fmt, name)
        missing = [s for s in sources if s not in names]
        if missing:
            raise ConfigError(f"{where}: tensor {missing[0]!r} is missing (config.json describes a {fmt} model "
                              f"that needs it for {name})")
        got = [checkpoint.shape(s) for s in sources]
        rows = sum(g[0] for g in got)
        fits = all(g[1:] == shape[1:] for g in got) and (rows == shape[0] or (name in GROWABLE and rows < shape[0]))
        parts = source_parts(config, name)
        if not fits or (parts is not None and [g[0] for g in got] != parts):
            raise ConfigError(f"{checkpoint.file_of(sources[0])}: tensor shapes {got} of {list(sources)} do not fit "
                              f"{name} {shape} of the network config.json describes")
        used.update(sources)
    extra = sorted(n for n in names - used if not ignorable(fmt, n, config.tie_word_embeddings))
    if extra:
        raise ConfigError(f"{checkpoint.file_of(extra[0])}: tensor {extra[0]!r} (and {len(extra) - 1} more) has no "
                          f"place in the {fmt} network config.json describes")


def _read(checkpoint: SafetensorsDir, config: MDMConfig, name: str, rows: int) -> torch.Tensor:
    """Our parameter ``name`` from its source tensors; an added vocabulary row is the mean of the others."""
    tensor = torch.cat([checkpoint.get(s) for s in source_names(config.source_format, name)])
    if tensor.shape[0] < rows:
        mean = tensor.float().mean(0, keepdim=True).to(tensor.dtype)
        tensor = torch.cat([tensor, mean.expand(rows - tensor.shape[0], -1)])
    return tensor


def source_tensors(state: dict[str, torch.Tensor], config: MDMConfig, dtype: torch.dtype
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """The full state dict ``state`` of a model read from ``config.source_format`` in that format's names
    (fused parameters split back into q, k, v and gate, up), cast to ``dtype``; a tied head is not written
    (the source format stores only the embedding then)."""
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        parts = source_parts(config, name)
        pieces = tensor.split(parts) if parts is not None else (tensor,)
        for source, piece in zip(source_names(config.source_format, name), pieces, strict=True):
            yield source, piece.to(dtype)
