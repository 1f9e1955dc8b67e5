"""The A/B/C variance decomposition tool (``mdm-scale variance``, SPEC section 2 and docs/variance.md)."""
