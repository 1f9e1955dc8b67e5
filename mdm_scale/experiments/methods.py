"""The harness's view of the method table (``mdm_scale/config/methods.py``, docs/spec.md sections 3 and 6).

A method is a name of the package's table (``standard``, ``mirror``, ``ppots+mirror``, ``auto``, ...), run as its
config changes on top of the experiment's configuration. It is *available* when those changes pass the current
configuration schema; otherwise the harness reports it as not available, with the schema's own one-line reason,
and runs the rest. Reports show the table's display names (``P-POTS+MIRROR``).

A method's forward rows per sequence (``rows_per_sequence``) set its micro-batch under the equal-rows protocol
(``mdm-scale experiment run --budget rows``): 2 for MIRROR-family methods (``variance.masks: mirror``), 1
otherwise; ``auto`` (``variance.masks: auto``) halves its sequences itself while MIRROR is on, so it is given the
full rows. ``DOUBLED`` methods are another method's changes at twice the sequences per step (equal-batch protocol
only).
"""

from __future__ import annotations

from mdm_scale.config.methods import method

DOUBLED = {"standard 2x": "standard"}
"""Methods run as another method's changes with twice the sequences per step (the forward rows of MIRROR)."""

BASELINES = ("standard", "clipped")
"""Methods whose runs (at any micro-batch, so standard 2x too) every other row's worst run is compared with."""


def display(name: str) -> str:
    """How reports write a method: ``ppots+mirror`` -> ``P-POTS+MIRROR``, ``standard 2x`` -> ``Standard 2x``."""
    return f"{method(DOUBLED[name]).display} 2x" if name in DOUBLED else method(name).display


def slug(name: str) -> str:
    """A directory name for a method: ``ppots+mirror`` -> ``p-pots+mirror``."""
    return display(name).lower().replace(" ", "_")


def rows_per_sequence(name: str) -> int:
    """Forward rows each sequence of a micro-batch costs: 2 with MIRROR always on, else 1."""
    return method(DOUBLED.get(name, name)).rows_per_sequence


def overrides(name: str) -> list[str]:
    """``--set`` items of a method (a ``DOUBLED`` one: those of the method it doubles)."""
    return method(DOUBLED.get(name, name)).overrides()


def availability(name: str, config_files: list[str], base_overrides: list[str]) -> str | None:
    """None if the method's changes load under the current schema, else why not (one line)."""
    from mdm_scale.config.loader import load_config
    from mdm_scale.config.schema import ConfigError

    try:
        load_config(config_files, [*base_overrides, *overrides(name)])
    except ConfigError as err:
        return str(err)
    return None


def known(name: str) -> bool:
    """Whether ``name`` is a method of the table or a ``DOUBLED`` one."""
    from mdm_scale.config.schema import ConfigError

    try:
        method(DOUBLED.get(name, name))
    except ConfigError:
        return False
    return True
