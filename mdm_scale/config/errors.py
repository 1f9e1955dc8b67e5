"""The one error type of the configuration, and the range check that raises it."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key (``section.key``) and value."""


def require(ok: bool, key: str, value: Any, why: str) -> None:
    """Raise a :class:`ConfigError` naming ``key`` and ``value`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: {why}")
