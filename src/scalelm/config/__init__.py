"""Run configuration: dataclass sections (`sections`), loading and overrides (`load`), and the parallel layouts
the trainer can run (`layout`). Torch-free, so the planner can read configs."""

from scalelm.config.layout import muon_fits, resolve_optimizer, validate_parallel
from scalelm.config.load import all_keys, build_config, load_toml, parse_overrides, to_toml
from scalelm.config.sections import (
    SECTIONS,
    TOP_LEVEL,
    CheckpointConfig,
    Config,
    ConfigError,
    CpuConfig,
    DataConfig,
    MetricsConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from scalelm.model.presets import PRESETS

__all__ = [
    "PRESETS", "SECTIONS", "TOP_LEVEL", "CheckpointConfig", "Config", "ConfigError", "CpuConfig", "DataConfig",
    "MetricsConfig", "OptimConfig", "ParallelConfig", "TrainConfig", "all_keys", "build_config", "load_toml",
    "muon_fits", "parse_overrides", "resolve_optimizer", "to_toml", "validate_parallel",
]
