"""Where the time of a training step goes: data and noise (``sampler``), ``forward``, ``backward``, ``optimizer``,
and the online variance ``probe`` (its no-grad forward on probe steps, ``diffusion/online_variance.py``).

Diagnostics only: each section boundary synchronises the device so that wall-clock time is attributed to the
section that spent it. That removes the overlap between host work and device work, so a timed step is a little
slower than an untimed one; ``tools/bench/throughput.py`` measures throughput with the timer off and the
breakdown in separate steps with it on.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch


class StepTimer:
    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def section(self, name: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start


class NoTimer:
    """The default: sections cost nothing."""

    @staticmethod
    def section(_name: str):
        return nullcontext()
