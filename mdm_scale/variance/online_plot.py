"""``mdm-scale variance plot-online``: a training run's online A/B/C (``variance/*`` scalars,
``diffusion/online_variance.py``) from its TensorBoard event files: the shares A/V, B/V, C/V and the absolute A,
B, C, V and MIRROR's pair statistic E[(L1 - L2)^2] / 2 against the step, with ``variance.masks: auto``'s setting
shaded where MIRROR was on.

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


def plot(scalars: dict[str, dict[int, float]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (shares, absolute) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, colour in (("A", "tab:blue"), ("B", "tab:orange"), ("C", "tab:green")):
        steps = sorted(scalars[f"{name}_share"])
        shares.plot(steps, [scalars[f"{name}_share"][s] for s in steps], ".-", color=colour, label=f"{name} / V")
        absolute.plot(steps, [scalars[name][s] for s in steps], ".-", color=colour, label=name)
    steps = sorted(scalars["V"])
    absolute.plot(steps, [scalars["V"][s] for s in steps], "k.-", label="V = Var(L)")
    if "pair_half_sq" in scalars:
        pair = sorted(scalars["pair_half_sq"])
        absolute.plot(pair, [scalars["pair_half_sq"][s] for s in pair], "--", color="tab:red",
                      label="E[(L1-L2)^2]/2 (MIRROR pays if > V)")
    for axis in (shares, absolute):
        _shade_mirror(axis, scalars.get("mirror", {}))
        axis.axhline(0.0, color="grey", lw=0.5)
        axis.legend(fontsize=8)
    shares.set_ylabel("share of V")
    shares.set_title(title)
    absolute.set_ylabel("variance per row")
    absolute.set_yscale("symlog", linthresh=0.1)
    absolute.set_xlabel("optimiser step")
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
