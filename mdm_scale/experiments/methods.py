"""The methods of the paper's Table 1 as configuration overrides (docs/spec.md sections 3 and 6).

One line per method. A method is *available* when its overrides pass the current configuration schema
(``mdm_scale/config/schema.py``); otherwise the harness reports it as not available, with the schema's own
one-line reason, and runs the rest. Adding a method, or a variance-reduction key landing in the schema, needs
no other change.

A method's forward rows per sequence (``rows_per_sequence``) set its micro-batch under the equal-rows protocol
(``mdm-scale experiment run --budget rows``): 2 for MIRROR-family methods (``variance.mirror: true``), 1
otherwise; ``auto`` (``variance.mirror: auto``) halves its sequences itself while MIRROR is on, so it is given
the full rows.
``DOUBLED`` methods are another method's overrides at twice the sequences per step (equal-batch protocol only).
"""

from __future__ import annotations

METHODS: dict[str, dict[str, object]] = {
    "Standard": {},
    "Clipped": {"variance.t_sampler": "clipped"},
    "P-POTS": {"variance.t_sampler": "ppots"},
    "MIRROR": {"variance.mirror": True},
    "P-POTS+MIRROR": {"variance.t_sampler": "ppots", "variance.mirror": True},
    "auto": {"variance.mirror": "auto"},
    "StraTS": {"variance.t_coupling": "stratified"},
    "P-POTS+StraTS": {"variance.t_sampler": "ppots", "variance.t_coupling": "stratified"},
    "EMA": {"variance.ema_bins": 10},
    "ISAD": {"variance.isad_delta": 0.2},  # also give the task's token ids: --set variance.isad_token_ids=[...]
    "SyRM": {"variance.t_coupling": "symmetric"},
    "ARM": {"train.objective": "arm"},
}

DOUBLED = {"Standard 2x": "Standard"}
"""Methods run as another method's overrides with twice the sequences per step (the forward rows of MIRROR)."""

NAMES = (*METHODS, *DOUBLED)
"""Every name ``--methods`` accepts."""

BASELINES = ("Standard", "Clipped")
"""Methods whose runs (at any micro-batch, so Standard 2x too) every other row's worst run is compared with."""


def slug(method: str) -> str:
    """A directory name for a method: ``P-POTS+MIRROR`` -> ``p-pots+mirror``."""
    return method.lower().replace(" ", "_")


def rows_per_sequence(method: str) -> int:
    """Forward rows each sequence of a micro-batch costs: 2 with MIRROR always on, else 1."""
    return 2 if METHODS[method].get("variance.mirror") is True else 1


def overrides(method: str) -> list[str]:
    """``--set`` items of a method (a ``DOUBLED`` one: those of the method it doubles)."""
    import json

    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
            for key, value in METHODS[DOUBLED.get(method, method)].items()]


def availability(method: str, config_files: list[str], base_overrides: list[str]) -> str | None:
    """None if the method's overrides load under the current schema, else why not (one line)."""
    from mdm_scale.config.loader import load_config
    from mdm_scale.config.schema import ConfigError

    if method not in NAMES:
        return f"unknown method (known: {', '.join(NAMES)})"
    try:
        load_config(config_files, [*base_overrides, *overrides(method)])
    except ConfigError as err:
        return str(err)
    return None
