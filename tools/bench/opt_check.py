"""The fused AdamW update on the device, before any training run (issue 28; ``opt_suite.sh`` runs it first).

1. The compiled kernel (``training/optimizer/adamw.py``; torch.compile on CUDA) against the eager formula on a few
   million values (bf16 gradient and output, fp32 master and moments, an offset view as ZeRO hands them): the
   largest difference of each output over several steps.
2. Its speed at a preset's parameter count (1.1B by default): milliseconds and bytes per second of the update
   (28 bytes per parameter), of the fp32-accumulated norm of the bf16 gradient (2 bytes) and of the
   concatenation of per-parameter gradients into one flat buffer (4 bytes), the three passes of the fused step,
   with the device's copy bandwidth (a large bf16 copy) as the reference floor.

    python -m tools.bench.opt_check --preset 1b --out check.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mdm_scale.config.presets import PRESETS
from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.training.optimizer.adamw import adamw_update, update_kernel
from tools.bench.common import parameter_count


def _buffers(n: int, device, offset: int = 0, seed: int = 0) -> list[torch.Tensor]:
    """master, gradient (bf16, a view at ``offset``), exp_avg, exp_avg_sq, output (bf16, a view at ``offset``)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(size: int, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(size, generator=g, device=device).to(dtype)

    return [randn(n), randn(n + offset, torch.bfloat16)[offset:], 0.1 * randn(n), 1e-2 * randn(n).abs(),
            torch.empty(n + offset, dtype=torch.bfloat16, device=device)[offset:]]


def compiled_against_eager(device, n: int = 1 << 22, steps: int = 3) -> dict[str, float]:
    kernel = update_kernel(device)
    compiled, eager = _buffers(n, device, offset=3), _buffers(n, device, offset=3)
    worst = dict.fromkeys(("master", "exp_avg", "exp_avg_sq", "out"), 0.0)
    for step in range(1, steps + 1):
        scalars = torch.tensor([1e-3, 0.1, 0.9, 0.95, 1e-8, 1 - 0.9**step, 1 - 0.95**step, 0.7], device=device)
        kernel(*compiled, scalars)
        adamw_update(*eager, scalars)
        for name, a, b in zip(worst, (compiled[0], *compiled[2:]), (eager[0], *eager[2:])):
            worst[name] = max(worst[name], (a.float() - b.float()).abs().max().item())
    return worst


def _ms(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeats


def speeds(n: int, device) -> dict[str, dict[str, float]]:
    kernel = update_kernel(device)
    buffers = _buffers(n, device)
    scalars = torch.tensor([1e-4, 0.1, 0.9, 0.95, 1e-8, 0.5, 0.5, 0.9], device=device)
    chunks = list(buffers[1].split(n // 200 + 1))  # ~200 per-parameter gradients of a model this size
    flat_copy = torch.empty_like(buffers[1])
    parts = {"fused update": (lambda: kernel(*buffers, scalars), 28),
             "grad norm (bf16, fp32 sum)": (lambda: torch.linalg.vector_norm(buffers[1], dtype=torch.float32), 2),
             "concatenate grads": (lambda: torch.cat(chunks, out=flat_copy), 4),
             "bf16 copy (reference floor)": (lambda: flat_copy.copy_(buffers[1]), 4)}
    out = {}
    for name, (fn, bytes_per_value) in parts.items():
        ms = _ms(fn)
        out[name] = {"ms": ms, "bytes_per_parameter": bytes_per_value, "TB_per_s": bytes_per_value * n / ms / 1e9}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--out", default="opt_check.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        device, n = torch.device("cpu"), 1 << 16
    else:
        device, n = torch.device("cuda"), parameter_count(MDMConfig(**PRESETS[args.preset]))
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "parameters": n,
              "compiled_minus_eager_max_abs": compiled_against_eager(device)}
    if device.type == "cuda":
        result["speed"] = speeds(n, device)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
