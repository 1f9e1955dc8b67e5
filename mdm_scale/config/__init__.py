"""Configuration: typed dataclasses, YAML loading with overrides, and the generated DeepSpeed JSON."""

from mdm_scale.config.loader import load_config
from mdm_scale.config.schema import Config, ConfigError

__all__ = ["Config", "ConfigError", "load_config"]
