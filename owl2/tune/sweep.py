"""Ray Tune sweeps whose trials are owl2 experiments (Ray Train runs), each tracked in MLflow.

::

    MLflow: sweep run (the best trial's values as params, its best metric, wall time; sweep.yaml, summary, best.yaml)
              +- shared stages (once, when only later stages are swept: no repeated pre-training)
              +- trial run (one per trial: sampled values, seed and objective as params, the whole config as
                 experiment.yaml; best metric, each stage's final metrics; stopped early?)
                   +- stage runs (a trial that ASHA stopped ends KILLED, and so does the stage it was in)

Ray Train V2 runs inside a Tune trial as Ray documents it: the trial function builds ``TorchTrainer``s
(through ``run_experiment``) whose ``TuneReportCallback`` forwards every report to Tune, so ASHA sees the
validation metric as it is reported. Re-running a sweep under its name resumes it.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from owl2.config import (
    ConfigError,
    ExperimentConfig,
    SweepConfig,
    TrackingConfig,
    build,
    load_experiment,
    load_yaml,
    merge,
    parse_overrides,
    to_dict,
)
from owl2.errors import StageFailed

FAILED_FILE = "stage_failed.json"
"""In a trial's folder: the unfixable stage failure of its last attempt, and which fit of the sweep it was in."""


@dataclass
class TrialSummary:
    trial_id: str
    values: dict[str, Any]
    metric: float | None
    iterations: int
    status: str
    stopped_early: bool
    error: str | None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, ExperimentConfig]:
    """The sweep and its base experiment, validated together before Ray starts.

    Every swept key is tried on the base experiment with a representative value, so a typo or an
    impossible value is reported naming the key.
    """
    path = Path(path)
    sweep = build(SweepConfig, merge(load_yaml(path), parse_overrides(overrides or [])), "sweep")
    base = load_experiment(path.parent / sweep.experiment, sweep.overrides)
    for key, spec in sweep.space.items():
        kind, values = next(iter(spec.items()))
        for value in values if kind in ("grid", "choice") else values[:1]:
            try:
                apply_sample(base, {key: value})
            except ConfigError as error:
                raise ConfigError(f"space.{key}={value!r} does not fit the experiment: {error}") from error
    check_metric(sweep, base)
    return sweep, base


def check_metric(sweep: SweepConfig, base: ExperimentConfig) -> None:
    """The metric must be one the trials' stages report, or Tune fails the first trial only after it started."""
    if sweep.metric not in ("loss", "val_loss") and not sweep.metric.startswith("eval/"):
        raise ConfigError(
            f"sweep metric {sweep.metric!r} is not reported by training: use val_loss (needs a validation section "
            "in every swept stage), loss, or an eval/... metric of a stage's eval suite"
        )
    if sweep.metric == "val_loss":
        _, trial_stages = plan_stages(sweep, base)
        missing = [name for name in trial_stages if base.stages[name].validation is None]
        if missing:
            raise ConfigError(
                f"sweep metric val_loss needs stages.{missing[0]}.validation (the stage reports no val_loss)"
            )


def apply_sample(base: ExperimentConfig, sample: dict[str, Any]) -> ExperimentConfig:
    """The base experiment with the sampled ``dotted.key: value`` pairs set (validated)."""
    nested: dict[str, Any] = {}
    for key, value in sample.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return build(ExperimentConfig, merge(to_dict(base), nested))


def plan_stages(sweep: SweepConfig, base: ExperimentConfig) -> tuple[list[str], list[str]]:
    """(stages run once and shared, stages every trial runs), from the swept keys (:func:`split_stages`)."""
    return split_stages(sweep.space, base)


def split_stages(keys: Iterable[str], base: ExperimentConfig) -> tuple[list[str], list[str]]:
    """(stages no key changes, the stages from the first one a key changes): what trials that differ in ``keys``
    (dotted experiment keys) can share, and what each must run.

    Keys under ``stages.<name>`` only affect that stage and later ones; anything else (the model's
    architecture, resources) affects every stage, so trials then run the whole pipeline.
    """
    order = list(base.stages)
    first = len(order)
    for key in keys:
        parts = key.split(".")
        first = min(first, order.index(parts[1]) if parts[0] == "stages" and parts[1] in order else 0)
    return order[:first], order[first:]


def trial_params(sweep: SweepConfig, values: dict[str, Any], seed: int) -> dict[str, Any]:
    """A trial run's MLflow params (and the sweep run's, for its best trial): the swept values under their own
    keys, the seed and the objective. Only these, so that MLflow's compare page offers the swept keys as its axes
    (it offers the params whose values differ, a param that a run lacks included); the whole config is the run's
    ``experiment.yaml``. The shared stages' run logs the seed and the objective alone (``values`` empty)."""
    return {"seed": seed, "objective": f"{sweep.mode} {sweep.metric}", **values}


