"""Typed experiment configuration: dataclasses filled from YAML and dotted CLI overrides.

Sections: ``data``, ``model``, ``regularizer``, ``optim``, ``train``, ``eval`` (``schema.py``: one
dataclass each, every field with its default and help text); ``load.py`` reads YAML strictly,
parses ``--section.key value`` overrides and merges the layers. The bottom of the package: it
imports only ``lm.errors``.
"""

from lm.config.load import (CONFIG_DIR, RUNTIME_KEYS, check_keys, config_help, flatten, load_config, parse_overrides,
                            read_yaml, resolve_config_path, to_dict)
from lm.config.schema import (SECTIONS, Config, DataConfig, EvalConfig, ModelConfig, OptimConfig,
                              RegularizerConfig, TrainConfig)

__all__ = ["CONFIG_DIR", "RUNTIME_KEYS", "SECTIONS", "Config", "DataConfig", "EvalConfig", "ModelConfig",
           "OptimConfig", "RegularizerConfig", "TrainConfig", "check_keys", "config_help", "flatten", "load_config",
           "parse_overrides", "read_yaml", "resolve_config_path", "to_dict"]
