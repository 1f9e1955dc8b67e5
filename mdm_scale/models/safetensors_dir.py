"""A checkpoint directory's safetensors weights, read tensor by tensor and written shard by shard.

Released checkpoints are one ``model.safetensors`` or shards listed by ``model.safetensors.index.json``
(``weight_map``: tensor name -> file). Reading opens every file with ``safe_open``, which reads only the
header until a tensor is asked for, so names and shapes are known without loading anything and each tensor
is read alone (an 8B checkpoint is never in memory whole). safetensors holds tensors only: nothing is
unpickled and no code runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mdm_scale.config.schema import ConfigError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class SafetensorsDir:
    """The tensors of ``directory`` by name: ``shape`` from the headers, ``get`` reads one tensor."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if (self.directory / INDEX).is_file():
            weight_map = json.loads((self.directory / INDEX).read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise ConfigError(f"{self.directory}: no {SINGLE} or {INDEX} (checkpoints are read from safetensors "
                              f"only)")
        self._handles, self._file = {}, {}
        for name in files:
            if not (self.directory / name).is_file():
                raise ConfigError(f"{self.directory / INDEX} lists {name}, which is missing")
            handle = safe_open(str(self.directory / name), framework="pt")
            self._handles[name] = handle
            for key in handle.keys():
                self._file[key] = name
        if weight_map is not None:
            wrong = sorted(k for k, f in weight_map.items() if self._file.get(k) != f)
            if wrong:
                raise ConfigError(f"{self.directory / INDEX}: tensor {wrong[0]!r} is not in {weight_map[wrong[0]]} "
                                  f"({len(wrong)} such entries)")

    def names(self) -> set[str]:
        return set(self._file)

    def file_of(self, name: str) -> Path:
        return self.directory / self._file[name]

    def shape(self, name: str) -> list[int]:
        return list(self._handles[self._file[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._file[name]].get_tensor(name)


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], directory: str | Path,
                      max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write ``(name, tensor)`` pairs as ``model.safetensors``, or, past ``max_shard_bytes``, as shards
    ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json`` (the layout ``transformers``
    writes). Tensors are consumed in order and at most one shard is held in memory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = directory / f"shard-{len(shards):05d}.tmp"
        save_file(pending, str(path), metadata={"format": "pt"})
        shards.append((path, list(pending)))
        pending.clear()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        pending[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    if pending or not shards:
        flush()
    if len(shards) == 1:
        return [shards[0][0].rename(directory / SINGLE)]
    names, weight_map = [], {}
    for k, (path, keys) in enumerate(shards):
        final = path.rename(directory / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
        names.append(final)
        weight_map.update({key: final.name for key in keys})
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2) + "\n")
    return names
