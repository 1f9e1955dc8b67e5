"""The variance-reduction methods by name: the one table behind ``mdm-scale variance --methods`` and the
methods x seeds harness (``tools/experiments``), and their help texts.

A method is one or more *parts* joined by ``+`` in the order of :func:`parts`, e.g. ``ppots+mirror``; a part is
a set of config changes (dotted key -> value) and a method applies the union of its parts' changes (two parts
may not set the same key). The parts are

- each kind of ``variance.t_sampler`` and of ``variance.masks`` other than the default one
  (``config/variance.py``), under its name: a new kind is a method with no edit here;
- ``strats`` and ``syrm`` (``variance.t_coupling``), ``isad`` (the run's ``variance.isad.token_ids``), ``ema``
  and ``arm`` below; and ``standard``, no change, on its own.

Display names are derived: the parts' labels joined by ``+`` (``ppots+mirror`` is ``P-POTS+MIRROR``).

| method        | t                          | masks          | unbiased |
| standard      | U(0, 1)                    | Bernoulli(pi)  | yes |
| mirror        | U(0, 1)                    | MIRROR pair    | yes |
| ppots         | p(t), weight 1/p(t)        | Bernoulli      | yes |
| ppots+mirror  | p(t), weight 1/p(t)        | MIRROR pair    | yes |
| strats        | stratified over the batch  | Bernoulli      | yes |
| syrm          | t and 1 - t pairs          | Bernoulli      | yes |
| isad          | U(0, 1)                    | boosted ids, HT| for context-free token losses |
| clipped       | U[beta, omega], weight 1   | Bernoulli      | no (``diffusion/clipped_t.py``) |
| auto          | U(0, 1)                    | MIRROR on or off by the online rule | yes (training only) |
| ema           | U(0, 1)                    | Bernoulli, EMA control variate of the logged loss | yes (training only) |
| arm           | none                       | none           | (another model) |
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mdm_scale.config.choice import Choice
from mdm_scale.config.errors import ConfigError
from mdm_scale.config.loader import from_dict, set_dotted, to_dict
from mdm_scale.config.schema import Config
from mdm_scale.config.variance import MaskConfig, TSamplerConfig

VARIANCE_DEFAULT = ("standard", "mirror", "ppots", "ppots+mirror", "strats", "syrm", "clipped")
"""The methods ``mdm-scale variance`` measures unless ``--methods`` says otherwise."""


@dataclass(frozen=True)
class Part:
    label: str
    changes: dict[str, Any] = field(default_factory=dict)
    keeps: tuple[str, ...] = ()
    """Keys the method takes from the run's configuration instead of resetting them (``isad``: its token ids)."""
    measurable: bool = True
    """False for parts that act only during training (``mdm-scale variance`` measures fixed noise)."""


def parts() -> dict[str, Part]:
    """Every part by name, in the order a method's name lists them: t-sampler, coupling, masks, the rest."""
    return {"standard": Part("Standard"), **_kind_parts("variance.t_sampler", TSamplerConfig),
            "strats": Part("StraTS", {"variance.t_coupling": "stratified"}),
            "syrm": Part("SyRM", {"variance.t_coupling": "symmetric"}),
            **_kind_parts("variance.masks", MaskConfig),
            "isad": Part("ISAD", keeps=("variance.isad.token_ids",)),
            "ema": Part("EMA", {"variance.ema.bins": 10}, measurable=False),
            "arm": Part("ARM", {"train.objective": "arm"})}


def _kind_parts(key: str, family: type[Choice]) -> dict[str, Part]:
    """A part for each kind of a choice section but its default."""
    default = _get(Config(), key).name
    return {name: Part(kind.label(), {f"{key}.name": name}, measurable=getattr(kind, "fixed", True))
            for name, kind in family.kinds.items() if name != default}


@dataclass(frozen=True)
class Method:
    """A method: its name, its parts' config changes, and what the run's configuration must provide."""

    name: str
    changes: dict[str, Any]
    keeps: tuple[str, ...]
    display: str
    measurable: bool

    @property
    def rows_per_sequence(self) -> int:
        """Forward rows each sequence of a micro-batch costs: 2 with MIRROR always on, else 1."""
        name = self.changes.get("variance.masks.name", Config().variance.masks.name)
        return MaskConfig.kinds[name].rows_per_sequence

    def overrides(self) -> list[str]:
        """The method as ``--set`` items (on top of the run's configuration; nothing is reset)."""
        return [f"{key}={value if isinstance(value, str) else json.dumps(value)}"
                for key, value in self.changes.items()]

    def apply(self, config: Config) -> Config:
        """``config`` with every key that any method sets (t-sampler, masks, coupling, ISAD ids, EMA, objective)
        at this method's value or the default, and the rest kept; a section of the same kind keeps its fields
        (e.g. the run's P-POTS bins). Not checked: the caller checks what it needs."""
        raw, defaults = to_dict(config), to_dict(Config())
        for key in method_keys():
            if key not in self.keeps:
                set_dotted(raw, key, self.changes.get(key, _get(defaults, key)))
        return from_dict(Config, raw)


def method(name: str) -> Method:
    """The method ``name`` (e.g. ``ppots+mirror``); a clear error naming the parts for anything else."""
    table = parts()
    names = name.split("+")
    unknown = [n for n in names if n not in table]
    if unknown or not name:
        raise ConfigError(f"unknown method {name!r}: a method is parts joined by '+' from "
                          f"{', '.join(table)} (e.g. ppots+mirror)")
    order = list(table)
    canonical = "+".join(sorted(names, key=order.index))
    if canonical != name or len(set(names)) != len(names) or ("standard" in names and len(names) > 1):
        raise ConfigError(f"method {name!r}: write {canonical!r}" if canonical != name else
                          f"method {name!r}: each part once, and standard alone")
    changes: dict[str, Any] = {}
    for n in names:
        clash = changes.keys() & table[n].changes.keys()
        if clash:
            raise ConfigError(f"method {name!r}: two parts set {sorted(clash)[0]}")
        changes.update(table[n].changes)
    return Method(name, changes, tuple(k for n in names for k in table[n].keeps),
                  "+".join(table[n].label for n in names), all(table[n].measurable for n in names))


def method_keys() -> list[str]:
    """Every key a part sets or keeps: what defines a method."""
    return list(dict.fromkeys(k for p in parts().values() for k in (*p.changes, *p.keeps)))


def methods_help(measurable_only: bool = False) -> str:
    """One line for ``--methods`` help texts (``measurable_only``: the parts ``mdm-scale variance`` measures)."""
    names = [name for name, part in parts().items() if part.measurable or not measurable_only]
    return f"comma-separated methods, each parts joined by '+' ({', '.join(names)}), e.g. ppots+mirror"


def _get(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = tree[part] if isinstance(tree, dict) else getattr(tree, part)
    return tree
