"""Typed configuration: dataclasses, named presets, YAML files and ``key=value`` overrides.

Every config is a (nested) dataclass that validates itself in ``__post_init__`` and raises
:class:`ConfigError` naming the offending key, so a bad value stops a run before any work starts.
The package imports neither torch nor transformers: the CLI and Ray drivers read configs cheaply.

One module per domain: :mod:`~owl2.config.core` (the error, shared constants, the checks),
:mod:`~owl2.config.model` (architecture and presets), :mod:`~owl2.config.data` (sources and the data pipeline),
:mod:`~owl2.config.stage` (one training stage), :mod:`~owl2.config.experiment` (the pipeline and its resources),
:mod:`~owl2.config.sweep` (Ray Tune sweeps), :mod:`~owl2.config.ablation` (arms x seeds against a baseline)
and :mod:`~owl2.config.loading` (dicts, YAML and overrides).
Import the names from here; the submodules import each other directly.

Plain dataclasses rather than a validation library such as pydantic: with :func:`build` and a handful of
check helpers the rules stay next to the fields, the error texts (which tests and users rely on) stay ours,
and the dependency list stays as short as the Ray workers' images need.
"""

from owl2.config.ablation import DIRECTIONS, AblationConfig, QuickConfig
from owl2.config.core import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, ConfigError
from owl2.config.data import DATA_FORMATS, RESIZE_MODES, TEMPLATE_NAMES, DataConfig, SourceConfig
from owl2.config.experiment import (
    ExperimentConfig,
    ModelInitConfig,
    ResourcesConfig,
    TrackingConfig,
    load_experiment,
)
from owl2.config.loading import build, load_yaml, merge, parse_overrides, to_dict
from owl2.config.model import MODEL_PRESETS, PROJECTORS, AbstractorConfig, DecoderConfig, ModelConfig, VisionConfig
from owl2.config.stage import (
    COMPILE_MODES,
    EVAL_SUITES,
    PRECISIONS,
    STRATEGIES,
    TRAINABLE_PARTS,
    EvalConfig,
    OptimConfig,
    StageConfig,
    ValidationConfig,
)
from owl2.config.sweep import DISTRIBUTIONS, SCHEDULERS, SEARCH_ALGORITHMS, SchedulerConfig, SweepConfig

__all__ = [
    "COMPILE_MODES",
    "DATA_FORMATS",
    "DIRECTIONS",
    "DISTRIBUTIONS",
    "EVAL_SUITES",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_INDEX",
    "MODEL_PRESETS",
    "PRECISIONS",
    "PROJECTORS",
    "RESIZE_MODES",
    "SCHEDULERS",
    "SEARCH_ALGORITHMS",
    "STRATEGIES",
    "TEMPLATE_NAMES",
    "TRAINABLE_PARTS",
    "AblationConfig",
    "AbstractorConfig",
    "ConfigError",
    "DataConfig",
    "DecoderConfig",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "ModelInitConfig",
    "OptimConfig",
    "QuickConfig",
    "ResourcesConfig",
    "SchedulerConfig",
    "SourceConfig",
    "StageConfig",
    "SweepConfig",
    "TrackingConfig",
    "ValidationConfig",
    "VisionConfig",
    "build",
    "load_experiment",
    "load_yaml",
    "merge",
    "parse_overrides",
    "to_dict",
]
