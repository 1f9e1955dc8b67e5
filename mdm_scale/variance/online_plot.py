"""``mdm-scale variance plot-online``: a training run's online A/B/C (``variance/*`` scalars,
``diffusion/online_variance.py``) from its TensorBoard event files: the shares A/V, B/V, C/V, the absolute A, B,
C, V and MIRROR's pair statistic E[(L1 - L2)^2] / 2, and the rule's gain -(cov_pair + cov_syrm) against the step,
each with its 95% interval shaded (``_lo``, ``_hi``; runs from before the intervals were logged are drawn without
them), with ``variance.masks: auto``'s setting shaded where MIRROR was on.

    mdm-scale variance plot-online runs/quickstart/tensorboard --out docs/figures/online_abc.png
"""

from __future__ import annotations

from pathlib import Path

from mdm_scale.data.records import DataError


def read_variance_scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Every ``variance/<name>`` scalar of the event files in ``tb_dir`` as {name: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("variance/")]
    if not tags:
        raise DataError(f"{tb_dir}: no variance/* scalars (was the run trained with an mdm objective and a "
                         f"variance.monitor.every > 0?)")
    return {t.split("/", 1)[1]: {e.step: e.value for e in acc.Scalars(t)} for t in tags}


def _series(axis, scalars: dict[str, dict[int, float]], name: str, label: str, **style) -> None:
    """``name`` against the step, with its 95% interval (``name_lo``, ``name_hi``) shaded where logged."""
    steps = sorted(scalars[name])
    line, = axis.plot(steps, [scalars[name][s] for s in steps], marker=".", label=label, **style)
    low, high = scalars.get(f"{name}_lo", {}), scalars.get(f"{name}_hi", {})
    banded = [s for s in steps if s in low and s in high]
    if banded:
        axis.fill_between(banded, [low[s] for s in banded], [high[s] for s in banded], color=line.get_color(),
                          alpha=0.15, lw=0)


def plot(scalars: dict[str, dict[int, float]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rule = "gain" in scalars
    fig, axes = plt.subplots(3 if rule else 2, 1, figsize=(7, 8.5 if rule else 6), sharex=True)
    shares, absolute = axes[0], axes[1]
    for name, colour in (("A", "tab:blue"), ("B", "tab:orange"), ("C", "tab:green")):
        _series(shares, scalars, f"{name}_share", f"{name} / V", color=colour)
        _series(absolute, scalars, name, name, color=colour)
    _series(absolute, scalars, "V", "V = Var(L)", color="k")
    if "pair_half_sq" in scalars:
        _series(absolute, scalars, "pair_half_sq", "E[(L1-L2)^2]/2 (MIRROR pays if > V, + cov_syrm under SyRM)",
                color="tab:red", linestyle="--")
    if rule:
        _series(axes[2], scalars, "gain", "gain -(cov_pair + cov_syrm) (MIRROR pays if > 0)", color="tab:red")
        axes[2].set_ylabel("variance per row")
    for axis in axes:
        _shade_mirror(axis, scalars.get("mirror", {}))
        axis.axhline(0.0, color="grey", lw=0.5)
        axis.legend(fontsize=8)
    shares.set_ylabel("share of V")
    shares.set_title(title)
    absolute.set_ylabel("variance per row")
    absolute.set_yscale("symlog", linthresh=0.1)
    axes[-1].set_xlabel("optimiser step")
    fig.tight_layout()
    return fig


def _shade_mirror(axis, mirror: dict[int, float]) -> None:
    """Shade the refit intervals after which MIRROR was on (the setting logged at a refit holds until the next)."""
    steps = sorted(mirror)
    for here, following in zip(steps, steps[1:] + [None]):
        if mirror[here] > 0.5:
            axis.axvspan(here, following if following is not None else here, color="tab:red", alpha=0.08, lw=0)


def plot_online_abc(tb_dir: Path, out: Path, title: str) -> Path:
    """Read ``tb_dir``'s ``variance/*`` scalars and write the figure to ``out`` (PNG)."""
    figure = plot(read_variance_scalars(tb_dir), title)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return out
