"""The contract between the driver (``trainer.py``) and the workers of one stage (``loop.py``).

The driver builds one :class:`StageJob` per stage and hands it to Ray Train as
``train_loop_config={"job": job}``; every worker reads its whole task from it and from nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from owl2.config import ExperimentConfig, StageConfig


@dataclass
class StageJob:
    """One stage of an experiment, as every worker of its ``TorchTrainer`` receives it."""

    experiment: ExperimentConfig
    """The resolved experiment (local paths made absolute by the driver)."""
    stage_name: str
    experiment_yaml: str
    """The experiment as YAML, copied into every checkpoint."""
    init_from: Any = None
    """``ray.train.Checkpoint`` of the weights to start from (the previous stage's last one), or None: the
    model section's initial weights."""
    tracking_uri: str = ""
    run_id: str | None = None
    """The stage's MLflow run; rank 0 logs to it. None: no tracking."""
    progress: Any = None
    """``ray.util.queue.Queue`` for progress lines to the driver's terminal; None prints them locally."""

    @property
    def stage(self) -> StageConfig:
        return self.experiment.stages[self.stage_name]

    @property
    def stage_index(self) -> int:
        return list(self.experiment.stages).index(self.stage_name)

    @property
    def run_name(self) -> str:
        """The ``TorchTrainer`` run's name; re-running it resumes it."""
        return f"{self.experiment.name}-{self.stage_name}"

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each worker."""
        return self.experiment.gradient_accumulation(self.stage_name)
