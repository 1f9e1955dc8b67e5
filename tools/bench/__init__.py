"""Benchmarks (docs/benchmarks.md), run as modules from the repository root: ``python -m tools.bench.throughput``,
``python -m tools.bench.ppots_start``, ``deepspeed --num_gpus N --module tools.bench.ppots_overhead``."""
