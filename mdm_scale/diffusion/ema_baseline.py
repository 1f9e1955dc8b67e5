"""EMA: a per-t-bin moving-average baseline (docs/spec.md section 3.5), as an unbiased control variate of the loss.

The prototype subtracts c * b[bin(t)] from the loss, with b an exponential moving average of past losses per
t-bin. b and c do not depend on the parameters, so **the gradient, and hence every update, is exactly unchanged**
(d/dtheta (l - c b) = dl/dtheta); ``tests/test_ema_baseline.py`` checks that training with and without it
produces bit-identical weights. No baseline that is constant in theta can change a pathwise gradient: a
gradient-level version would need a *vector* baseline per bin (bins x parameters of extra memory, e.g. 40 GB per
rank for 8B on 8 ranks with 10 bins) subtracted inside the ZeRO-partitioned gradients, which this
implementation does not do.

What the baseline does change, unbiasedly, is the *loss value*: with bins of equal width on [0, 1) and a
sampler with weight w = 1/p(t), E_t[w(t) b[bin(t)]] = integral_0^1 b[bin(t)] dt = mean_k b_k is known, so

    loss_cv = mean_b w_b l_b - (mean_b w_b b[bin(t_b)] - mean_k b_k)

has the same expectation as the loss and, once b tracks E[l | t], much less masking-rate noise (B): the logged
training loss becomes a steadier curve. b is updated after use, b_k <- (1 - eta) b_k + eta * (mean loss of the
micro-batch's sequences in bin k), so it is independent of the draw it corrects. It needs an unbiased sampler
(not ``clipped``, whose weight is 1 on [beta, omega]).

As a noise service (``service.py``) it adjusts each micro-batch's loss and observes the trained micro-batch.
"""

from __future__ import annotations

import torch

from mdm_scale.diffusion.ppots import t_bin
from mdm_scale.diffusion.service import NoiseService


class EMABaseline(NoiseService):
    state_key = "ema"

    def __init__(self, bins: int, rate: float, device: torch.device):
        self.bins, self.rate = bins, rate
        self.baseline = torch.zeros(bins, dtype=torch.float32, device=device)

    def adjust_loss(self, loss: torch.Tensor, noisy) -> torch.Tensor:
        return loss - self.correction(noisy.t, noisy.weight)

    def observe(self, micro) -> None:
        self.update(micro.t, micro.sample_loss)

    def bin_of(self, t: torch.Tensor) -> torch.Tensor:
        return t_bin(t, self.bins)

    def correction(self, t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """mean_b w_b b[bin(t_b)] - mean_k b_k: zero in expectation, constant in the parameters."""
        return (weight * self.baseline[self.bin_of(t)]).mean() - self.baseline.mean()

    def update(self, t: torch.Tensor, sample_loss: torch.Tensor) -> None:
        """Move each bin's baseline toward the mean unweighted loss of this micro-batch's sequences in it."""
        which = self.bin_of(t)
        sums = torch.zeros_like(self.baseline).index_add_(0, which, sample_loss.float())
        counts = torch.zeros_like(self.baseline).index_add_(0, which, torch.ones_like(sample_loss, dtype=torch.float32))
        seen = counts > 0
        self.baseline = torch.where(seen, (1 - self.rate) * self.baseline + self.rate * sums / counts.clamp(min=1),
                                    self.baseline)

    def state_dict(self) -> dict:
        return {"baseline": self.baseline.cpu().tolist()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.baseline = torch.tensor(state["baseline"], dtype=torch.float32, device=self.baseline.device)
