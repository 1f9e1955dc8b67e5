"""The A/B/C variance decomposition tool and its summaries (``mdm-scale variance measure | summary | plot-online``,
docs/spec.md section 2 and docs/variance.md)."""
