"""Load YAML files and ``--set`` overrides into a checked :class:`~mdm_scale.config.schema.Config`.

Order: each ``--config`` file is deep-merged over the previous one, then each ``--set a.b=value`` is applied
(``value`` is parsed as YAML, so ``true``, ``3e-4`` and ``[1, 2]`` get their natural types). Every key is
checked against the dataclasses: an unknown key names the closest valid key, a value of the wrong type names
the key, the value and the expected type.

A section that is a choice of kinds (``config/choice.py``, e.g. ``variance.t_sampler``) is read by its ``name``;
a string there is the name (``--set variance.t_sampler=ppots``), and a new name replaces the section instead
of merging into it. The flat ``variance`` keys of earlier versions are read under their new names, with a
deprecation warning each (``config/legacy.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mdm_scale.config.choice import Choice
from mdm_scale.config.legacy import OLD_KEYS, LegacyKeys, upgrade_config
from mdm_scale.config.schema import Config, ConfigError

_FREE_FORM = {"deepspeed", "model.overrides"}  # dict fields whose keys are not checked here


def load_config(paths: list[str | Path] | None = None, overrides: list[str] | None = None) -> Config:
    """Read, merge, override and check a run configuration."""
    raw: dict[str, Any] = {}
    legacy = LegacyKeys()
    for path in paths or []:
        raw = deep_merge(raw, legacy.upgrade(read_yaml(path)))
    for item in overrides or []:
        key, value = parse_override(item)
        if key.startswith("variance.") and key.removeprefix("variance.") in OLD_KEYS:
            for new_key, new_value in leaves(legacy.upgrade({"variance": {key[9:]: value}})).items():
                set_dotted(raw, new_key, new_value)
        else:
            set_dotted(raw, key, value)
    legacy.warn()
    config = from_dict(Config, legacy.finish(raw))
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
    """Set ``key`` (dotted) in the mapping ``raw``; a choice section's string is its name, and a new ``name``
    replaces the section."""
    node, path = raw, ""
    parts = key.split(".")
    for part in parts[:-1]:
        path += part
        if path in choice_sections() and isinstance(node.get(part), str):
            node[part] = {"name": node[part]}
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key!r}: {part!r} is a value, not a section")
        node, path = child, path + "."
    section = path.rstrip(".")
    if parts[-1] == "name" and section in choice_sections() and node.get("name", choice_sections()[section]) != value:
        node.clear()
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in; nested mappings merge, everything else replaces. In a choice
    section, a string is ``{name: string}`` and a mapping with another ``name`` replaces the section."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        path = prefix + key
        old = merged.get(key)
        if path in choice_sections() and isinstance(value, dict) and isinstance(old, (str, dict)):
            old = {"name": old} if isinstance(old, str) else old
            if value.get("name", old.get("name")) != old.get("name", choice_sections()[path]):
                old = {}
        if isinstance(value, dict) and isinstance(old, dict):
            merged[key] = deep_merge(old, value, path + ".")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@functools.cache
def choice_sections(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Dotted key -> default kind of every choice section of the schema, e.g. ``{"variance.t_sampler": "uniform"}``."""
    found = {}
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if _is_family(hint):
            found[prefix + f.name] = f.default_factory().name
        elif dataclasses.is_dataclass(hint):
            found.update(choice_sections(hint, prefix + f.name + "."))
    return found


def _is_family(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, Choice) and "family" in hint.__dict__


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key, e.g. ``["seed", "model.preset", ...]`` (a choice section's: of all its kinds)."""
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        hint = typing.get_type_hints(cls)[f.name]
        for kind in hint.kinds.values() if _is_family(hint) else [hint] if dataclasses.is_dataclass(hint) else []:
            keys.extend(k for k in all_keys(kind, name + ".") if k not in keys)
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
    """Build dataclass ``cls`` from a mapping, checking every key and type. For the whole :class:`Config` (a
    stored one, e.g. ``run.json``'s), old keys are read under their new names first (``legacy.py``)."""
    if cls is Config and not prefix and isinstance(raw, dict):
        raw = upgrade_config(raw, "a stored configuration")
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(_unknown_key(cls, prefix + str(key)))
    values = {}
    for name in fields.keys() & raw.keys():
        hint = hints[name]
        key = prefix + name
        if _is_family(hint):
            values[name] = _choice(hint, raw[name], key, fields[name].default_factory().name)
        else:  # a section, a list of sections or a plain value (``coerce``)
            values[name] = coerce(raw[name], hint, key)
    return cls(**values)


def _choice(family: type[Choice], raw: Any, key: str, default: str) -> Choice:
    """The kind of ``family`` that ``raw`` (a mapping with ``name``, or a name) describes."""
    raw = {"name": raw} if isinstance(raw, str) else raw
    name = raw.get("name", default) if isinstance(raw, dict) else default
    if not isinstance(name, str) or name not in family.kinds:
        raise ConfigError(f"config key '{key}.name' = {name!r}: choose one of {list(family.kinds)}")
    return from_dict(family.kinds[name], {**raw, "name": name} if isinstance(raw, dict) else raw, key + ".")


def _unknown_key(cls: type, full: str) -> str:
    """Why ``full`` is unknown: the closest valid key, or the kinds of a choice section that have it."""
    if issubclass(cls, Choice):
        others = [name for name, kind in cls.kinds.items() if full.rsplit(".", 1)[-1] in
                  {f.name for f in dataclasses.fields(kind)}]
        if others:
            return (f"unknown config key {full!r}: {cls.family} {cls.name!r} has no such field (set "
                    f"{cls.family}.name to {' or '.join(others)})")
    close = difflib.get_close_matches(full, all_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key {full!r}{hint}"  # repr: a key may hold any character


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``hint``; ints, and strings such as ``1e-4`` (which YAML 1.1
    does not read as numbers), are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):  # an item of a list of sections, e.g. data.train_files[0]
        return from_dict(hint, value, key + ".")
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


def defaults_like(config: Config) -> Config:
    """The default configuration, with each choice section of ``config``'s kind (at that kind's defaults)."""
    raw: dict[str, Any] = {}
    for key in choice_sections():
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        set_dotted(raw, key, node.name)
    return from_dict(Config, raw)