def _param_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    makers = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v),
    }
    return {key: makers[kind](values) for key, spec in sweep.space.items() for kind, values in spec.items()}


class Trials(Protocol):
    """What every trial of a Tuner shares: the stages a trial runs, the MLflow run it nests under, and how the
    trial's Tune config becomes its experiment and its MLflow run's params (what tells the trials apart; the
    whole config is the run's ``experiment.yaml``)."""

    stages: list[str]
    parent_run_id: str

    def experiment(self, config: dict[str, Any], trial_id: str) -> tuple[ExperimentConfig, dict[str, Any]]: ...


@dataclass
class SweepTrials:
    """A sweep's trials: the base experiment with the sampled values, starting from the shared stages' checkpoint."""

    sweep: SweepConfig
    base: dict[str, Any]
    stages: list[str]
    parent_run_id: str
    shared_checkpoint: str | None

    def experiment(self, config: dict[str, Any], trial_id: str) -> tuple[ExperimentConfig, dict[str, Any]]:
        experiment = apply_sample(build(ExperimentConfig, self.base), config)
        experiment.name = f"{self.sweep.name}-{trial_id}"
        if self.shared_checkpoint:
            experiment.stages[self.stages[0]].init_from = self.shared_checkpoint
        values = {key: config[key] for key in self.sweep.space}
        return experiment, trial_params(self.sweep, values, experiment.seed)


def _trial(config: dict[str, Any], trials: Trials, fit_id: str) -> None:
    """One trial: its experiment (``trials.experiment``), run as Ray Train runs (``TorchTrainer``).

    A stage that failed in a way no restart can fix (:class:`StageFailed`: bad data beyond the limit, the NaN
    limit, ...) is not run again when Tune retries the trial within the same :func:`fit_trials` call (``fit_id``):
    the retry fails at once with the same cause. Re-running the sweep runs it again.
    """
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    experiment, params = trials.experiment(config, tune.get_context().get_trial_id())
    record = Path(tune.get_context().get_trial_dir()) / FAILED_FILE
    earlier = _failed_in(record, fit_id)
    if earlier:
        raise StageFailed(f"{earlier} (the trial's retry did not run it again: a restart cannot fix this)")
    # Ray: the trial runs in a placement group that captures child tasks, and Train V2 passes that on to its
    # workers, whose Ray Data tasks (1 CPU each) then no longer fit their worker's bundle. Started from a task
    # that leaves the placement group, Train behaves as outside Tune. The task fate-shares with the trial, so
    # a trial that ASHA stops takes its Train run down with it.
    leave_placement_group = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy="DEFAULT")
    try:
        ray.get(
            leave_placement_group(_run_trial).remote(
                experiment,
                trials.stages,
                trials.parent_run_id,
                params,
                TuneReportCallback(),  # Ray: forward Train reports to Tune (built here, in the Tune session)
            )
        )
    except StageFailed as error:  # Ray raises the task's error as an instance of its cause
        # On the trial's node: a retry elsewhere (a multi-node cluster) trains again, as without this record.
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"fit_id": fit_id, "error": str(getattr(error, "cause", error))}))
        raise


def _failed_in(record: Path, fit_id: str) -> str | None:
    """The unfixable failure that ``record`` holds from an earlier attempt of the same fit, if any."""
    try:
        failure = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return failure.get("error") if failure.get("fit_id") == fit_id else None


def _run_trial(
    experiment: ExperimentConfig, stages: list[str], parent_run_id: str, params: dict[str, Any], report: Any
) -> None:
    from owl2.train.trainer import run_experiment

    run_experiment(
        experiment, stages=stages, parent_run_id=parent_run_id, params=params, callbacks=[report], progress=False
    )


def prepare(base: ExperimentConfig, storage_path: str, tracking: TrackingConfig) -> tuple[ExperimentConfig, Any]:
    """The base experiment made ready for trials: local paths absolute, the sweep's ``storage_path`` and
    ``tracking`` in place of its own; Ray started; the tracker of that store."""
    from owl2.runtime import ensure_ray
    from owl2.tracking import Tracker, resolve_tracking_uri
    from owl2.train.trainer import resolve_paths

    base = resolve_paths(copy.deepcopy(base))
    base.storage_path = str(Path(storage_path).expanduser().resolve()) if "://" not in storage_path else storage_path
    ensure_ray()
    tracker = Tracker(resolve_tracking_uri(tracking, base.storage_path))
    base.tracking = copy.deepcopy(tracking)
    base.tracking.tracking_uri = tracker.tracking_uri
    return base, tracker


