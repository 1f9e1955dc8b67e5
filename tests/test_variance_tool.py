"""``mdm-scale variance`` recovers A, B and C where they are known exactly, and its pieces are unbiased.

The model is ``analytic_mdm.AnalyticMDM`` (token losses that depend on the token and on how many tokens of the row
are masked, through the real masked head), its weights doubled for a stronger dependence on t and on the token, on
four 5-token pretraining blocks with very different losses. eps = 0.3 keeps the loss's tails light enough for the
tool's normal intervals to be calibrated (``test_variance_intervals.py`` measures their coverage). E_M and Var_M
follow by enumerating the masks, the t-integrals by a fine midpoint rule, and the x0-average over the blocks (drawn
uniformly with replacement): these are the exact A, B, C. Each estimate must lie within z = 3.89 (alpha = 1e-4) of
the tool's own standard errors, and each test checks its power: that tolerance is below the exact value of every
term it claims, so an estimate of 0 or of twice the value fails.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from analytic_mdm import MASK, PARAMS, W0, AnalyticMDM, exact_abc, midpoints, moments
from mdm_scale.config.loader import load_config
from mdm_scale.data.examples import TokenArray, TokenBlocks
from mdm_scale.distributed.env import DistEnv
from mdm_scale.variance.decomposition import Z95, decompose, summarize_unit
from mdm_scale.variance.methods import build_method
from mdm_scale.variance.runner import Subject, ToolSettings, VarianceRun
from mdm_scale.variance.sketch import GradientSketch

N_TOK, EPS = 5, 0.3
WEIGHT = 2 * W0
BLOCKS = np.array([[3, 3, 3, 3, 4], [7, 7, 6, 7, 7], [4, 5, 6, 3, 7], [6, 6, 7, 5, 5]])
ISAD_IDS, ISAD_DELTA = (6, 7), 0.2
CLIP = (0.3, 0.8)
Z = 3.8906  # two-sided alpha = 1e-4


class Engine:
    def __init__(self, module):
        self.module = module

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss):
        loss.backward()


def subject(cfg, model) -> Subject:
    data = TokenBlocks(TokenArray([BLOCKS.reshape(-1)]), N_TOK)
    return Subject(cfg, DistEnv(0, 1, 0, torch.device("cpu")), Engine(model), data, pad_id=0, mask_token_id=MASK)


def exact_moments(mirror: bool, isad: bool, t: np.ndarray, projection: np.ndarray | None = None):
    boosted = ISAD_IDS if isad else ()
    return moments(AnalyticMDM(weight=WEIGHT), BLOCKS.tolist(), t, EPS, mirror=mirror, boosted=boosted,
                   delta=ISAD_DELTA, projection=projection, gradient=projection is not None)


def assert_recovered(measured: dict, exact: dict, terms=("A", "B", "C", "total"), powered=("A", "B", "C")):
    """Every term within Z of the tool's SE; each ``powered`` term's tolerance below its exact value."""
    for term in terms:
        lo, hi = measured[f"{term}_ci95"] if term != "mean" else measured["mean_ci95"]
        tolerance = Z * (hi - lo) / (2 * Z95)
        assert abs(measured[term] - exact[term]) <= tolerance + 1e-9, (term, measured[term], exact[term], tolerance)
        if term in powered:
            assert tolerance < abs(exact[term]), ("no power", term, exact[term], tolerance)
    assert abs(measured["check"]["z"]) < Z, measured["check"]


# ---- tests ----------------------------------------------------------------------------------------------------
def test_decompose_recovers_nested_gaussian_components():
    """Y = alpha_u + beta_uj + eps_ujk with variances C, B, A: the nested ANOVA estimates each one."""
    rng = np.random.default_rng(0)
    var = {"A": 0.5, "B": 2.0, "C": 1.0}
    units, num_t, num_masks, d = 400, 4, 3, 3
    summaries = []
    for _ in range(units):
        y = (rng.normal(0, np.sqrt(var["C"] / d), (1, 1, d)) + rng.normal(0, np.sqrt(var["B"] / d), (num_t, 1, d))
             + rng.normal(0, np.sqrt(var["A"] / d), (num_t, num_masks, d)))
        summaries.append(summarize_unit(y))
    result = decompose(summaries, num_t, num_masks)
    assert_recovered(result, {**var, "total": sum(var.values())}, powered=())


@pytest.fixture(scope="module")
def tool_cfg():
    """The run's config: its clip interval is the clipped method's (a method keeps the fields of its own kind)."""
    return load_config(None, [f"variance.eps={EPS}", f"variance.isad.token_ids=[{ISAD_IDS[0]}, {ISAD_IDS[1]}]",
                              f"variance.t_sampler={{name: clipped, low: {CLIP[0]}, high: {CLIP[1]}}}", "seed=3",
                              "data.seq_len=16"])


# Terms with power per method: StraTS removes most of B, SyRM's B is small and Clipped's t-range is narrow, so
# they claim only A and C.
POWERED = {"strats": ("A", "C"), "syrm": ("A", "C"), "clipped": ("A", "C")}


@pytest.mark.parametrize("name", ["standard", "mirror", "isad", "clipped", "syrm", "strats"])
def test_tool_recovers_exact_loss_decomposition(tool_cfg, name):
    group = 4
    settings = ToolSettings(methods=[name], num_x0=480, num_t=4, num_masks=2, grad_dim=0, strats_batch=group)
    method = build_method(name, tool_cfg, group)
    result = VarianceRun(subject(tool_cfg, AnalyticMDM(weight=WEIGHT)), settings).measure(method)
    measured = decompose([s for _, s in result.loss], settings.num_t, settings.num_masks, method.group)
    t = midpoints(*CLIP, 1000) if name == "clipped" else midpoints(0.0, 1.0, 1000)
    coupling = {"syrm": "symmetric", "strats": "stratified"}.get(name, "independent")
    exact = exact_abc(exact_moments(name == "mirror", name == "isad", t), coupling=coupling, group=group)
    assert_recovered(measured, exact, ("A", "B", "C", "total", "mean"), POWERED.get(name, ("A", "B", "C")))
    if name == "mirror":  # independent pairs would have half one mask's A: far outside the tolerance
        independent = exact_abc(exact_moments(False, False, t))["A"] / 2
        lo, hi = measured["A_ci95"]
        assert abs(independent - exact["A"]) > 2 * Z * (hi - lo) / (2 * Z95), (independent, exact["A"])


def test_unbiased_methods_share_the_standard_mean_and_the_biased_ones_do_not():
    """Exact means: MIRROR equals the standard objective; Clipped differs (its documented bias), and so does ISAD
    here, because this model's token losses depend on the other tokens' masks."""
    full, clipped = midpoints(0.0, 1.0, 500), midpoints(*CLIP, 500)
    standard = exact_moments(False, False, full).f.mean()
    assert exact_moments(True, False, full).f.mean() == pytest.approx(standard, rel=1e-9)
    assert abs(exact_moments(False, False, clipped).f.mean() - standard) > 0.02
    assert abs(exact_moments(False, True, full).f.mean() - standard) > 1e-3


@pytest.mark.parametrize("name", ["ppots", "ppots+mirror"])
def test_tool_recovers_exact_decomposition_under_importance_sampled_t(tool_cfg, name):
    """P-POTS with a fixed density p(t) = (1 + 2t)/2 (weight 1/p): A and B are the 1/p-weighted integrals."""
    from mdm_scale.diffusion.ppots import PiecewiseLinearDensity

    method = build_method(name, tool_cfg, 4)
    method.t_sampler.density = PiecewiseLinearDensity(torch.tensor([0.5, 1.5], dtype=torch.float64))
    settings = ToolSettings(methods=[name], num_x0=480, num_t=4, num_masks=2, grad_dim=0)
    result = VarianceRun(subject(tool_cfg, AnalyticMDM(weight=WEIGHT)), settings).measure(method)
    measured = decompose([s for _, s in result.loss], settings.num_t, settings.num_masks)
    t = midpoints(0.0, 1.0, 1000)
    m = exact_moments(name == "ppots+mirror", False, t)
    exact = exact_abc(m, density=0.5 + t)
    assert exact["mean"] == pytest.approx(exact_abc(m)["mean"])  # unbiased
    assert_recovered(measured, exact, ("A", "B", "C", "total", "mean"), powered=("A", "C"))  # B is small here


@pytest.mark.parametrize("name", ["standard", "mirror"])
def test_tool_recovers_exact_gradient_decomposition(tool_cfg, name):
    dim = 7
    model = AnalyticMDM(weight=WEIGHT)
    probe = GradientSketch(model, dim, tool_cfg.seed, torch.device("cpu"))
    probe.active = True
    columns = []
    for p in range(PARAMS):
        model.weight.reshape(-1)[p].backward()
        columns.append(probe.take().numpy())
    probe.remove()
    projection = np.stack(columns, 1)  # (d, P): the sketch is this linear map
    settings = ToolSettings(methods=[name], num_x0=400, num_t=3, num_masks=2, grad_dim=dim)
    result = VarianceRun(subject(tool_cfg, model), settings).measure(build_method(name, tool_cfg, 4))
    measured = decompose([s for _, s in result.grad], settings.num_t, settings.num_masks)
    m = exact_moments(name == "mirror", False, midpoints(0.0, 1.0, 400), projection)
    assert_recovered(measured, exact_abc(m, gradient=True), powered=("A", "C"))  # the gradient's B is small here


def test_sketch_preserves_squared_norms_on_average():
    """E_signs |S(g)|^2 = |g|^2: average over 400 independently seeded sketches of one vector."""
    model = nn.Linear(30, 20)
    g = torch.randn(20, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    norms = []
    for seed in range(400):
        sketch = GradientSketch(model, 16, seed, torch.device("cpu"))
        sketch.add("weight", g)
        norms.append(float((sketch.take() ** 2).sum()))
        sketch.remove()
    norms = np.array(norms)
    assert abs(norms.mean() - float((g**2).sum())) < 4.5 * norms.std(ddof=1) / np.sqrt(len(norms))



def test_bad_plans_fail_before_any_model_is_built(tool_cfg):
    from mdm_scale.config.schema import ConfigError

    strats = build_method("strats", tool_cfg, 16)
    with pytest.raises(ConfigError, match=r"--x0 = 24: method 'strats' needs a multiple of 32"):
        ToolSettings(num_x0=24).check([strats], world=2)
    with pytest.raises(ConfigError, match="--masks = 1: must be >= 2"):
        ToolSettings(num_masks=1).check([], world=1)
    with pytest.raises(ConfigError, match="unknown method 'mirrors'"):
        build_method("mirrors", tool_cfg, 16)
    with pytest.raises(ConfigError, match="'arm' needs a model trained with train.objective=arm"):
        build_method("arm", tool_cfg, 16)
    with pytest.raises(ConfigError, match="method 'mirror\\+ppots': write 'ppots\\+mirror'"):
        build_method("mirror+ppots", tool_cfg, 16)
    for name in ("auto", "ema", "ppots+auto"):
        with pytest.raises(ConfigError, match=f"--methods {re.escape(name)}: acts only during training"):
            build_method(name, tool_cfg, 16)
    with pytest.raises(ConfigError, match="--methods isad: set variance.isad.token_ids"):
        build_method("isad", load_config(None, []), 16)


def test_methods_set_what_defines_them_and_keep_the_rest_of_the_run_config(tool_cfg):
    """Each method resets the keys that define methods (the run's t-sampler is clipped here) and keeps the rest:
    eps, the ISAD ids for isad only, and a kind's own fields when the run has that kind (the clip interval)."""
    from mdm_scale.config.variance import BernoulliMasksConfig, MirrorMasksConfig, PPOTSConfig, UniformTConfig
    from mdm_scale.diffusion.coupled_t import StratifiedT
    from mdm_scale.diffusion.ppots import PPOTSSampler

    standard = build_method("standard", tool_cfg, 16).config.variance
    assert standard.t_sampler == UniformTConfig() and standard.masks == BernoulliMasksConfig()
    assert standard.isad.token_ids == [] and standard.eps == EPS
    narrow = load_config(None, ["variance.t_sampler={name: clipped, low: 0.2, high: 0.6}", "variance.masks=mirror"])
    clipped = build_method("clipped", narrow, 16).config.variance
    assert (clipped.t_sampler.low, clipped.t_sampler.high, clipped.masks) == (0.2, 0.6, BernoulliMasksConfig())
    assert build_method("isad", tool_cfg, 16).config.variance.isad.token_ids == list(ISAD_IDS)
    both = build_method("ppots+strats", tool_cfg, 16)
    assert both.group == 16 and isinstance(both.t_sampler, StratifiedT) and isinstance(both.t_sampler.inner,
                                                                                       PPOTSSampler)
    pair = build_method("ppots+mirror", tool_cfg, 16).config.variance
    assert pair.t_sampler == PPOTSConfig() and pair.masks == MirrorMasksConfig() and pair.isad.token_ids == []
    assert build_method("syrm", tool_cfg, 16).group == 2
