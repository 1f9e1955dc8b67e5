"""The noise-service protocol: the parts of a run that watch its training noise and may change it.

The trainer (``training/trainer.py``) holds a list of services (the t-sampler, the EMA baseline, the online
variance monitor) and calls every one at the same points of every optimiser step, on every rank:

- ``probe(step, batch, evaluate)``: before a micro-batch trains, a service may evaluate extra rows of it without
  gradient at the parameters it trains with (``evaluate(noisy)`` runs one forward on every rank, a collective
  under ZeRO-3, and returns the rows on the device with their token losses); the online variance probe does;
- ``adjust_loss(loss, noisy)``: the loss to differentiate (a control variate may subtract a term that is zero in
  expectation and constant in the parameters; the EMA baseline does);
- ``observe(micro)``: the trained micro-batch's statistics, a :class:`~mdm_scale.diffusion.objective.TrainedMicroBatch`
  (device tensors: accumulate on the device, never synchronise here);
- ``on_optimizer_step(step)``: after optimiser step ``step`` (1-based); collectives are allowed (every rank calls
  it at the same steps), e.g. pooling statistics and refitting p(t);
- ``changes_after(step)``: whether ``on_optimizer_step(step)`` may change the noise of the next step (p(t), the
  mask generator or the sequences per micro-batch). Until such a step the noise of the next micro-batch is a
  function of its keys, so the trainer corrupts it early (``Trainer._prefetch``);
- ``log(step, interval)``: what to write for this step under ``log_prefix`` (``interval``: the run's log interval);
- ``state_dict()`` / ``load_state_dict(state)``: everything needed to resume, saved per rank under ``state_key``;
- ``load_rank_states(states, main)``: how a resume restores it (``training/checkpoint.py``). ``states`` are the
  states that the old ranks this rank takes over saved: rank r of W takes the old ranks r, r + W, r + 2W, ...,
  i.e. its own state when the world size is unchanged, several when it shrank, none on a rank that the old run
  did not have; ``main`` is rank 0's. By default the first of ``states``, else rank 0's; a service with
  ``PooledSums`` takes its pooled (shared) part from ``main`` and sums the pending parts of ``states``, so that
  no rank's pending statistics are lost or counted twice.

Every hook has a no-op default, so a service implements only what it uses. Services that pool statistics over
ranks share :class:`~mdm_scale.diffusion.pooled_sums.PooledSums`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from mdm_scale.core.batch import Batch

# ``log`` values: a float is a scalar, a 1-D tensor a histogram, a callable returns a matplotlib figure (called only
# where it is written, so other ranks pay nothing for plotting).
LogValue = float | torch.Tensor | Callable[[], Any]


class NoiseService:
    """Base of the services: every hook a no-op (module docstring)."""

    state_key: ClassVar[str]
    """Name of this service's state in a checkpoint's per-rank state (``rank_state<r>.pt``)."""
    log_prefix: ClassVar[str] = ""
    """TensorBoard section of ``log``'s values."""
    log_console: ClassVar[bool] = False
    """Whether ``log``'s values (scalars) also go to the console."""

    def probe(self, step: int, batch: Batch, evaluate: Callable) -> None:
        """Before micro-batch ``batch`` of optimiser step ``step`` (0-based) trains; ``evaluate(noisy)`` returns
        a ``TrainedMicroBatch`` of extra rows evaluated without gradient."""

    def adjust_loss(self, loss: torch.Tensor, noisy) -> torch.Tensor:
        """The micro-batch loss to differentiate, given the model's ``loss`` on the ``NoisyBatch`` ``noisy``."""
        return loss

    def observe(self, micro) -> None:
        """One trained micro-batch (``TrainedMicroBatch``)."""

    def on_optimizer_step(self, step: int) -> None:
        """After optimiser step ``step`` (1-based), on every rank."""

    def changes_after(self, step: int) -> bool:
        """Whether ``on_optimizer_step(step)`` may change the next step's noise."""
        return False

    def log(self, step: int, interval: bool) -> dict[str, LogValue]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def load_rank_states(self, states: list[dict], main: dict) -> None:
        """Restore from the states of the old ranks this rank takes over, or rank 0's (module docstring)."""
        self.load_state_dict(states[0] if states else main)
