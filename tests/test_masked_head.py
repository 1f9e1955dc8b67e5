"""The masked-only LM head equals the full-logits path: loss, per-token CE and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mdm_scale.models.masked_head import chunked_linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_head_matches_full_logits(chunk, dtype):
    g = torch.Generator().manual_seed(chunk)
    n, d, v = 50, 24, 97
    hidden = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    coef = torch.rand(n, generator=g, dtype=torch.float32)

    loss, ce = chunked_linear_cross_entropy(hidden, weight, targets, coef, chunk)
    grad_h, grad_w = torch.autograd.grad(loss * 1.7, [hidden, weight])

    ref_ce = F.cross_entropy(F.linear(hidden, weight).double(), targets, reduction="none")
    ref_loss = (ref_ce * coef.double()).sum()
    ref_h, ref_w = torch.autograd.grad(ref_loss * 1.7, [hidden, weight])
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert torch.allclose(ce.double(), ref_ce.detach(), rtol=tol, atol=tol)
    assert torch.allclose(loss.double(), ref_loss.detach(), rtol=tol)
    assert torch.allclose(grad_h, ref_h.to(dtype), rtol=tol * 10, atol=tol * 10)
    assert torch.allclose(grad_w, ref_w.to(dtype), rtol=tol * 10, atol=tol * 10)


def test_empty_selection_keeps_the_graph():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss, ce = chunked_linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    loss.backward()
    assert loss.item() == 0.0 and ce.numel() == 0
    assert weight.grad is not None and torch.equal(weight.grad, torch.zeros_like(weight))


def test_model_masked_path_equals_full_logits_path():
    from mdm_scale.models.configuration_mdm import MDMConfig
    from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion

    torch.manual_seed(0)
    model = MDMForMaskedDiffusion(MDMConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, head_chunk_tokens=5))
    x = torch.randint(0, 50, (3, 9))
    positions = torch.tensor([0, 4, 10, 11, 20, 26])
    targets = torch.randint(0, 50, (6,))
    coef = torch.rand(6)
    masked = model(x, loss_positions=positions, loss_targets=targets, loss_coef=coef).loss
    grads = torch.autograd.grad(masked, list(model.parameters()))
    logits = model(x).logits.reshape(-1, 50)[positions]
    full = (F.cross_entropy(logits, targets, reduction="none") * coef).sum()
    ref = torch.autograd.grad(full, list(model.parameters()))
    assert torch.allclose(masked, full, rtol=1e-6)
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    model.config.loss_head = "full"  # the switch used for comparisons computes the same loss
    switched = model(x, loss_positions=positions, loss_targets=targets, loss_coef=coef).loss
    assert torch.allclose(switched, full, rtol=1e-6)


def _reference(hidden, weight, targets, coef):
    ce = F.cross_entropy(F.linear(hidden.double(), weight.double()), targets, reduction="none")
    return (ce * coef.double()).sum()


def test_bf16_head_keeps_the_input_dtypes_and_matches_full_logits():
    """bf16 activations and weights: fp32 accumulation inside, bf16 gradients out, within bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(33, 16, generator=g).to(torch.bfloat16).requires_grad_()
    targets, coef = torch.randint(0, 33, (40,), generator=g), torch.rand(40, generator=g)
    loss, _ = chunked_linear_cross_entropy(hidden, weight, targets, coef, 16)
    grad_h, grad_w = torch.autograd.grad(loss, [hidden, weight])
    ref_h, ref_w = torch.autograd.grad(_reference(hidden, weight, targets, coef), [hidden, weight])
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16
    assert torch.allclose(grad_h.double(), ref_h.double(), rtol=2e-2, atol=2e-2)
    assert torch.allclose(grad_w.double(), ref_w.double(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_gradient_of_one_input_when_the_other_is_frozen(frozen):
    """A frozen head (weight without grad) still back-propagates into the hidden states, and vice versa."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=frozen != "hidden")
    weight = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=frozen != "weight")
    targets, coef = torch.randint(0, 11, (30,), generator=g), torch.rand(30, generator=g)
    live = weight if frozen == "hidden" else hidden
    (grad,) = torch.autograd.grad(chunked_linear_cross_entropy(hidden, weight, targets, coef, 7)[0], [live])
    (ref,) = torch.autograd.grad(_reference(hidden, weight, targets, coef), [live])
    assert torch.allclose(grad, ref, rtol=1e-10, atol=1e-12)


def test_a_single_loss_row_is_not_mistaken_for_an_empty_selection():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, generator=g, dtype=torch.float64)
    targets, coef = torch.tensor([3]), torch.tensor([0.5])
    loss, ce = chunked_linear_cross_entropy(hidden, weight, targets, coef, 4)
    reference = _reference(hidden, weight, targets, coef)
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-12) and ce.shape == (1,)
