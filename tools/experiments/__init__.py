"""GPU study scripts (docs/results.md): shell drivers (``family_gpu.sh``, ``synthetic_gpu.sh``, ``auto_gpu.sh``),
their training configs (``configs/``) and Python studies run as modules from the repository root
(``python -m tools.experiments.auto_study``)."""
