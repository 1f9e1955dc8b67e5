"""Config sections that are one of several registered kinds, e.g. ``variance.t_sampler: {name: ppots, bins: 64}``.

A *family* is a dataclass base declared with ``family=<its dotted key>`` (``TSamplerConfig``, ``MaskConfig`` in
``config/variance.py``). Every dataclass subclass of a family that gives ``name`` a default registers itself as a
*kind* of that family under that name, when the class is defined (``__init_subclass__``): a kind is one class,
and no list, ``Literal`` or builder names it. The loader (``loader.py``) reads ``name`` first and builds that
kind's dataclass from the other keys, so each kind has its own typed fields, checked like every other key.

Spelling rules (``loader.py``): a string in place of the mapping is its ``name`` (``--set variance.t_sampler=ppots``
is ``{name: ppots}``), and a mapping whose ``name`` differs from the section's current kind replaces the
section rather than merging into it (the fields of one kind mean nothing to another).

The component a kind configures (a t-sampler or mask generator in ``mdm_scale/diffusion``) registers itself
against the kind's class (``TSampler``'s ``config=`` class keyword), one layer up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mdm_scale.config.errors import require


@dataclass
class Choice:
    """Base of every family. ``name`` is the kind; each kind's class gives it as the field's default."""

    name: str = ""

    family: ClassVar[str]
    """The dotted key of the family's section, e.g. ``variance.t_sampler`` (set by ``family=``)."""
    kinds: ClassVar[dict[str, type[Choice]]]
    """The family's kinds by name, in the order they were defined."""
    display: ClassVar[str] = ""
    """How method tables and reports write the kind (``config/methods.py``); empty: the name."""

    def __init_subclass__(cls, family: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if family is not None:
            cls.family, cls.kinds = family, {}
            return
        name = cls.__dict__.get("name")
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__}: a kind of {cls.family} declares `name: str = \"<its name>\"`")
        if name in cls.kinds:
            raise TypeError(f"{cls.__name__}: {cls.family} kind {name!r} is already {cls.kinds[name].__name__}")
        cls.kinds[name] = cls

    def __post_init__(self) -> None:
        require(self.name == type(self).name, self.key("name"), self.name,
                f"this section is a {type(self).__name__} ({type(self).name!r})")

    def key(self, field: str) -> str:
        """The dotted config key of one of this section's fields, for error messages."""
        return f"{self.family}.{field}"

    @classmethod
    def label(cls) -> str:
        return cls.display or cls.name

    def check(self, config) -> None:
        """Check this kind's fields; ``config`` is the whole run :class:`~mdm_scale.config.schema.Config`."""
