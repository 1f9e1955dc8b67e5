"""The MDM objective of docs/spec.md section 1: masks, hand-computed loss values, the ARM baseline, keyed noise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mdm_scale.core.batch import Batch
from mdm_scale.core.noise import Stream, keyed_uniform
from mdm_scale.diffusion.masks import BernoulliMasks, MirrorMasks, mask_probability
from mdm_scale.diffusion.objective import ARMObjective, MDMObjective
from mdm_scale.diffusion.t_samplers import UniformT
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion

MASK = 2
EPS = 1e-3


def make_batch(first_index: int = 0) -> Batch:
    """Three rows: prompt lengths 2, 3, 1; real lengths 6, 8, 5 in width 8 (pads = 0)."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 0, 0], [11, 12, 13, 14, 15, 16, 17, 18], [19, 20, 21, 22, 23, 0, 0, 0]])
    real = torch.tensor([[1] * 6 + [0] * 2, [1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)
    loss_mask = real.clone()
    for row, prompt in enumerate([2, 3, 1]):
        loss_mask[row, :prompt] = False
    return Batch(input_ids=ids, loss_mask=loss_mask, sample_index=torch.arange(first_index, first_index + 3),
                 attention_mask=real)


def objective(mirror: bool = False, seed: int = 0) -> MDMObjective:

    return MDMObjective(UniformT(seed), (MirrorMasks if mirror else BernoulliMasks)(seed, EPS), MASK)


@pytest.mark.parametrize("mirror", [False, True])
def test_masks_never_touch_prompt_or_padding(mirror):
    obj = objective(mirror)
    for start in range(0, 3000, 3):
        batch = make_batch(start)
        noisy = obj.corrupt(batch)
        clean = batch.input_ids[noisy.row_sample]
        changed = noisy.input_ids != clean
        assert not (changed & ~batch.loss_mask[noisy.row_sample]).any()
        rows, cols = noisy.loss_positions // 8, noisy.loss_positions % 8
        assert batch.loss_mask[noisy.row_sample[rows], cols].all()
        assert (noisy.input_ids.reshape(-1)[noisy.loss_positions] == MASK).all()
        assert (noisy.loss_targets == clean.reshape(-1)[noisy.loss_positions]).all()


def test_loss_equals_hand_computed_value_with_uniform_logits():
    """With all-zero logits CE_i = log V, so l_b = (masked_b / n_b) log V / pi_b and loss = mean_b l_b."""
    vocab = 32
    model = MDMForMaskedDiffusion(MDMConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2))
    torch.nn.init.zeros_(model.lm_head.weight)
    noisy = objective().corrupt(make_batch(7))
    masked = (noisy.input_ids == MASK).sum(1).tolist()
    n = [4, 5, 4]
    pi = mask_probability(noisy.t, EPS).tolist()
    expected = sum(m / nb * math.log(vocab) / p for m, nb, p in zip(masked, n, pi)) / 3
    loss = model(**noisy.model_inputs()).loss
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_equals_explicit_loop_on_a_random_model():
    torch.manual_seed(0)
    model = MDMForMaskedDiffusion(MDMConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2,
                                            num_attention_heads=2))
    batch = make_batch(11)
    noisy = objective().corrupt(batch)
    logits = model(noisy.input_ids, noisy.attention_mask).logits
    expected = 0.0
    for b in range(3):
        pi = mask_probability(noisy.t[b], EPS)
        n = int(batch.loss_mask[b].sum())
        for i in range(8):
            if noisy.input_ids[b, i] == MASK:
                expected += F.cross_entropy(logits[b, i], batch.input_ids[b, i]).item() / pi / n / 3
    assert model(**noisy.model_inputs()).loss.item() == pytest.approx(float(expected), rel=1e-5)


def test_arm_loss_is_mean_next_token_ce_over_the_response():
    torch.manual_seed(0)
    model = MDMForMaskedDiffusion(MDMConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2,
                                            num_attention_heads=2, causal=True))
    batch = make_batch()
    noisy = ARMObjective().corrupt(batch)
    assert torch.equal(noisy.input_ids, batch.input_ids)  # nothing is masked
    logits = model(batch.input_ids, batch.attention_mask).logits
    expected = 0.0
    for b in range(3):
        targets = batch.loss_mask[b].nonzero().flatten().tolist()
        expected += sum(F.cross_entropy(logits[b, i - 1], batch.input_ids[b, i]).item() for i in targets) / len(targets)
    assert model(**noisy.model_inputs()).loss.item() == pytest.approx(expected / 3, rel=1e-5)


def test_bernoulli_mask_loss_is_unbiased_for_fixed_token_losses():
    """E_M[sum_i M_i c_i / pi / n] = mean_i c_i for any fixed per-token losses c (docs/spec.md section 1)."""
    batch = make_batch()
    c = torch.rand(3, 8, generator=torch.Generator().manual_seed(0)) * 5
    t = torch.tensor([0.05, 0.5, 0.9])
    masks = BernoulliMasks(seed=3, eps=EPS)
    draws = 20000
    eligible = batch.loss_mask.repeat(draws, 1)
    draw = masks.draw(torch.arange(3 * draws), t.repeat(draws), eligible, Stream.MASK)
    estimates = ((draw.masked * c.repeat(draws, 1) / draw.inclusion).sum(1) / eligible.sum(1)).view(draws, 3)
    truth = (c * batch.loss_mask).sum(1) / batch.loss_mask.sum(1)
    stderr = estimates.std(0) / math.sqrt(draws)
    assert ((estimates.mean(0) - truth).abs() < 4 * stderr).all(), (estimates.mean(0), truth, stderr)


