"""Components built from a config kind (``config/choice.py``): the class that a kind of ``variance.t_sampler`` or
``variance.masks`` configures.

A component family is a base class declared with ``family=True`` (``TSampler``, ``BernoulliMasks``); a class of the
family declared with ``config=<a kind's config class>`` is the component that kind builds, registered when the
class is defined. So a new kind is its config class and its component class; ``component_for`` finds it, and
nothing lists it (``docs/extending.md``).
"""

from __future__ import annotations

from typing import ClassVar

from mdm_scale.config.choice import Choice
from mdm_scale.config.errors import ConfigError


class Component:
    built_from: ClassVar[dict[type[Choice], type[Component]]]
    """The family's components by the config class they are built from."""

    def __init_subclass__(cls, family: bool = False, config: type[Choice] | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if family:
            cls.built_from = {}
        if config is not None:
            if config in cls.built_from:
                raise TypeError(f"{cls.__name__}: {config.__name__} already builds {cls.built_from[config].__name__}")
            cls.built_from[config] = cls

    @classmethod
    def component_for(cls, config: Choice) -> type:
        """The class of this family that ``config``'s kind builds."""
        try:
            return cls.built_from[type(config)]
        except KeyError:
            raise ConfigError(f"config key '{config.key('name')}' = {config.name!r}: no {cls.__name__} is built from "
                              f"{type(config).__name__}; declare `class ...({cls.__name__}, "
                              f"config={type(config).__name__})` in a module imported before the run starts") from None