def run_shared(
    experiment: ExperimentConfig,
    stages: list[str],
    name: str,
    parent_run_id: str,
    params: dict[str, Any] | None = None,
) -> str:
    """Run ``stages`` of ``experiment`` once, as the run ``name`` under ``parent_run_id``; the last checkpoint.
    ``params``: its MLflow params, those of the trials' params it shares (None: the whole config, as trials that
    log it)."""
    from owl2.train.trainer import run_experiment

    shared = copy.deepcopy(experiment)
    shared.name = name
    results = run_experiment(shared, stages=stages, parent_run_id=parent_run_id, params=params, progress=False)
    return results[-1].checkpoint.path


def fit_trials(
    trials: Trials,
    name: str,
    storage: str,
    param_space: dict[str, Any],
    tune_config: dict[str, Any],
    max_failures: int,
    stall_warning_s: float,
) -> Any:
    """Run (or resume, with errored trials retried) the Tuner ``name`` under ``storage``: one trial per sample of
    ``param_space``, each an owl2 experiment (``trials``). ``tune_config``: ``tune.TuneConfig``'s arguments.
    Returns Tune's ``ResultGrid``."""
    from ray import tune

    from owl2.stall import StallWatchdog
    from owl2.train.progress import say

    # The trial function only waits on its TorchTrainer: it must hold no CPU, or it would starve the training
    # workers and their data tasks (whole CPUs). Tune refuses an empty request, so ask for a little memory.
    fit_id = uuid.uuid4().hex  # this call's: a later re-run of the sweep runs failed trials again
    trainable = tune.with_parameters(_trial, trials=trials, fit_id=fit_id)
    trainable = tune.with_resources(trainable, {"memory": 64 * 1024**2})
    path = f"{storage.rstrip('/')}/{name}"
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            # The trial's folder is its id (a sweep's trial's MLflow run is named after it).
            tune_config=tune.TuneConfig(**tune_config, trial_dirname_creator=lambda trial: trial.trial_id),
            run_config=tune.RunConfig(  # Ray
                name=name, storage_path=storage, failure_config=tune.FailureConfig(max_failures=max_failures)
            ),
        )
    with StallWatchdog(stall_warning_s, say):
        return tuner.fit()  # Ray


def run_sweep(sweep: SweepConfig, base: ExperimentConfig) -> list[TrialSummary]:
    """Run (or resume) the sweep; returns the trials ranked by their best metric."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from owl2.tracking import run_tags

    start = time.monotonic()
    base, tracker = prepare(base, sweep.storage_path, sweep.tracking)
    sweep_yaml = yaml.safe_dump(to_dict(sweep), sort_keys=False)
    parent = tracker.start_run(
        sweep.name, sweep.tracking.experiment, tags=run_tags(None, sweep_yaml, None), resume=True
    )
    tracker.log_text(parent, sweep_yaml, "sweep.yaml")  # its params are its best trial's, logged at the end

    shared, trial_stages = plan_stages(sweep, base)
    shared_checkpoint = None
    if shared:
        params = trial_params(sweep, {}, base.seed)
        shared_checkpoint = run_shared(base, shared, f"{sweep.name}-shared", parent, params)
    trials = SweepTrials(sweep, to_dict(base), trial_stages, parent, shared_checkpoint)
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            grace_period=sweep.scheduler.grace_period,
            reduction_factor=sweep.scheduler.reduction_factor,
            max_t=sweep.scheduler.max_t,
        )
        if sweep.scheduler.type == "asha"
        else FIFOScheduler()
    )
    tune_config = {
        "metric": sweep.metric,
        "mode": sweep.mode,
        "scheduler": scheduler,
        "search_alg": _search_algorithm(sweep),
        "num_samples": sweep.num_samples,
        "max_concurrent_trials": sweep.max_concurrent_trials,
    }
    grid = fit_trials(
        trials,
        sweep.name,
        base.storage_path,
        _param_space(sweep),
        tune_config,
        sweep.trial_max_failures,
        base.resources.stall_warning_s,
    )
    summaries = _summarise(grid, sweep, base)
    tracker.add_wall_time(parent, time.monotonic() - start)
    _record(tracker, parent, sweep, base, summaries, f"{base.storage_path.rstrip('/')}/{sweep.name}")
    return summaries


def _search_algorithm(sweep: SweepConfig) -> Any:
    if sweep.search != "optuna":
        return None  # Ray Tune's variant generator: grid and random sampling
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as error:  # optuna is optional: it is not a dependency of owl2
        raise ConfigError("search: optuna needs the optuna package (pip install optuna)") from error
    return OptunaSearch()


def _summarise(grid: Any, sweep: SweepConfig, base: ExperimentConfig) -> list[TrialSummary]:
    """Rank the trials; a trial was stopped early when its last report is not its last stage's last step."""
    last_stage = len(base.stages) - 1
    last_steps = base.stages[list(base.stages)[-1]].max_steps
    summaries = []
    for result in grid:
        history = result.metrics_dataframe
        values = history[sweep.metric].dropna() if history is not None and sweep.metric in history else []
        best = (min(values) if sweep.mode == "min" else max(values)) if len(values) else None
        metrics = result.metrics or {}
        iterations = int(metrics.get("training_iteration", 0))
        completed = metrics.get("stage_index") == last_stage and metrics.get("step") == last_steps
        summaries.append(
            TrialSummary(
                trial_id=Path(result.path).name,
                values={key: result.config.get(key) for key in sweep.space},
                metric=None if best is None else float(best),
                iterations=iterations,
                status="ERROR" if result.error else "TERMINATED",
                stopped_early=result.error is None and not completed,
                error=None if result.error is None else str(result.error)[-2000:],
            )
        )
    worst = float("inf") if sweep.mode == "min" else float("-inf")
    summaries.sort(key=lambda s: (s.metric if s.metric is not None else worst) * (1 if sweep.mode == "min" else -1))
    return summaries


