"""``owl2 ablate``: every arm at every seed as a Ray Tune trial (an owl2 experiment), then the report.

::

    MLflow: ablation run   report.md, plots, results.json; arm.<arm>.<metric>.mean, ..., wall_time_s
              +- <name>-shared-seed<s>   the stages no arm changes, once per seed (when there are such stages)
              +- <name>-<arm>-seed<s>    one trial: params ablation.arm, ablation.seed and the arm's keys
                   +- stage runs

Trials come from :mod:`owl2.tune.sweep`'s machinery: a grid over ``arm`` and ``seed``, no scheduler (every
trial runs to its end), stages shared as a sweep shares them, but once per seed: a seed sets the initial
weights and the data order of every stage, so each seed is an independent replicate, and within a seed the
arms start from one checkpoint (a paired comparison).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from owl2.ablate.report import (
    REPORT_FILE,
    AblationReport,
    ArmCost,
    TrialResult,
    build_report,
    headline_metrics,
    text_summary,
    write_report,
)
from owl2.config import (
    AblationConfig,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    build,
    load_experiment,
    load_yaml,
    merge,
    parse_overrides,
    to_dict,
)
from owl2.plan.flops import FlopModel
from owl2.tracking import flatten


@dataclass
class AblationOutcome:
    report: AblationReport
    folder: Path
    """Where report.md, results.json and the plots were written."""


def load_ablation(
    path: str | Path, overrides: list[str] | None = None, quick: bool = False
) -> tuple[AblationConfig, ExperimentConfig]:
    """The ablation (its ``--quick`` version when ``quick``) and its base experiment, validated before Ray starts:
    every arm is built on the base, and every metric must be one the last stage reports."""
    path = Path(path)
    ablation = build(AblationConfig, merge(load_yaml(path), parse_overrides(overrides or [])), "ablation")
    if quick:
        ablation = ablation.quick_version()
    base = load_experiment(path.parent / ablation.experiment, ablation.overrides)
    for arm in ablation.arms:
        arm_experiment(base, ablation, arm, ablation.seeds[0])
    _check_metrics(ablation, base)
    return ablation, base


def arm_keys(overrides: list[str]) -> list[str]:
    """The dotted experiment keys that ``overrides`` set (a section set whole gives its leaves)."""
    return list(flatten(parse_overrides(overrides)))


def arm_experiment(base: ExperimentConfig, ablation: AblationConfig, arm: str, seed: int) -> ExperimentConfig:
    """The base with ``arm``'s overrides at ``seed`` (:func:`seeded`); a ConfigError names the arm."""
    return seeded(base, ablation.arms[arm], seed, f"arms.{arm}")


def seeded(base: ExperimentConfig, overrides: list[str], seed: int, where: str = "overrides") -> ExperimentConfig:
    """The base with ``overrides`` and ``seed`` as the experiment's ``seed`` (initial weights) and every stage's
    ``data.seed`` (data order); a ConfigError starts with ``where``."""
    try:
        update = parse_overrides(overrides)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from error
    for key in arm_keys(overrides):
        parts = key.split(".")
        if key == "seed" or (parts[0] == "stages" and parts[2:] == ["data", "seed"]):
            raise ConfigError(f"{where} sets {key}, which the ablation's seeds set: leave it to seeds")
    unknown = [name for name in update.get("stages") or {} if name not in base.stages]
    if unknown:
        raise ConfigError(f"{where}: unknown stage {unknown[0]!r} (stages: {', '.join(base.stages)})")
    seeds = {"seed": seed, "stages": {name: {"data": {"seed": seed}} for name in base.stages}}
    try:
        return build(ExperimentConfig, merge(merge(to_dict(base), update), seeds))
    except ConfigError as error:
        raise ConfigError(f"{where} does not fit the experiment: {error}") from error


def _check_metrics(ablation: AblationConfig, base: ExperimentConfig) -> None:
    """Each metric must be in the last stage's final report, or the report would find it nowhere after hours."""
    name = list(base.stages)[-1]
    stage = base.stages[name]
    for metric in ablation.metrics:
        if metric == "loss":
            continue
        if metric == "val_loss":
            if stage.validation is None:
                raise ConfigError(f"metrics.val_loss needs stages.{name}.validation (the last stage reports none)")
        elif metric.startswith("eval/"):
            suite = stage.eval.suite if stage.eval is not None else None
            if metric.split("/")[1] != suite:
                raise ConfigError(
                    f"metrics.{metric} needs the {metric.split('/')[1]!r} eval suite in stages.{name}.eval "
                    f"(the last stage evaluates {'nothing' if suite is None else repr(suite)})"
                )
        else:
            raise ConfigError(
                f"metrics.{metric} is not reported by training: use val_loss, loss or an eval/... metric of the "
                "last stage's eval suite"
            )


