"""A training pipeline: the model to start from, stages run in order, Ray Train resources and MLflow tracking."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from owl2.config.core import ConfigError, at_least, check, one_of, positive
from owl2.config.loading import build, load_yaml, merge, parse_overrides
from owl2.config.model import MODEL_PRESETS, ModelConfig
from owl2.config.stage import StageConfig


@dataclasses.dataclass
class ModelInitConfig:
    """Where the first stage's weights come from (exactly one of the three, or a random preset)."""

    preset: str = "tiny-cpu"
    """Architecture preset (ignored when ``pretrained`` names a folder, which carries its own)."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Architecture overrides, e.g. ``{abstractor: {num_layers: 3}}`` (what sweeps change) or the ablation switches
    ``{projector: mlp}``, ``{decoder: {modality_adaptive: false}}``. With ``pretrained`` they change the folder's
    architecture, whose weights must still fit (a modality-adaptive checkpoint loads into a decoder without the
    module: its text branch is kept)."""
    pretrained: str | None = None
    """An owl2 or official mPLUG-Owl2 folder (fine-tuning the released model)."""
    llama: str | None = None
    """A transformers LLaMA-2 folder, with ``clip``: a fresh model (the paper's stage-1 start)."""
    clip: str | None = None

    def __post_init__(self) -> None:
        one_of(self.preset, sorted(MODEL_PRESETS), "model.preset")
        check(
            (self.llama is None) == (self.clip is None),
            "model.llama and model.clip go together: a fresh model needs both LLaMA-2 and CLIP weights",
        )
        check(
            not (self.pretrained and self.llama),
            "model.pretrained and model.llama/clip exclude each other: fine-tune a released model or build a fresh one",
        )
        if self.overrides:
            ModelConfig.from_preset(self.preset, self.overrides)


@dataclasses.dataclass
class ResourcesConfig:
    """Ray Train workers."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    gpu: str | None = None
    """The workers' GPU, a name of ``owl2.plan.gpus.GPUS`` (e.g. ``h100-80gb``): ``owl2 train`` then refuses a
    stage whose memory plan does not fit, and MFU uses its peak."""
    peak_tflops: float | None = None
    """Dense bf16 peak per GPU in TFLOP/s, overriding the GPU table's."""
    ignore_memory_plan: bool = False
    """Start stages that the memory plan says do not fit (for experts who know better)."""
    stall_warning_s: float = 120.0
    """Say what the run waits for once Ray has left a task, actor or placement group unscheduled this long for
    lack of resources (0: never)."""

    def __post_init__(self) -> None:
        from owl2.plan.gpus import GPUS  # a plain table: imports nothing of owl2

        at_least(self.num_workers, 1, "resources.num_workers")
        positive(self.cpus_per_worker, "resources.cpus_per_worker")
        if self.gpu is not None:
            one_of(self.gpu, list(GPUS), "resources.gpu")
        if self.peak_tflops is not None:
            positive(self.peak_tflops, "resources.peak_tflops")
        at_least(self.stall_warning_s, 0, "resources.stall_warning_s")


@dataclasses.dataclass
class TrackingConfig:
    """MLflow. The ``MLFLOW_TRACKING_URI`` environment variable wins over ``tracking_uri``."""

    tracking_uri: str = ""
    """Empty: an embedded store on local disk, ``<storage_path>/mlflow.db``."""
    experiment: str = "owl2"
    system_metrics_s: float = 10.0
    """Seconds between samples of CPU, memory, disk, network and GPU use (MLflow's system metrics, ``system/...``
    on each stage run, from one worker per node; GPU figures need the ``nvidia-ml-py`` package). 0: none.
    MLflow's ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` takes precedence."""

    def __post_init__(self) -> None:
        at_least(self.system_metrics_s, 0, "tracking.system_metrics_s")


