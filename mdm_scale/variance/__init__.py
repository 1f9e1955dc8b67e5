"""The A/B/C variance decomposition tool (``mdm-scale variance``, docs/spec.md section 2 and docs/variance.md)."""