@dataclass
class AblationTrials:
    """The ablation's trials for :func:`owl2.tune.sweep.fit_trials`: Tune config ``{arm, seed}`` -> experiment."""

    name: str
    base: dict[str, Any]
    ablation: AblationConfig
    stages: list[str]
    parent_run_id: str
    shared_checkpoints: dict[int, str]

    def experiment(self, config: dict[str, Any], trial_id: str) -> tuple[ExperimentConfig, dict[str, Any]]:
        arm, seed = config["arm"], config["seed"]
        experiment = arm_experiment(build(ExperimentConfig, self.base), self.ablation, arm, seed)
        experiment.name = trial_name(self.name, arm, seed)
        if seed in self.shared_checkpoints:
            experiment.stages[self.stages[0]].init_from = self.shared_checkpoints[seed]
        # Only what tells the trials apart, as MLflow's compare page should offer it; the whole config is the
        # trial's experiment.yaml.
        return experiment, {"ablation": {"arm": arm, "seed": seed}, **parse_overrides(self.ablation.arms[arm])}


def trial_name(ablation: str, arm: str, seed: int) -> str:
    return f"{ablation}-{arm}-seed{seed}"


def run_ablation(ablation: AblationConfig, base: ExperimentConfig) -> AblationOutcome:
    """Run (or resume) every arm at every seed, then write and log the report."""
    from owl2.tracking import run_tags
    from owl2.train.trainer import preflight
    from owl2.tune.sweep import prepare

    for arm in ablation.arms:  # data, tokenizers, memory plan, eval suites: before Ray starts
        preflight(arm_experiment(base, ablation, arm, ablation.seeds[0]))
    start = time.monotonic()
    base, tracker = prepare(base, ablation.storage_path, ablation.tracking)
    ablation_yaml = yaml.safe_dump(to_dict(ablation), sort_keys=False)
    parent = tracker.start_run(
        ablation.name, ablation.tracking.experiment, tags=run_tags(None, ablation_yaml, None), resume=True
    )
    tracker.log_params(parent, {"ablation": to_dict(ablation)})
    tracker.log_text(parent, ablation_yaml, "ablation.yaml")
    try:
        report = _run_trials(ablation, base, tracker, parent)
        folder = report_folder(ablation, base.storage_path)
        for path in write_report(report, folder):
            tracker.client.log_artifact(parent, str(path))
        headline = headline_metrics(report)
        tracker.log_metrics(parent, headline, step=0)
        # The columns of the runs table that owl2's link opens: each arm's mean per metric, the trials' arm and seed.
        means = [key for key in headline if key.endswith(".mean")]
        experiment_id = tracker.experiment_id(ablation.tracking.experiment)
        tracker.show_columns(experiment_id, means, ["ablation.arm", "ablation.seed"])
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    finally:
        tracker.add_wall_time(parent, time.monotonic() - start)
    tracker.end_run(parent, "FINISHED")
    print(f"{text_summary(report)}\n\nreport: {folder / REPORT_FILE} (and on MLflow run {parent})", flush=True)
    return AblationOutcome(report, folder)


def _run_trials(ablation: AblationConfig, base: ExperimentConfig, tracker: Any, parent: str) -> AblationReport:
    """The shared stages per seed, then the trials on Tune; the report of what they reached."""
    from ray import tune

    from owl2.tune.sweep import close_trial_run, fit_trials, split_stages

    keys = [key for overrides in ablation.arms.values() for key in arm_keys(overrides)]
    shared, trial_stages = split_stages(keys, base)
    checkpoints, shared_wall_s = _run_shared_stages(ablation, base, shared, parent) if shared else ({}, [])
    trials = AblationTrials(ablation.name, to_dict(base), ablation, trial_stages, parent, checkpoints)
    grid = fit_trials(
        trials,
        ablation.name,
        base.storage_path,
        {"arm": tune.grid_search(list(ablation.arms)), "seed": tune.grid_search(list(ablation.seeds))},
        {"num_samples": 1, "max_concurrent_trials": ablation.max_concurrent_trials},
        ablation.trial_max_failures,
        base.resources.stall_warning_s,
    )
    results, histories = _collect(grid, ablation, base)
    experiment = ablation.tracking.experiment
    for result in results:
        run_id = tracker.find_run(experiment, trial_name(ablation.name, result.arm, result.seed), parent)
        if run_id:
            close_trial_run(tracker, run_id, list(base.stages), stopped=False, failed=result.error is not None)
    costs = {
        arm: arm_cost(arm_experiment(base, ablation, arm, ablation.seeds[0]), histories.get(arm, []))
        for arm in ablation.arms
    }
    return build_report(
        name=ablation.name,
        experiment=ablation.experiment,
        arms=ablation.arms,
        baseline=ablation.baseline,
        directions=ablation.metrics,
        seeds=ablation.seeds,
        trials=results,
        costs=costs,
        shared_stages=shared,
        shared_wall_s=shared_wall_s,
        confidence=ablation.confidence,
    )


