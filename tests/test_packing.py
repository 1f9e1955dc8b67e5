"""Packed SFT rows (data/packing.py): the same per-record losses and gradients as unpacked, every record once
per epoch, and a loss normalisation whose epoch mean is the mean over records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdm_scale.data.examples import TokenizedData
from mdm_scale.data.loader import TrainLoader, collate
from mdm_scale.data.packing import pack_rows
from mdm_scale.diffusion.masks import BernoulliMasks, MirrorMasks
from mdm_scale.diffusion.objective import MDMObjective
from mdm_scale.diffusion.t_samplers import UniformT
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion, build_attention_mask, rotary_tables

SEQ_LEN, VOCAB, MASK_ID, PAD_ID = 64, 40, 3, 0


def sft_data(n: int = 40, seed: int = 0, chat: bool = False) -> TokenizedData:
    """Records of 6 to 40 tokens (log-uniform), prompts of 1 to 5 tokens; ``chat``: scored tokens in several
    spans (assistant turns between user turns), each token scored with probability 1/2, the first never."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(np.log(6), np.log(40), n)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(4, VOCAB, int(offsets[-1]))
    if not chat:
        return TokenizedData.from_prompt_lens(tokens, offsets, rng.integers(1, 6, n))
    scored = rng.random(int(offsets[-1])) < 0.5
    scored[offsets[:-1]] = False
    scored[offsets[1:] - 1] = True
    return TokenizedData.from_arrays(tokens, offsets, scored)


def model() -> MDMForMaskedDiffusion:
    torch.manual_seed(0)
    config = MDMConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK_ID)
    return MDMForMaskedDiffusion(config).train()


def per_record_loss_and_grads(net, objective, batch):
    noisy = objective.corrupt(batch)
    net.zero_grad()
    out = net(**noisy.model_inputs())
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    return noisy.sample_losses(noisy.row_losses(out.token_ce)).detach(), out.loss.detach(), grads


@pytest.mark.parametrize("mirror, chat", [(False, False), (True, False), (False, True)])
def test_packed_rows_give_the_unpacked_losses_and_gradients(mirror, chat):
    data = sft_data(chat=chat)
    loader = TrainLoader(data, seed=7, rank=0, world=1, micro_batch=3, grad_accum=1, pad_id=PAD_ID,
                         pad_to_multiple_of=8, seq_len=SEQ_LEN, packing=True)
    packed = loader.micro_batch_at(step=1, micro=0)
    assert len(packed.sample_index) > 3  # several records per row
    examples = loader.stream.example_ids(packed.sample_index.tolist())
    unpacked = collate(data, examples, packed.sample_index.tolist(), PAD_ID, 8, SEQ_LEN)
    unpacked.loss_denominator = packed.loss_denominator  # the same normalisation, so the gradients compare
    objective = MDMObjective(UniformT(7), (MirrorMasks if mirror else BernoulliMasks)(7, 1e-3), MASK_ID)
    net = model()
    loss_p, total_p, grad_p = per_record_loss_and_grads(net, objective, packed)
    loss_u, total_u, grad_u = per_record_loss_and_grads(net, objective, unpacked)
    assert torch.allclose(loss_p, loss_u, rtol=1e-5, atol=1e-6)
    assert torch.allclose(total_p, total_u, rtol=1e-5)
    assert torch.allclose(grad_p, grad_u, rtol=1e-4, atol=1e-7 * grad_u.abs().max())


def test_flex_attention_document_mask_equals_the_dense_mask():
    net = model().eval()
    attn = net.model.layers[0].attn
    docs = torch.tensor([[0] * 50 + [1] * 60 + [-1] * 18, [2] * 128])
    x = torch.randn(2, 128, 32)
    cos, sin = rotary_tables(128, attn.head_dim, 10000.0, x.device, x.dtype)
    with torch.no_grad():
        dense = attn(x, cos, sin, build_attention_mask(None, docs, causal=False, flex=False))
        flex = attn(x, cos, sin, build_attention_mask(None, docs, causal=False, flex=True))
        alone = attn(x[:1, 50:110], cos[:60], sin[:60], None)  # record 1 by itself
    assert torch.allclose(dense, flex, atol=1e-5)
    assert torch.allclose(dense[:1, 50:110], alone, atol=1e-5)


