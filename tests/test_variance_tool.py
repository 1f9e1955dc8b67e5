"""``mdm-scale variance`` recovers A, B and C where they are known exactly, and its pieces are unbiased.

The synthetic model: token i of a block x0 (n tokens, all eligible) has CE_i = c[x0_i] (1 + gamma S / n), with S
the number of masked tokens of its row, so a token's loss depends on its id and on the masking rate. For every
method, E_M and Var_M of the per-sequence loss follow by enumerating all masks (2^n Bernoulli patterns, 4^n
MIRROR pair states), the t-integrals by a fine midpoint rule, and the x0-average over the finite set of blocks
(drawn uniformly with replacement): these are the exact A, B, C. The tool's estimates must agree within 4.5
of their own standard errors (the report's 95% intervals give the SE).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mdm_scale.config.loader import load_config
from mdm_scale.data.dataset import TokenizedData
from mdm_scale.distributed.env import DistEnv
from mdm_scale.models.modeling_mdm import MDMOutput
from mdm_scale.variance.decomposition import Z_95, decompose, summarize_unit
from mdm_scale.variance.methods import build_method
from mdm_scale.variance.runner import ToolSettings, VarianceRun
from mdm_scale.variance.sketch import GradientSketch

MASK, N_TOK, VOCAB, GAMMA, EPS = 2, 5, 10, 0.8, 0.05
BLOCKS = np.array([[4, 5, 6, 7, 8], [9, 9, 4, 4, 5], [6, 7, 9, 5, 4], [8, 8, 8, 6, 9]])
ISAD_IDS = (8, 9)
CLIP = (0.3, 0.8)


class ContextModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.linspace(0.2, 2.0, VOCAB, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, loss_positions=None, loss_targets=None, loss_coef=None):
        masked = (input_ids == MASK).sum(1).to(torch.float64)
        rows = loss_positions // input_ids.shape[1]
        ce = self.c[loss_targets] * (1 + GAMMA * masked[rows] / N_TOK)
        return MDMOutput(loss=(ce * loss_coef.to(torch.float64)).sum(), token_ce=ce.detach())


class Engine:
    def __init__(self, module):
        self.module = module

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss):
        loss.backward()


def fake_trainer(cfg, model):
    tokens = BLOCKS.reshape(-1)
    offsets = np.arange(0, len(tokens) + 1, N_TOK)
    data = TokenizedData(tokens, offsets, np.zeros(len(BLOCKS), dtype=np.int64))
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    return SimpleNamespace(engine=Engine(model), env=env, data=SimpleNamespace(train=data), cfg=cfg, pad_id=0,
                           mask_token_id=MASK)


# ---- exact values by enumeration ------------------------------------------------------------------------------
def _per_mask(block, masks, q):
    """loss (T, m) and gradient wrt c (T, m, V) of each mask pattern (m, n) at inclusion q (T, n)."""
    c = np.linspace(0.2, 2.0, VOCAB)
    scale = 1 + GAMMA * masks.sum(1) / N_TOK  # (m,)
    contrib = masks[None] / q[:, None, :] / N_TOK * scale[None, :, None]  # (T, m, n)
    onehot = np.eye(VOCAB)[block]  # (n, V)
    return (contrib * c[block]).sum(-1), contrib @ onehot


def exact_curves(mirror: bool, isad: bool, t: np.ndarray, projection: np.ndarray | None):
    """f (N, T) and a (N, T) of the loss; and of the projected gradient if ``projection`` (d, V) is given."""
    pi = (1 - EPS) * t + EPS
    out = {"f": [], "a": [], "fg": [], "ag": []}
    for block in BLOCKS:
        q = np.repeat(pi[:, None], N_TOK, 1)
        if isad:
            q = np.where(np.isin(block, ISAD_IDS)[None], np.minimum(q + 0.2, 1.0), q)
        if not mirror:
            masks = np.array(list(itertools.product([0, 1], repeat=N_TOK)), dtype=float)
            prob = np.prod(np.where(masks[None] == 1, q[:, None], 1 - q[:, None]), -1)
            loss, grad = _per_mask(block, masks, q)
        else:  # per token: (row 1, row 2) in {(1,0), (0,1), (1,1), (0,0)}
            states = np.array(list(itertools.product(range(4), repeat=N_TOK)))
            first, second = np.isin(states, (0, 2)).astype(float), np.isin(states, (1, 2)).astype(float)
            lo = np.minimum(q, 1 - q)
            p_state = np.stack([lo, lo, np.maximum(0, 2 * q - 1), np.maximum(0, 1 - 2 * q)], -1)  # (T, n, 4)
            prob = np.prod(np.take_along_axis(p_state[:, None], states[None, :, :, None], -1)[..., 0], -1)
            l1, g1 = _per_mask(block, first, q)
            l2, g2 = _per_mask(block, second, q)
            loss, grad = (l1 + l2) / 2, (g1 + g2) / 2
        f = (prob * loss).sum(1)
        out["f"].append(f)
        out["a"].append((prob * loss**2).sum(1) - f**2)
        if projection is not None:
            sketched = grad @ projection.T  # (T, m, d)
            fg = (prob[..., None] * sketched).sum(1)
            out["fg"].append(fg)
            out["ag"].append((prob[..., None] * sketched**2).sum(1).sum(-1) - (fg**2).sum(-1))
    return {k: np.array(v) for k, v in out.items() if v}


def exact_abc(f, a, coupling: str = "independent", group: int = 1, density: np.ndarray | None = None) -> dict:
    """f (N, T[, d]) and a (N, T) on a midpoint grid of t. Vectors: traces. With an importance ``density``
    p (T,) on the grid (t ~ p, weight 1/p): A = int a/p dt, B = int |f|^2/p dt - |int f dt|^2 per x0."""
    vec = f if f.ndim == 3 else f[..., None]
    per_x = vec.mean(1)  # (N, d)
    p = np.ones(a.shape[1]) if density is None else density
    A = (a / p).mean()
    B = ((vec**2).sum(-1) / p).mean(1).mean() - (per_x**2).sum(-1).mean()
    C = ((per_x - per_x.mean(0)) ** 2).sum(-1).mean()
    fbar, mu = vec.mean(0), per_x.mean(0)  # (T, d), (d,)
    if coupling == "symmetric":  # + Cov_t(fbar(t), fbar(1 - t)) (grid symmetric about 1/2)
        B += ((fbar * fbar[::-1]).sum(-1).mean() - (mu**2).sum())
    if coupling == "stratified":  # - between-strata variance of fbar
        strata = fbar.reshape(group, -1, fbar.shape[-1]).mean(1)
        B -= ((strata - mu) ** 2).sum(-1).mean()
    return {"A": A, "B": B, "C": C, "total": A + B + C, "mean": float(mu[0])}


def midpoints(lo, hi, n=2000):
    return lo + (hi - lo) * (np.arange(n) + 0.5) / n


def assert_recovered(measured: dict, exact: dict, terms=("A", "B", "C", "total")):
    for term in terms:
        lo, hi = measured[f"{term}_ci95"] if term != "mean" else measured["mean_ci95"]
        se = (hi - lo) / (2 * Z_95)
        assert abs(measured[term] - exact[term]) <= 4.5 * se + 1e-9, (term, measured[term], exact[term], se)
    assert abs(measured["check"]["z"]) < 4.5, measured["check"]


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
    assert_recovered(result, {**var, "total": sum(var.values())})


@pytest.fixture(scope="module")
def tool_cfg():
    return load_config(None, [f"variance.eps={EPS}", f"variance.isad_token_ids=[{ISAD_IDS[0]}, {ISAD_IDS[1]}]",
                              f"variance.clip_low={CLIP[0]}", f"variance.clip_high={CLIP[1]}", "seed=3",
                              "data.seq_len=16"])


@pytest.mark.parametrize("name", ["standard", "mirror", "isad", "clipped", "syrm", "strats"])
def test_tool_recovers_exact_loss_decomposition(tool_cfg, name):
    group = 4
    settings = ToolSettings(methods=[name], num_x0=480, num_t=3, num_masks=2, grad_dim=0, strats_batch=group)
    method = build_method(name, tool_cfg, group)
    result = VarianceRun(fake_trainer(tool_cfg, ContextModel()), settings).measure(method)
    measured = decompose([s for _, s in result.loss], settings.num_t, settings.num_masks, method.group)
    t = midpoints(*CLIP, 1000) if name == "clipped" else midpoints(0.0, 1.0, 1000)
    curves = exact_curves(name == "mirror", name == "isad", t, None)
    coupling = {"syrm": "symmetric", "strats": "stratified"}.get(name, "independent")
    exact = exact_abc(curves["f"], curves["a"], coupling, group)
    assert_recovered(measured, exact, ("A", "B", "C", "total", "mean"))


def test_unbiased_methods_share_the_standard_mean_and_the_biased_ones_do_not():
    """Exact means: MIRROR, SyRM and StraTS equal the standard objective; Clipped differs (its documented bias),
    and so does ISAD here, because this model's token losses depend on the other tokens' masks."""
    full, clipped = midpoints(0.0, 1.0, 500), midpoints(*CLIP, 500)
    standard = exact_curves(False, False, full, None)["f"].mean()
    assert exact_curves(True, False, full, None)["f"].mean() == pytest.approx(standard, rel=1e-9)
    assert abs(exact_curves(False, False, clipped, None)["f"].mean() - standard) > 0.02
    assert abs(exact_curves(False, True, full, None)["f"].mean() - standard) > 1e-3


@pytest.mark.parametrize("name", ["ppots", "ppots+mirror"])
def test_tool_recovers_exact_decomposition_under_importance_sampled_t(tool_cfg, name):
    """P-POTS with a fixed density p(t) = (1 + 2t)/2 (weight 1/p): A and B are the 1/p-weighted integrals."""
    from mdm_scale.diffusion.ppots import PiecewiseLinearDensity

    method = build_method(name, tool_cfg, 4)
    method.t_sampler.density = PiecewiseLinearDensity(torch.tensor([0.5, 1.5], dtype=torch.float64))
    settings = ToolSettings(methods=[name], num_x0=480, num_t=3, num_masks=2, grad_dim=0)
    result = VarianceRun(fake_trainer(tool_cfg, ContextModel()), settings).measure(method)
    measured = decompose([s for _, s in result.loss], settings.num_t, settings.num_masks)
    t = midpoints(0.0, 1.0, 1000)
    curves = exact_curves(name == "ppots+mirror", False, t, None)
    exact = exact_abc(curves["f"], curves["a"], density=0.5 + t)
    assert exact["mean"] == pytest.approx(exact_abc(curves["f"], curves["a"])["mean"])  # unbiased
    assert_recovered(measured, exact, ("A", "B", "C", "total", "mean"))


@pytest.mark.parametrize("name", ["standard", "mirror"])
def test_tool_recovers_exact_gradient_decomposition(tool_cfg, name):
    dim = 7
    model = ContextModel()
    probe = GradientSketch(model, dim, tool_cfg.seed, torch.device("cpu"))
    probe.active = True
    columns = []
    for v in range(VOCAB):
        model.c[v].backward()
        columns.append(probe.take().numpy())
    probe.remove()
    projection = np.stack(columns, 1)  # (d, V): the sketch is this linear map
    settings = ToolSettings(methods=[name], num_x0=400, num_t=3, num_masks=2, grad_dim=dim)
    result = VarianceRun(fake_trainer(tool_cfg, model), settings).measure(build_method(name, tool_cfg, 4))
    measured = decompose([s for _, s in result.grad], settings.num_t, settings.num_masks)
    curves = exact_curves(name == "mirror", False, midpoints(0.0, 1.0, 400), projection)
    assert_recovered(measured, exact_abc(curves["fg"], curves["ag"]))


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
