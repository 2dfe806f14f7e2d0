"""A Ray Tune sweep over an experiment's keys: the search space, the search algorithm and the trial scheduler."""

from __future__ import annotations

import dataclasses
from typing import Any

from owl2.config.core import at_least, check, one_of
from owl2.config.experiment import TrackingConfig

SEARCH_ALGORITHMS = ("grid", "random", "optuna")
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclasses.dataclass
class SchedulerConfig:
    type: str = "asha"
    """``asha`` stops trials whose metric trails at a rung; ``fifo`` runs every trial to the end."""
    grace_period: int = 2
    """Reports (training iterations) a trial gets before it can be stopped."""
    reduction_factor: int = 2
    max_t: int = 100
    """The longest a trial runs, in reports."""

    def __post_init__(self) -> None:
        one_of(self.type, SCHEDULERS, "scheduler.type")
        at_least(self.grace_period, 1, "scheduler.grace_period")
        at_least(self.reduction_factor, 2, "scheduler.reduction_factor")
        check(
            self.max_t >= self.grace_period,
            f"scheduler.max_t ({self.max_t}) must be >= scheduler.grace_period ({self.grace_period})",
        )


@dataclasses.dataclass
class SweepConfig:
    """A Ray Tune sweep over an experiment's keys; each trial is that experiment's Ray Train run."""

    name: str = "sweep"
    """Re-running a sweep under the same name resumes it."""
    experiment: str = ""
    """The base experiment YAML (relative to the sweep file)."""
    overrides: list[str] = dataclasses.field(default_factory=list)
    """``key=value`` changes to the base before sampling (e.g. shorter stages)."""
    space: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Experiment key -> distribution: ``{grid: [..]}``, ``{choice: [..]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}`` or ``{randint: [lo, hi]}``, e.g. ``model.overrides.abstractor.num_queries``."""
    search: str = "grid"
    """``grid``/``random`` (Ray Tune's variant generator) or ``optuna`` (model-based, needs optuna installed)."""
    num_samples: int = 1
    """Samples of the space (grid: repetitions of the whole grid)."""
    metric: str = "val_loss"
    mode: str = "min"
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    max_concurrent_trials: int = 2
    trial_max_failures: int = 1
    """Retries of a crashed trial; the other trials go on either way."""
    storage_path: str = "runs"
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, f"sweep name {self.name!r} must be non-empty without '/'")
        check(bool(self.experiment), "sweep experiment is empty: name the base experiment YAML")
        check(bool(self.space), "sweep space is empty: name at least one key to sweep")
        one_of(self.search, SEARCH_ALGORITHMS, "sweep search")
        one_of(self.mode, ("min", "max"), "sweep mode")
        at_least(self.num_samples, 1, "sweep num_samples")
        at_least(self.max_concurrent_trials, 1, "sweep max_concurrent_trials")
        for key, spec in self.space.items():
            self._check_distribution(key, spec)

    def _check_distribution(self, key: str, spec: Any) -> None:
        check(
            isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS,
            f"space.{key} must be one distribution, e.g. {{grid: [1, 2]}}; choose from {list(DISTRIBUTIONS)}",
        )
        kind, values = next(iter(spec.items()))
        check(isinstance(values, list) and values, f"space.{key}.{kind} must be a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            check(len(values) == 2 and values[0] < values[1], f"space.{key}.{kind} must be [low, high]")
        check(
            kind != "grid" or self.search == "grid",
            f"space.{key} uses grid values but search is {self.search!r}: use choice for random/optuna search",
        )
