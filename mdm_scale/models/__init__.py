"""Models: the built-in MDM transformer, the masked-only LM head and loaders for local checkpoints.

Importing this package registers the built-in model (``model_type = "mdm_scale"``) with the ``transformers``
Auto classes, so ``AutoModelForMaskedLM.from_pretrained(export_dir)`` works in any process that imported
mdm-scale; without mdm-scale, an export loads through the code it ships (``generation/export.py``).
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from mdm_scale.models.configuration_mdm import MDMConfig
from mdm_scale.models.modeling_mdm import MDMForMaskedDiffusion, MDMModel

AutoConfig.register(MDMConfig.model_type, MDMConfig, exist_ok=True)
AutoModel.register(MDMConfig, MDMModel, exist_ok=True)
AutoModelForMaskedLM.register(MDMConfig, MDMForMaskedDiffusion, exist_ok=True)
