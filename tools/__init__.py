"""Developer tools kept out of the installed package: benchmarks (``tools.bench``), GPU study scripts
(``tools/experiments``), mutation testing (``tools/mutation``). Python tools run as modules from the repository
root, e.g. ``python -m tools.bench.throughput``."""