def test_every_record_is_packed_once_per_epoch_and_rows_fit():
    data = sft_data(n=57)
    loader = TrainLoader(data, seed=3, rank=0, world=1, micro_batch=1, grad_accum=1, pad_id=PAD_ID,
                         pad_to_multiple_of=8, seq_len=SEQ_LEN, packing=True)
    seen, step = [], 0
    while len(seen) < 2 * len(data):
        batch = loader.micro_batch_at(step, 0)
        assert int(batch.record_length.sum()) <= SEQ_LEN
        seen.extend(batch.sample_index.tolist())
        step += 1
    assert sorted(seen) == list(range(2 * len(data)))  # two epochs, each stream position exactly once


def test_packed_rows_do_not_depend_on_the_world_size():
    data = sft_data()
    common = dict(seed=5, grad_accum=2, pad_id=PAD_ID, pad_to_multiple_of=8, seq_len=SEQ_LEN, packing=True)
    one = TrainLoader(data, rank=0, world=1, micro_batch=4, **common)
    two = [TrainLoader(data, rank=r, world=2, micro_batch=2, **common) for r in range(2)]
    for step in range(3):
        whole = torch.cat([one.micro_batch_at(step, a).sample_index for a in range(2)])
        split = torch.cat([two[r].micro_batch_at(step, a).sample_index for a in range(2) for r in range(2)])
        assert torch.equal(whole, split)


def test_the_epoch_mean_of_packed_step_losses_is_the_mean_over_records():
    """Each record's loss divided by the expected records per micro-batch: over one epoch's steps, the mean
    step loss equals the mean per-record loss exactly (the per-batch count would weigh crowded rows less)."""
    data = sft_data(n=61)
    loader = TrainLoader(data, seed=11, rank=0, world=1, micro_batch=1, grad_accum=1, pad_id=PAD_ID,
                         pad_to_multiple_of=8, seq_len=SEQ_LEN, packing=True)
    record_loss = torch.rand(len(data), dtype=torch.float64) * torch.from_numpy(data.offsets[1:] - data.offsets[:-1])
    step_losses, records = [], 0
    while records < len(data):
        batch = loader.micro_batch_at(len(step_losses), 0)
        examples = loader.stream.example_ids(batch.sample_index.tolist())
        step_losses.append(float((record_loss[torch.tensor(examples)] / batch.loss_denominator.double()).sum()))
        records += len(examples)
    assert records == len(data)
    assert np.mean(step_losses) == pytest.approx(float(record_loss.mean()), rel=1e-6)


def test_the_objective_divides_packed_records_by_the_expected_record_count():
    """The objective's packed loss is sum_b w_b l_b / (rows x N / P) with N / P the records per row of the
    epoch, N and P counted here from the epoch's own packing, not taken from the batch; the batch's own record
    count B gives another value (the biased mean that data/packing.py describes), so an objective that ignored
    ``loss_denominator`` fails. Token losses are arbitrary numbers: the identity is the objective's arithmetic."""
    data = sft_data(n=61)
    loader = TrainLoader(data, seed=11, rank=0, world=1, micro_batch=3, grad_accum=1, pad_id=PAD_ID,
                         pad_to_multiple_of=8, seq_len=SEQ_LEN, packing=True)
    lengths = (data.offsets[1:] - data.offsets[:-1])[loader.stream.example_ids(list(range(len(data))))]
    records_per_row = len(data) / len(pack_rows(lengths.tolist(), SEQ_LEN, window=8))
    objective = MDMObjective(UniformT(11), BernoulliMasks(11, 1e-3), MASK_ID)
    for step in range(3):
        batch = loader.micro_batch_at(step, 0)
        noisy = objective.corrupt(batch)
        token_ce = torch.rand(noisy.masked_tokens, generator=torch.Generator().manual_seed(step)) + 0.5
        loss = float((noisy.loss_coef * token_ce).sum())
        record_losses = noisy.weight * noisy.sample_losses(noisy.row_losses(token_ce))
        expected = float(record_losses.sum()) / (len(batch.input_ids) * records_per_row)
        assert loss == pytest.approx(expected, rel=1e-5), step
        own_count = float(record_losses.sum()) / len(batch.sample_index)
        assert abs(own_count - expected) > 0.05 * expected, step  # the two normalisations differ here


def test_first_fit_packs_tighter_than_one_row_per_record():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.exp(rng.normal(5.0, 1.0, 2000)), 32, 2048).astype(int).tolist()
    rows = pack_rows(lengths, 2048, window=8)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 2048 for row in rows)
    assert sum(lengths) / (2048 * len(rows)) > 0.9  # > 90% of the packed tokens are real
