"""Masked-only LM head: vocabulary projection and cross-entropy at the loss positions only, in chunks.

The MDM loss needs log p(x0_i | x_t) only at masked positions (about half of the response on average), and a
full ``B x L x V`` logits tensor is the largest activation of the model (8 GB in fp32 for B=8, L=2048,
V=126k). The head therefore takes the hidden states already gathered at the N loss positions and computes

    loss = sum_i c_i * CE_i,    CE_i = logsumexp(W h_i) - (W h_i)[y_i]

over chunks of ``chunk`` rows. Forward keeps only the per-row log-sum-exp; backward recomputes each chunk's
logits and forms dlogits = c_i * (softmax - onehot(y_i)) on the fly, so at most ``chunk x V`` logits exist at
any time. Logits and the weight gradient are accumulated in fp32 (at least) across chunks.
``tests/test_masked_head.py`` checks loss and gradients against the plain full-logits path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, coef, chunk):
        n, acc = hidden.shape[0], _accumulation_dtype(hidden)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        ce = torch.empty(n, dtype=acc, device=hidden.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            logits = F.linear(hidden[start:stop], weight).to(acc)
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, targets[start:stop, None]).squeeze(1)
            ce[start:stop] = lse[start:stop] - target_logit
        loss = (ce * coef).sum()
        ctx.save_for_backward(hidden, weight, targets, coef, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        hidden, weight, targets, coef, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        acc = _accumulation_dtype(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        scale = coef * grad_loss
        for start in range(0, hidden.shape[0], chunk):
            stop = min(start + chunk, hidden.shape[0])
            h = hidden[start:stop]
            probs = torch.exp(F.linear(h, weight).to(acc) - lse[start:stop, None])
            probs[torch.arange(stop - start, device=h.device), targets[start:stop]] -= 1.0
            dlogits = (probs * scale[start:stop, None]).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = dlogits @ weight
            if grad_weight is not None:
                grad_weight += (dlogits.t() @ h).to(acc)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def _accumulation_dtype(hidden: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 activations, fp64 for fp64 ones (tests)."""
    return torch.promote_types(hidden.dtype, torch.float32)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 coef: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_i coef_i * CE_i, CE)`` for rows ``hidden (N, D)``, classes ``weight (V, D)``, ``targets (N,)``.

    ``CE`` is returned detached (fp32, or fp64 for fp64 inputs), for statistics such as the per-t loss of the
    P-POTS sampler.
    """
    if hidden.shape[0] == 0:  # keep the graph (and every ZeRO-3 hook) alive on a batch with nothing to predict
        return (hidden.sum() + weight.sum()) * 0.0, hidden.new_zeros(0, dtype=torch.float32)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, coef.to(_accumulation_dtype(hidden)), chunk)


class MaskedLMHead(nn.Module):
    """Output projection ``h -> W h`` that can also return the loss at chosen rows without full logits.

    It is its own module so that ZeRO-3 gathers ``weight`` around this forward, whichever path runs.
    """

    def __init__(self, hidden_size: int, vocab_size: int, chunk: int = 8192):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.chunk = chunk

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None,
                coef: torch.Tensor | None = None):
        if targets is None:
            return F.linear(hidden, self.weight)
        return chunked_linear_cross_entropy(hidden, self.weight, targets, coef, self.chunk)
