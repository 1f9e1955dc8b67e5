"""The flat ``variance`` keys of earlier versions, read as their nested successors (``config/variance.py``).

YAML files, ``--set`` items and the ``config`` stored in an older run's ``run.json`` may still use them; each one
loads with a one-line :class:`ConfigDeprecation` warning naming the key that replaces it:

- ``isad_token_ids``, ``isad_delta``, ``ema_bins``, ``ema_rate``, ``probe_every``, ``probe_fraction`` are
  ``isad.token_ids``, ``isad.delta``, ``ema.bins``, ``ema.rate``, ``probe.every``, ``probe.fraction``;
- ``mirror: false | true | auto`` is ``masks: bernoulli | mirror | auto``;
- ``ppots_refit_every`` and ``ppots_half_life`` set the online estimates' cadence ``monitor.every`` and
  ``monitor.half_life`` (the monitor ran on P-POTS's cadence for every t-sampler) and, under P-POTS,
  ``t_sampler.refit_every`` and ``t_sampler.half_life``;
- the other ``ppots_*`` keys, ``clip_low`` / ``clip_high`` and ``mirror_plus_threshold`` are fields of one kind
  (``t_sampler.<field>`` of ``ppots``, ``t_sampler.low`` / ``high`` of ``clipped``, ``masks.single_above`` of
  ``mirror``): they apply when the configuration's final kind is that one and are ignored otherwise, as they
  were. Kept aside until every source is read, they go under the fields set with the new spelling, which win.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from mdm_scale.config.errors import ConfigError
from mdm_scale.config.variance import VarianceConfig

RENAMED = {"isad_token_ids": "isad.token_ids", "isad_delta": "isad.delta", "ema_bins": "ema.bins",
           "ema_rate": "ema.rate", "probe_every": "probe.every", "probe_fraction": "probe.fraction",
           "ppots_refit_every": "monitor.every", "ppots_half_life": "monitor.half_life"}
KIND_FIELDS = {  # old key -> (section, kind, field)
    **{f"ppots_{f}": ("t_sampler", "ppots", f) for f in ("x0", "masks", "bins", "forward_tokens", "restarts",
                                                         "refit_every", "half_life", "mix_uniform", "max_weight",
                                                         "target", "loss_max")},
    "clip_low": ("t_sampler", "clipped", "low"), "clip_high": ("t_sampler", "clipped", "high"),
    "mirror_plus_threshold": ("masks", "mirror", "single_above"),
}
MIRROR_KINDS = {False: "bernoulli", True: "mirror", "auto": "auto"}
OLD_KEYS = {*RENAMED, *KIND_FIELDS, "mirror"}
_DEFAULT_KIND = {"t_sampler": VarianceConfig().t_sampler.name, "masks": VarianceConfig().masks.name}


class ConfigDeprecation(FutureWarning):
    """An old config key was read (shown by default, once per message)."""


def new_names(old: str) -> list[str]:
    """The dotted keys that replace ``variance.<old>``."""
    names = [f"variance.{RENAMED[old]}"] if old in RENAMED else []
    if old in KIND_FIELDS:
        section, kind, name = KIND_FIELDS[old]
        names.append(f"variance.{section}.{name} (with variance.{section}: {kind})")
    return names or ["variance.masks (bernoulli, mirror or auto)"]


class LegacyKeys:
    """Reads the old keys of one configuration's sources, in order (``upgrade`` for each source), and places the
    kind fields once the kinds are known (``finish``). ``olds`` lists the old keys read, each once."""

    def __init__(self):
        self.kind_fields: dict[tuple[str, str], dict[str, Any]] = {}
        self.olds: list[str] = []

    def upgrade(self, tree: dict[str, Any]) -> dict[str, Any]:
        """A copy of one source's mapping with its old ``variance`` keys replaced (the kind fields kept aside)."""
        variance = tree.get("variance") if isinstance(tree, dict) else None
        if not isinstance(variance, dict) or not OLD_KEYS & variance.keys():
            return tree
        tree = {**tree, "variance": copy.deepcopy(variance)}
        variance = tree["variance"]
        for old in [key for key in variance if key in OLD_KEYS]:
            value = variance.pop(old)
            if old not in self.olds:
                self.olds.append(old)
            if old == "mirror":
                if not (isinstance(value, bool) or value == "auto"):
                    raise ConfigError(f"config key 'variance.mirror' = {value!r}: expected true, false or auto "
                                      f"(deprecated: use variance.masks: bernoulli, mirror or auto)")
                variance.setdefault("masks", MIRROR_KINDS[value])
            if old in RENAMED:
                section, name = RENAMED[old].split(".")
                node = variance.setdefault(section, {})
                if isinstance(node, dict):
                    node.setdefault(name, value)
            if old in KIND_FIELDS:
                section, kind, name = KIND_FIELDS[old]
                self.kind_fields.setdefault((section, kind), {})[name] = value
        return tree

    def finish(self, raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` (all sources merged) with the kind fields kept aside placed under the sections whose final kind
        they belong to; fields set with the new spelling win."""
        variance = raw.get("variance")
        if not self.kind_fields or not isinstance(variance, dict):
            return raw
        for (section, kind), fields in self.kind_fields.items():
            current = variance.get(section, _DEFAULT_KIND[section])
            if isinstance(current, str):
                current = {"name": current}
            if isinstance(current, dict) and current.get("name", _DEFAULT_KIND[section]) == kind:
                variance[section] = {**fields, **current}
        self.kind_fields.clear()
        return raw

    def warn(self, where: str | None = None) -> None:
        """One warning per old key; with ``where`` (a stored configuration), one line for all of them."""
        if where is not None and self.olds:
            olds = ", ".join(f"variance.{old}" for old in self.olds)
            warnings.warn(f"{where}: read the deprecated keys {olds} under their new names (config/legacy.py)",
                          ConfigDeprecation, stacklevel=3)
            return
        for old in self.olds:
            warnings.warn(f"config key 'variance.{old}' is deprecated: use {' and '.join(new_names(old))}",
                          ConfigDeprecation, stacklevel=3)


def upgrade_config(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """A stored configuration (one complete mapping, e.g. ``run.json``'s ``config``) in the current spelling,
    warning once if it used old keys."""
    legacy = LegacyKeys()
    upgraded = legacy.finish(legacy.upgrade(raw))
    legacy.warn(where)
    return upgraded
