"""mdm-scale: masked diffusion language models trained at cluster scale on DeepSpeed ZeRO-3.

Packages in layers; a module imports only from its own layer or lower ones (``tests/test_layers.py``):
``config`` -> ``data``, ``diffusion`` (t-samplers, masks, objective), ``distributed``, ``models`` ->
``training`` (engine loop, logging, checkpoints) -> ``variance``, ``generation`` (decoding, eval, export,
lm-eval) -> ``cli``.
"""

__version__ = "0.1.0"
