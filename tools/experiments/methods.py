"""The methods of the paper's Table 1 as configuration overrides (SPEC sections 3 and 6).

One line per method. A method is *available* when its overrides pass the current configuration schema
(``mdm_scale/config/schema.py``); otherwise the harness reports it as not available, with the schema's own
one-line reason, and runs the rest. Adding a method, or a variance-reduction key landing in the schema, needs
no other change.
"""

from __future__ import annotations

METHODS: dict[str, dict[str, object]] = {
    "Standard": {},
    "Clipped": {"variance.t_sampler": "clipped"},
    "P-POTS": {"variance.t_sampler": "ppots"},
    "MIRROR": {"variance.mirror": True},
    "P-POTS+MIRROR": {"variance.t_sampler": "ppots", "variance.mirror": True},
    "StraTS": {"variance.t_coupling": "stratified"},
    "EMA": {"variance.ema_bins": 10},
    "ISAD": {"variance.isad_delta": 0.2},  # also give the task's token ids: --set variance.isad_token_ids=[...]
    "SyRM": {"variance.t_coupling": "symmetric"},
    "ARM": {"train.objective": "arm"},
}

BASELINES = ("Standard", "Clipped")
"""The rows every other method's worst run is compared with (the paper's "best baseline run below our worst")."""


def slug(method: str) -> str:
    """A directory name for a method: ``P-POTS+MIRROR`` -> ``p-pots+mirror``."""
    return method.lower().replace(" ", "_")


def overrides(method: str) -> list[str]:
    """``--set`` items of a method."""
    import json

    return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
            for key, value in METHODS[method].items()]


def availability(method: str, config_files: list[str], base_overrides: list[str]) -> str | None:
    """None if the method's overrides load under the current schema, else why not (one line)."""
    from mdm_scale.config.loader import load_config
    from mdm_scale.config.schema import ConfigError

    if method not in METHODS:
        return f"unknown method (known: {', '.join(METHODS)})"
    try:
        load_config(config_files, [*base_overrides, *overrides(method)])
    except ConfigError as err:
        return str(err)
    return None
