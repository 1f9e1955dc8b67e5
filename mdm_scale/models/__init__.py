"""Models: the built-in MDM transformer (registered with the ``transformers`` Auto classes when
``modeling_mdm`` is imported), presets, the masked-only LM head and loaders for local checkpoints."""
