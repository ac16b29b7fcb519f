"""Recipes: typed, validated configuration for a distillation run."""

from kdlm.config.load import apply_override, config_reference, dump_yaml, from_dict, load_recipe, to_dict
from kdlm.config.schema import (
    DataConfig,
    LossConfig,
    LossTerm,
    OutputConfig,
    Recipe,
    SamplingConfig,
    ScheduleConfig,
    SourceConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "DataConfig", "LossConfig", "LossTerm", "OutputConfig", "Recipe", "SamplingConfig", "ScheduleConfig", "SourceConfig", "StudentConfig", "TeacherConfig",
    "TrainConfig", "apply_override", "config_reference", "dump_yaml", "from_dict", "load_recipe", "to_dict",
]
