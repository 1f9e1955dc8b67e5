"""Guard against non-finite steps: a NaN or Inf loss or gradient skips the update, is counted, and too many in
a row stop the run with the last good state saved.

DeepSpeed's ZeRO optimizers (stages 1-3, fp32 or bf16) compute the global gradient norm at every optimiser
step; when it is NaN or Inf (which a NaN or Inf loss on any rank produces through backward) they discard the
update on every rank, clear the gradients and leave the learning-rate schedule where it was, and
``engine.was_step_applied()`` is False. The decision is global, so all ranks count the same steps. This guard
counts those discarded steps; after ``train.max_nonfinite_steps`` in a row it saves a checkpoint (the
parameters are still those of the last good step, since no update was applied since) and the run ends with
:data:`EXIT_NONFINITE`. Both counts are saved in every checkpoint, so a resumed run goes on counting. ZeRO
stage 0 in fp32 has no such check (the plain torch optimizer applies any update), so there a non-finite step
is reported but cannot be undone.
"""

from __future__ import annotations

EXIT_NONFINITE = 3
"""Exit status after too many non-finite steps in a row (the last good state is saved)."""


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the message names the steps and the saved checkpoint."""


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int, log=print):
        self.max_in_a_row, self.log = max_in_a_row, log
        self.skipped = 0
        self.in_a_row = 0

    def update(self, step: int, applied: bool) -> bool:
        """Record optimiser step ``step``; returns whether its update was applied."""
        if applied:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        self.log(f"step {step}: non-finite loss or gradient, update skipped ({self.in_a_row} in a row, "
                 f"{self.skipped} in this run)")
        return False

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))

    @property
    def tripped(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def error(self, step: int, checkpoint) -> NonFiniteError:
        first = step - self.in_a_row + 1
        return NonFiniteError(
            f"{self.in_a_row} optimiser steps in a row ({first}..{step}) had a non-finite loss or gradient "
            f"(train.max_nonfinite_steps={self.max_in_a_row}); no update was applied since step {first - 1}, "
            f"whose parameters are saved in {checkpoint}. Lower train.lr or check the data around these steps, "
            f"then run again to resume")
