"""An ablation: arms (sets of experiment overrides) x seeds, run as Ray Tune trials and compared to a baseline arm."""

from __future__ import annotations

import dataclasses
import re

from owl2.config.core import at_least, check, one_of
from owl2.config.experiment import TrackingConfig

DIRECTIONS = ("max", "min")
"""Whether a metric is better higher (``max``) or lower (``min``)."""
ARM_NAME = re.compile(r"[A-Za-z0-9_-]+")
"""Arm names become MLflow run names and metric keys (``arm.<name>.<metric>.mean``): no dots or slashes."""


@dataclasses.dataclass
class QuickConfig:
    """What ``owl2 ablate --quick`` changes: a shorter version that still has a spread over seeds."""

    overrides: list[str] = dataclasses.field(default_factory=list)
    """Experiment ``key=value`` changes applied after the ablation's own ``overrides`` (e.g. fewer steps)."""
    seeds: list[int] | None = None
    """The seeds of the quick version (None: the ablation's seeds); at least two."""

    def __post_init__(self) -> None:
        if self.seeds is not None:
            _check_seeds(self.seeds, "quick.seeds")


@dataclasses.dataclass
class AblationConfig:
    """Arms x seeds of one experiment, every arm against the baseline arm; each trial is an owl2 experiment."""

    name: str = "ablation"
    """Re-running an ablation under the same name resumes it (``--quick`` appends ``-quick``)."""
    experiment: str = ""
    """The base experiment YAML (relative to the ablation file)."""
    overrides: list[str] = dataclasses.field(default_factory=list)
    """``key=value`` changes to the base experiment that every arm shares (e.g. an eval section)."""
    arms: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    """Arm name -> its experiment overrides (``[]``: the base as it is), e.g.
    ``{frozen: ["stages.stage2.trainable=[abstractor, decoder, lm_head]"]}``. When every arm changes only keys
    under ``stages.<name>`` of later stages, the earlier stages run once per seed and all arms start from them."""
    baseline: str = ""
    """The arm every other arm is compared to (paired by seed)."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    """Replicates: seed ``s`` sets the experiment's ``seed`` (initial weights) and every stage's ``data.seed``
    (data order), so each seed is an independent run of every arm."""
    metrics: dict[str, str] = dataclasses.field(default_factory=dict)
    """Metric of the last stage's final report -> ``max`` (higher is better) or ``min``: ``val_loss``, ``loss`` or
    ``eval/...`` of the last stage's eval suite. The first is the headline (plotted against FLOPs)."""
    confidence: float = 0.95
    """Level of the t-intervals."""
    quick: QuickConfig = dataclasses.field(default_factory=QuickConfig)
    max_concurrent_trials: int = 1
    """Trials at once. Wall times compare fairly only when trials do not share CPUs: keep 1 on a small machine."""
    trial_max_failures: int = 1
    """Retries of a crashed trial; the other trials go on either way and the report counts what finished."""
    storage_path: str = "runs"
    """Tune's state and the trials' checkpoints (replaces the base experiment's); the report goes to
    ``<storage_path>/<name>/report`` when it is local."""
    report_dir: str | None = None
    """Where report.md and the plots go (default: as above; for a remote ``storage_path``, ``<name>-report``
    in the working directory). They are logged on the ablation's MLflow run either way."""
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, f"ablation name {self.name!r} must be non-empty without '/'")
        check(bool(self.experiment), "ablation experiment is empty: name the base experiment YAML")
        check(len(self.arms) >= 2, f"arms must name at least two arms (a baseline and another), got {list(self.arms)}")
        for arm in self.arms:
            check(bool(ARM_NAME.fullmatch(arm)), f"arms.{arm}: an arm name may hold only letters, digits, _ and -")
        check(self.baseline in self.arms, f"baseline {self.baseline!r} is not one of the arms {list(self.arms)}")
        _check_seeds(self.seeds, "seeds")
        check(bool(self.metrics), "metrics is empty: name at least one metric to report, e.g. {val_loss: min}")
        for metric, direction in self.metrics.items():
            one_of(direction, DIRECTIONS, f"metrics.{metric}")
        check(0 < self.confidence < 1, f"confidence must lie in (0, 1), got {self.confidence}")
        at_least(self.max_concurrent_trials, 1, "max_concurrent_trials")
        at_least(self.trial_max_failures, 0, "trial_max_failures")

    def quick_version(self) -> AblationConfig:
        """The ``--quick`` ablation: its own name (it must not resume the full one), the quick seeds, the quick
        overrides after the ablation's own."""
        return dataclasses.replace(
            self,
            name=f"{self.name}-quick",
            overrides=[*self.overrides, *self.quick.overrides],
            seeds=list(self.quick.seeds or self.seeds),
            quick=QuickConfig(),
        )


def _check_seeds(seeds: list[int], key: str) -> None:
    check(
        len(seeds) >= 2,
        f"{key} must name at least two seeds (one seed gives no spread and no interval), got {seeds}",
    )
    check(len(set(seeds)) == len(seeds), f"{key} has a repeated seed: {seeds}")