def _run_shared_stages(
    ablation: AblationConfig, base: ExperimentConfig, stages: list[str], parent_run_id: str
) -> tuple[dict[int, str], list[float]]:
    """The stages no arm changes, once per seed, as Ray tasks (``max_concurrent_trials`` at once, like the trials):
    the last checkpoint of each seed and the seconds each took."""
    import ray

    from owl2.train.progress import say

    run = ray.remote(num_cpus=0, max_retries=0)(_timed_shared_run)  # waits on its TorchTrainers only
    waiting, running = list(ablation.seeds), dict[Any, int]()
    checkpoints: dict[int, str] = {}
    seconds: list[float] = []
    say(f"[ablate] {ablation.name}: {', '.join(stages)} once per seed ({len(waiting)} seeds), shared by every arm")
    while waiting or running:
        while waiting and len(running) < ablation.max_concurrent_trials:
            seed = waiting.pop(0)
            # The arms do not differ in these stages: the base at the seed is every arm's.
            name = f"{ablation.name}-shared-seed{seed}"
            running[run.remote(seeded(base, [], seed), stages, name, parent_run_id)] = seed
        (done,), _ = ray.wait(list(running), num_returns=1)
        seed = running.pop(done)
        checkpoints[seed], took = ray.get(done)
        seconds.append(took)
        say(f"[ablate] seed {seed}: {', '.join(stages)} done in {took:.0f} s")
    return checkpoints, seconds


def _timed_shared_run(
    experiment: ExperimentConfig, stages: list[str], name: str, parent_run_id: str
) -> tuple[str, float]:
    from owl2.tune.sweep import run_shared

    start = time.perf_counter()
    checkpoint = run_shared(experiment, stages, name, parent_run_id)
    return checkpoint, time.perf_counter() - start


def report_folder(ablation: AblationConfig, storage: str) -> Path:
    """``report_dir``, else ``<storage_path>/<name>/report`` for local storage, else ``<name>-report`` here."""
    if ablation.report_dir:
        return Path(ablation.report_dir).expanduser().resolve()
    if "://" in storage:
        return Path(f"{ablation.name}-report").resolve()
    return Path(storage) / ablation.name / "report"


def _collect(
    grid: Any, ablation: AblationConfig, base: ExperimentConfig
) -> tuple[list[TrialResult], dict[str, list[Any]]]:
    """Each trial's final metrics and wall time (a trial that failed or stopped before its last stage's last step
    reports no metric), and per arm the report histories of its finished trials (for the token counts)."""
    last = list(base.stages)[-1]
    results: list[TrialResult] = []
    histories: dict[str, list[Any]] = {}
    for result in grid:
        arm, seed = result.config["arm"], result.config["seed"]
        metrics = result.metrics or {}
        steps = arm_experiment(base, ablation, arm, seed).stages[last].max_steps  # an arm may change it
        finished = metrics.get("stage_index") == len(base.stages) - 1 and metrics.get("step") == steps
        error = None
        if result.error is not None or not finished:
            error = str(result.error)[-2000:] if result.error is not None else "stopped before the last step"
        values = {
            metric: float(metrics[metric])
            for metric in ablation.metrics
            if error is None and isinstance(metrics.get(metric), (int, float)) and math.isfinite(metrics[metric])
        }
        wall = metrics.get("time_total_s")
        results.append(TrialResult(arm, seed, values, None if wall is None else float(wall), error))
        if error is None and result.metrics_dataframe is not None:
            histories.setdefault(arm, []).append(result.metrics_dataframe)
    return sorted(results, key=lambda r: (list(ablation.arms).index(r.arm), r.seed)), histories


def arm_cost(experiment: ExperimentConfig, histories: list[Any]) -> ArmCost:
    """An arm's decoder cost per sample of its last stage: one image's tokens plus the mean text tokens per
    sample that the stage's training reports measured (tokens and images per second over samples per second,
    each window alike), and the decoder's forward FLOPs on such a sample."""
    index = len(experiment.stages) - 1
    stage = experiment.stages[list(experiment.stages)[-1]]
    spec = ModelConfig.from_preset(experiment.model.preset, experiment.model.overrides)
    rule = FlopModel(spec, (), stage.image_size)  # nothing trainable: forward FLOPs
    per_window = []
    for history in histories:
        columns = ("stage_index", "samples_per_s", "tokens_per_s", "images_per_s")
        if not all(column in history for column in columns):
            continue
        rows = history[list(columns)].dropna()
        rows = rows[(rows["stage_index"] == index) & (rows["samples_per_s"] > 0)]
        text = (rows["tokens_per_s"] - rows["images_per_s"] * rule.tokens_per_image) / rows["samples_per_s"]
        per_window += [float(value) for value in text]
    if not per_window:
        return ArmCost(rule.tokens_per_image, None, None)
    text_tokens = sum(per_window) / len(per_window)
    return ArmCost(rule.tokens_per_image, text_tokens, rule.decoder(round(text_tokens), 1).model)