def test_keyed_uniforms_depend_only_on_the_key():
    a = keyed_uniform(5, torch.tensor([3, 4, 5]), Stream.MASK, 16)
    b = keyed_uniform(5, torch.tensor([5, 4]), Stream.MASK, 16)  # other batch composition, other "rank"
    assert torch.equal(a[2], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(keyed_uniform(6, torch.tensor([3]), Stream.MASK, 16)[0], a[0])  # seed matters
    assert not torch.equal(keyed_uniform(5, torch.tensor([3]), Stream.T, 16)[0], a[0])  # stream matters


def test_keyed_uniforms_are_uniform_and_uncorrelated():
    u = keyed_uniform(0, torch.arange(4000), Stream.MASK, 64).double()  # 256k draws
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 4 * math.sqrt(1 / 180 / n)  # Var of (U - 1/2)^2 is 1/180
    neighbours = torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1].item()
    across = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1].item()
    assert abs(neighbours) < 4 / math.sqrt(n) and abs(across) < 4 / math.sqrt(n)
    hist = torch.histc(u.float(), bins=16, min=0, max=1)
    expected = n / 16
    chi2 = ((hist - expected) ** 2 / expected).sum().item()
    assert chi2 < 40  # chi-square with 15 degrees of freedom: P(> 40) < 1e-3


def _lowbias32(x: int) -> int:
    """Wellons' lowbias32 on Python integers: the published reference of ``noise.mix32``."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def _reference_uniform(seed: int, index: int, stream: int, position: int | None) -> float:
    """noise.py's key chain written out on Python integers: (seed lo, seed hi, stream, index lo, index hi)."""
    h = 0x9E3779B9
    for word in (seed & 0xFFFFFFFF, seed >> 32, stream, index & 0xFFFFFFFF, index >> 32):
        h = _lowbias32(h ^ word)
    h = _lowbias32(h ^ 0x68E31DA4) if position is None else _lowbias32(_lowbias32(h ^ position) ^ 0x1B56C4E9)
    return float(torch.tensor(h >> 8, dtype=torch.float32).add(0.5).mul(1.0 / (1 << 24)))  # float32, as trained


def test_keyed_noise_equals_the_integer_reference_hash():
    """The noise is part of a run's identity (exact resume, the same samples on any number of ranks, across
    versions): every draw must equal the hash written out on Python integers, bit for bit."""
    from mdm_scale.core.noise import keyed_generator, mix32

    x = torch.tensor([0, 1, 0xDEADBEEF, 0xFFFFFFFF, 12345678], dtype=torch.int64)
    assert mix32(x).tolist() == [_lowbias32(v) for v in x.tolist()]
    seed, index = (1 << 33) + 7, torch.tensor([0, 5, (1 << 35) + 3])
    per_position = keyed_uniform(seed, index, Stream.MASK, 3)
    per_sample = keyed_uniform(seed, index, Stream.T)
    assert torch.equal(keyed_uniform(seed, index[:2].int(), Stream.T), per_sample[:2])  # int32 indices widened
    for row, i in enumerate(index.tolist()):
        assert per_sample[row].item() == _reference_uniform(seed, i, int(Stream.T), None)
        assert per_position[row].tolist() == [_reference_uniform(seed, i, int(Stream.MASK), p) for p in range(3)]
    h = 0x9E3779B9
    for word in (seed & 0xFFFFFFFF, seed >> 32, 4, 9):
        h = _lowbias32(h ^ word)
    assert keyed_generator(seed, 4, 9).initial_seed() == h


def test_host_corruption_gathers_without_cpu_advanced_indexing():
    """The corruption runs on the host before every forward; CPU advanced indexing (``aten::index``,
    ``aten::index_put_``) costs milliseconds per call on a busy host, so the objective, the masks, the P-POTS
    density and the packed-row view gather with ``index_select`` (docs/benchmarks.md, 2026-12-02)."""
    from test_packing import PAD_ID, SEQ_LEN, sft_data
    from torch.profiler import profile

    from mdm_scale.config.variance import PPOTSConfig
    from mdm_scale.data.loader import TrainLoader
    from mdm_scale.diffusion.ppots import PPOTSSampler

    packed = TrainLoader(sft_data(), seed=0, rank=0, world=1, micro_batch=4, grad_accum=1, pad_id=PAD_ID,
                         pad_to_multiple_of=8, seq_len=SEQ_LEN, packing=True).micro_batch_at(step=0, micro=0)
    cases = [(objective(), make_batch()), (MDMObjective(UniformT(0), MirrorMasks(0, EPS, 0.5), MASK), make_batch()),
             (MDMObjective(PPOTSSampler(0, PPOTSConfig()), BernoulliMasks(0, EPS), MASK), make_batch()),
             (objective(mirror=True), packed)]
    for objective_, batch in cases:
        with profile() as prof:
            objective_.corrupt(batch)
        names = {event.name for event in prof.events()}
        assert not names & {"aten::index", "aten::index_put_", "aten::take"}, type(objective_.masks).__name__