def close_trial_run(tracker: Any, run_id: str, stages: list[str], stopped: bool, failed: bool) -> None:
    """A trial's MLflow run after the Tuner: it repeats its stage runs' last values (a trial stopped inside a stage
    never logged that stage's), and one that Tune ``stopped`` (KILLED) or that ``failed`` (FAILED) ends as the
    stage run it was in (:meth:`~owl2.tracking.Tracker.end_stopped`)."""
    tracker.log_headline(run_id, stages)
    if stopped or failed:
        tracker.end_stopped(run_id, "KILLED" if stopped else "FAILED")


def _record(
    tracker: Any, parent: str, sweep: SweepConfig, base: ExperimentConfig, summaries: list[TrialSummary], path: str
) -> None:
    from owl2.tracking import redact

    rows = [summary.__dict__ for summary in summaries]
    tracker.log_dict(parent, {"metric": sweep.metric, "mode": sweep.mode, "trials": rows}, "summary.json")
    table = "\n".join(
        f"{i + 1:>2}. {s.trial_id:<24} {sweep.metric}={s.metric if s.metric is None else round(s.metric, 5)!s:<10} "
        f"iters={s.iterations:<4} {'stopped early ' if s.stopped_early else ''}{s.status} {json.dumps(s.values)}"
        for i, s in enumerate(summaries)
    )
    tracker.log_text(parent, table, "summary.txt")
    objective = f"best_{sweep.metric}"
    run_ids = {
        s.trial_id: tracker.find_run(sweep.tracking.experiment, f"{sweep.name}-{s.trial_id}", parent) for s in summaries
    }
    # A stopped trial's own process fails as Tune tears it down (its Train controller dies) and ends its runs FAILED,
    # possibly after Tune has let go of it: let it finish, then end them KILLED.
    tracker.wait_ended([run_ids[s.trial_id] for s in summaries if s.stopped_early and run_ids[s.trial_id]])
    for summary in summaries:
        run_id = run_ids[summary.trial_id]
        if run_id:
            tracker.set_tags(
                run_id, {"owl2.stopped_early": str(summary.stopped_early).lower(), "owl2.trial_status": summary.status}
            )
            if summary.metric is not None:
                tracker.log_metrics(run_id, {objective: summary.metric}, step=0)
            close_trial_run(tracker, run_id, list(base.stages), summary.stopped_early, summary.status == "ERROR")
    ranked = [s for s in summaries if s.metric is not None and s.status != "ERROR"]
    if ranked:
        best = apply_sample(base, ranked[0].values)
        # A resumed sweep whose best trial changed keeps the first values (MLflow params never change; log_params
        # warns): the owl2.best_trial tag and best.yaml follow the current best.
        tracker.log_params(parent, trial_params(sweep, ranked[0].values, best.seed))
        tracker.log_metrics(parent, {objective: ranked[0].metric}, step=0)
        tracker.show_columns(tracker.experiment_id(sweep.tracking.experiment), [objective], list(sweep.space))
        best.name = f"{sweep.name}-best"
        best_yaml = yaml.safe_dump(redact(to_dict(best)), sort_keys=False)
        tracker.log_text(parent, best_yaml, "best.yaml")
        tracker.set_tags(parent, {"owl2.best_trial": ranked[0].trial_id})
        if "://" not in path:
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "best.yaml").write_text(best_yaml)
    tracker.end_run(parent, "FINISHED")
    print(f"sweep {sweep.name}: {len(summaries)} trials ranked by {sweep.metric} ({sweep.mode})\n{table}", flush=True)
