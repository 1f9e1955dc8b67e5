"""mdm-scale: masked diffusion language models trained at cluster scale on DeepSpeed ZeRO-3.

Packages, in the order data flows through a run: ``config`` -> ``data`` -> ``models`` -> ``diffusion``
(t-samplers, masks, objective) -> ``distributed`` -> ``training`` (engine loop, logging, checkpoints).
"""

__version__ = "0.1.0"
