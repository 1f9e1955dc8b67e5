"""Console and TensorBoard output, written by rank 0 only.

Scalars go to ``<output_dir>/tensorboard`` (or ``logging.tensorboard_dir``) under ``train/*`` and ``eval/*``;
the console gets one line per log interval, or a progress bar with the same numbers on a terminal (an estimate
logged with its interval as ``X``, ``X_lo``, ``X_hi`` reads ``X=value [lo, hi]`` there).
Tensorboard's own ``EventAccumulator`` reads the files back (``tests/test_training.py``).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import torch


class MetricLogger:
    def __init__(self, enabled: bool, tensorboard_dir: Path | None, progress: str, total_steps: int,
                 start_step: int):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))
        if progress == "always" or (progress == "auto" and sys.stderr.isatty()):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def info(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def log(self, step: int, prefix: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        line = " ".join(_console_items(values))
        if self.bar is not None and prefix == "train":
            self.bar.set_postfix_str(line, refresh=False)
        else:
            self.info(f"[{prefix} step {step}] {line}")

    def histogram(self, step: int, tag: str, values: torch.Tensor) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def figure(self, step: int, tag: str, figure) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_figure(tag, figure, step)

    def log_objects(self, step: int, prefix: str, values: dict) -> None:
        """TensorBoard only: numbers as scalars, tensors as histograms, callables as figures (called here, so
        only rank 0 pays for plotting)."""
        if not self.enabled or self.writer is None:
            return
        for name, value in values.items():
            tag = f"{prefix}/{name}"
            if isinstance(value, torch.Tensor):
                self.histogram(step, tag, value)
            elif callable(value):
                self.figure(step, tag, value())
            else:
                self.writer.add_scalar(tag, value, step)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _console_items(values: dict[str, float]) -> list[str]:
    """``key=value`` items of a console line; an estimate logged with its interval (``X``, ``X_lo``, ``X_hi``)
    is one item, ``X=value [lo, hi]``."""
    items = []
    for key, value in values.items():
        if key[-3:] in ("_lo", "_hi") and key[:-3] in values:
            continue
        if f"{key}_lo" in values and f"{key}_hi" in values:
            items.append(f"{key}={_fmt(value)} [{_fmt(values[f'{key}_lo'])}, {_fmt(values[f'{key}_hi'])}]")
        else:
            items.append(f"{key}={_fmt(value)}")
    return items


def _fmt(value: float) -> str:
    if isinstance(value, int) or (abs(value) >= 1000 and float(value).is_integer()):
        return str(int(value))
    return f"{value:.4g}"


class Throughput:
    """Tokens per second over the interval since the last call."""

    def __init__(self):
        self.last = time.perf_counter()

    def rate(self, tokens: float) -> float:
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return tokens / max(elapsed, 1e-9)


def quiet_third_party_logs() -> None:
    """No progress bars or deprecation chatter from libraries: a run's console shows mdm-scale's lines."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # DeepSpeed 0.19 still calls the torch.distributed names that torch 2.13 deprecates, once per collective.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