@dataclasses.dataclass
class ExperimentConfig:
    """A training pipeline: a model, stages run in order, resources, storage and tracking."""

    name: str = "owl2"
    """Run name: re-running the same name resumes it (a new experiment needs a new name)."""
    model: ModelInitConfig = dataclasses.field(default_factory=ModelInitConfig)
    stages: dict[str, StageConfig] = dataclasses.field(default_factory=dict)
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    storage_path: str = "~/owl2_runs"
    """Where checkpoints (and the default MLflow store) go: a local folder or a URI shared by all nodes."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before a stage fails."""
    seed: int = 0

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, f"name {self.name!r} must be non-empty without '/'")
        check(bool(self.stages), "stages is empty: define at least one stage")
        at_least(self.max_failures, 0, "max_failures")
        patch_size = ModelConfig.from_preset(self.model.preset, self.model.overrides).vision.patch_size
        for name, stage in self.stages.items():
            self._check_stage(f"stages.{name}", stage, patch_size)

    def _check_stage(self, where: str, stage: StageConfig, patch_size: int) -> None:
        """The rules that tie a stage (at key ``where``) to the model, the resources or its own sections."""
        workers = self.resources.num_workers
        per_step = stage.micro_batch_size * workers
        check(
            stage.global_batch_size % per_step == 0,
            f"{where}.global_batch_size ({stage.global_batch_size}) must be a multiple of micro_batch_size x "
            f"num_workers ({stage.micro_batch_size} x {workers} = {per_step})",
        )
        check(
            stage.image_size % patch_size == 0,
            f"{where}.image_size ({stage.image_size}) must be a multiple of the patch size ({patch_size})",
        )
        check(bool(stage.data.sources), f"{where}.data.sources is empty: name at least one dataset")
        check(bool(stage.data.tokenizer), f"{where}.data.tokenizer is empty: point it at tokenizer.model's folder")
        check(
            stage.data.image_size == stage.image_size,
            f"{where}.data.image_size ({stage.data.image_size}) must equal {where}.image_size ({stage.image_size})",
        )
        if stage.validation is not None:
            check(
                stage.validation.data.image_size == stage.image_size,
                f"{where}.validation.data.image_size ({stage.validation.data.image_size}) must equal "
                f"{where}.image_size ({stage.image_size})",
            )
            check(bool(stage.validation.data.tokenizer), f"{where}.validation.data.tokenizer is empty")
        check(
            stage.strategy != "fsdp" or self.resources.use_gpu,
            f"{where}.strategy fsdp needs GPU workers (resources.use_gpu: true)",
        )
        if stage.eval is not None:
            check(
                stage.eval.every is None or stage.eval.every % stage.checkpoint_every == 0,
                f"{where}.eval.every ({stage.eval.every}) must be a multiple of {where}.checkpoint_every "
                f"({stage.checkpoint_every}): the suite runs at checkpoint steps",
            )
            check(
                stage.strategy != "fsdp",
                f"{where}.eval is not supported with {where}.strategy fsdp yet: generation runs on the rank-0 "
                "worker alone, while FSDP2 needs every worker in each forward pass; use ddp, or evaluate the "
                "stage's checkpoints with `owl2 eval`",
            )

    def gradient_accumulation(self, stage: str) -> int:
        config = self.stages[stage]
        return config.global_batch_size // (config.micro_batch_size * self.resources.num_workers)


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """An experiment YAML with ``key=value`` overrides, validated before anything runs.

    A stage given as a string is a YAML file (relative to the experiment file) holding that stage.
    """
    path = Path(path)
    data = load_yaml(path)
    stages = data.get("stages") or {}
    if not isinstance(stages, dict):
        raise ConfigError(f"{path}: stages must be a mapping of stage name to stage (or to a stage YAML file)")
    data["stages"] = {
        name: load_yaml(path.parent / stage) if isinstance(stage, str) else stage for name, stage in stages.items()
    }
    update = parse_overrides(overrides or [])
    unknown = [name for name in update.get("stages") or {} if name not in data["stages"]]
    if unknown:
        raise ConfigError(
            f"unknown stage {unknown[0]!r} in the overrides (stages: {', '.join(data['stages']) or 'none'})"
        )
    return build(ExperimentConfig, merge(data, update))
