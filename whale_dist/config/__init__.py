"""Typed configuration: the schema (``config.schema``) and its loader (``config.loader``), one public face.

Every job reads one YAML file plus ``key=value`` overrides into the ``Config`` tree and writes the resolved config as
``config.yaml`` next to its output. Both modules are light (PyYAML is imported when a file is read or written).
"""

from whale_dist.config.loader import config_from_argv, config_to_dict, dump_config, load_config, split_argv
from whale_dist.config.schema import (
    RESOLVED_CONFIG,
    CatalogueConfig,
    Config,
    ConfigError,
    EmbedConfig,
    IdentifyConfig,
    IndexConfig,
    LossConfig,
    ModelConfig,
    StatsConfig,
    SynthConfig,
    TrainConfig,
)

__all__ = ["RESOLVED_CONFIG", "CatalogueConfig", "Config", "ConfigError", "EmbedConfig", "IdentifyConfig",
           "IndexConfig", "LossConfig", "ModelConfig", "StatsConfig", "SynthConfig", "TrainConfig", "config_from_argv",
           "config_to_dict", "dump_config", "load_config", "split_argv"]
