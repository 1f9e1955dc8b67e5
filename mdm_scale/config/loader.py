"""Load YAML files and ``--set`` overrides into a checked :class:`~mdm_scale.config.schema.Config`.

Order: each ``--config`` file is deep-merged over the previous one, then each ``--set a.b=value`` is applied
(``value`` is parsed as YAML, so ``true``, ``3e-4`` and ``[1, 2]`` get their natural types). Every key is
checked against the dataclasses: an unknown key names the closest valid key, a value of the wrong type names
the key, the value and the expected type.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mdm_scale.config.schema import Config, ConfigError

_FREE_FORM = {"deepspeed", "model.overrides"}  # dict fields whose keys are not checked here


def load_config(paths: list[str | Path] | None = None, overrides: list[str] | None = None) -> Config:
    """Read, merge, override and check a run configuration."""
    raw: dict[str, Any] = {}
    for path in paths or []:
        raw = deep_merge(raw, read_yaml(path))
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    config = from_dict(Config, raw)
    config.check()
    return config


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` -> ``("train.lr", 0.0003)``."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in; nested mappings merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key, e.g. ``["seed", "model.preset", ...]``."""
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, name + "."))
    return keys


def leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every setting in a config mapping (YAML or ``asdict``); the free-form mappings
    (``deepspeed``, ``model.overrides``) are one value each."""
    out = {}
    for key, value in tree.items():
        name = prefix + key
        if isinstance(value, dict) and name not in _FREE_FORM:
            out.update(leaves(value, name + "."))
        else:
            out[name] = value
    return out


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            full = prefix + str(key)
            close = difflib.get_close_matches(full, all_keys(), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}")  # repr: a key may hold any character
    values = {}
    for name in names & raw.keys():
        hint = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, raw[name], key + ".")
        else:
            values[name] = coerce(raw[name], hint, key)
    return cls(**values)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``hint``; ints, and strings such as ``1e-4`` (which YAML 1.1
    does not read as numbers), are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(_union_error(errors, f"config key '{key}' = {value!r}: "))
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' = {value!r}: choose one of {list(args)}")
        return value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a mapping")
        if key not in _FREE_FORM:
            raise ConfigError(f"config key '{key}': free-form mappings are not allowed here")
        return copy.deepcopy(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a list")
        return [coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' = {value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' = {value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a string")
        return value
    raise TypeError(f"unsupported annotation {hint!r} for {key}")  # a schema bug, not a user error


def _union_error(errors: list[str], head: str) -> str:
    """One message for a value that no alternative of a union accepts: every alternative named
    (``expected true or false, or one of ['auto']``), unless an alternative failed inside the value (a list
    item), whose own message is then the most specific."""
    if not all(e.startswith(head) for e in errors):
        return next(e for e in errors if not e.startswith(head))
    reasons = [e[len(head):].removeprefix("expected ").removeprefix("choose ") for e in errors]
    return head + "expected " + ", or ".join(reasons)


def check_batch_arithmetic(config: Config, world_size: int) -> int:
    """Return the global batch (sequences per optimiser step); fail if it contradicts ``global_batch_size``."""
    t = config.train
    global_batch = t.micro_batch_size * t.grad_accum * world_size
    if t.global_batch_size is not None and t.global_batch_size != global_batch:
        raise ConfigError(
            f"config key 'train.global_batch_size' = {t.global_batch_size}: it must equal "
            f"train.micro_batch_size ({t.micro_batch_size}) x train.grad_accum ({t.grad_accum}) x world size "
            f"({world_size}) = {global_batch}")
    return global_batch


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)
