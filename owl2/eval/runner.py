"""``owl2 eval``: answer a :class:`~owl2.eval.suite.Suite` with Ray Data actors, score it and track it in MLflow.

The eval run goes into MLflow as a child of the training run that wrote the checkpoint, found from the
checkpoint's ``experiment.yaml`` (experiment name and tracking experiment) and ``state.json`` (stage): under the
stage run when there is one, else under the experiment run, else (a released model, or a training run that
is not in the store) at the top level of the tracking experiment. The scores of an experiment's final checkpoint
are repeated on the experiment's run, where MLflow's runs table compares experiments.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from owl2.eval.generate import ModelSource, model_source, predict_dataset
from owl2.eval.suite import Row, Suite

DEFAULT_STORAGE_PATH = "~/owl2_runs"
"""Where a checkpoint without ``experiment.yaml`` (the released model) keeps its eval runs, as training would."""


@dataclass
class EvalResult:
    suite: str
    metrics: dict[str, float]
    rows: list[Row]
    predictions: Path
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)


def run_eval(
    checkpoint: str | Path,
    suite: str,
    data: str | Path | None = None,
    *,
    tokenizer: str | Path | None = None,
    template: str | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    num_actors: int = 1,
    use_gpu: bool = False,
    output: str | Path | None = None,
    track: bool = True,
) -> EvalResult:
    """Evaluate a checkpoint on a suite: predictions JSONL, metrics, and (``track``) an MLflow eval run.

    ``output`` is the predictions JSONL (default: a temporary folder; the file is an artifact of the run).
    """
    source = model_source(checkpoint, tokenizer, template)
    loaded = Suite.load(suite, data, image_root=image_root, limit=limit, source=source)
    if output is None:
        output = Path(tempfile.mkdtemp(prefix="owl2-eval-")) / f"{suite}_predictions.jsonl"
    output = Path(output)
    params = {
        "checkpoint": source.checkpoint,
        "suite": suite,
        "data": str(data) if data is not None else "",
        "tokenizer": source.tokenizer,
        "template": source.template,
        "batch_size": batch_size,
        "limit": limit if limit is not None else "",
        "num_items": len(loaded.items),
        "num_actors": num_actors,
        "use_gpu": use_gpu,
    }

    def evaluate() -> EvalResult:
        records = predict_dataset(source, loaded.items, output, batch_size, num_actors, use_gpu)
        rows = loaded.score(records)
        notes = [] if rows else [f"no item of {suite} has reference answers: predictions only"]
        return EvalResult(suite, {row.metric: row.value for row in rows}, rows, output, notes=notes)

    if not track:
        return evaluate()
    return _tracked(source, loaded, params, evaluate)


def _tracked(
    source: ModelSource, suite: Suite, params: dict[str, Any], evaluate: Callable[[], EvalResult]
) -> EvalResult:
    from owl2.config import TrackingConfig, build
    from owl2.tracking import Tracker, resolve_tracking_uri, run_tags

    experiment = source.experiment or {}
    tracking = build(TrackingConfig, experiment.get("tracking") or {}, "tracking")
    tracker = Tracker(resolve_tracking_uri(tracking, experiment.get("storage_path") or DEFAULT_STORAGE_PATH))
    stage = (source.state or {}).get("stage")
    parent = training_run(tracker, tracking.experiment, experiment.get("name"), stage) if experiment else None
    config_yaml = yaml.safe_dump(experiment, sort_keys=False) if experiment else ""
    tags = {
        **run_tags(None, config_yaml, None),
        "owl2.eval.suite": suite.name,
        "owl2.eval.checkpoint": source.checkpoint,
    }
    step = int((source.state or {}).get("step", 0))
    with tracker.run(f"eval-{suite.name}", tracking.experiment, parent_run_id=parent, tags=tags) as run_id:
        tracker.log_params(run_id, {**params, "training_stage": stage or "", "training_step": step})
        result = evaluate()
        tracker.log_metrics(run_id, result.metrics, step=step)
        suite.log(tracker, run_id, result.predictions, result.rows)
    log_final_eval(tracker, parent, experiment, stage, step, result.metrics)
    result.run_id = run_id
    return result


def log_final_eval(
    tracker: Any,
    parent: str | None,
    experiment: Mapping[str, Any],
    stage: str | None,
    step: int,
    metrics: Mapping[str, float],
) -> str | None:
    """Repeat the scores of an experiment's final checkpoint (its last stage's last step) on the experiment's run
    as ``eval/<metric>`` (columns of the runs table), beside the stages' headline metrics. ``parent``: the run the
    eval run nests under (the stage run, or the experiment run when the stage has none). Returns the experiment
    run's id when it logged."""
    stages = experiment.get("stages") or {}
    if parent is None or not stages or stage != list(stages)[-1] or step != (stages[stage] or {}).get("max_steps"):
        return None
    from owl2.tracking import PARENT_RUN_TAG

    run = tracker.client.get_run(parent)
    top = run.data.tags.get(PARENT_RUN_TAG) if run.info.run_name == stage else parent
    if top is None:
        return None
    scores = {f"eval/{key}": value for key, value in metrics.items()}
    tracker.log_metrics(top, scores, step=0)
    tracker.show_columns(run.info.experiment_id, scores)
    return top


def training_run(tracker: Any, experiment: str, name: str | None, stage: str | None) -> str | None:
    """The run an eval run nests under: the stage run of the checkpoint when found, else the experiment run."""
    if not name:
        return None
    run_id = tracker.find_run(experiment, name, None)
    if run_id is None:
        # A sweep trial's experiment run sits under the sweep's run: take the newest run of that name anywhere.
        run_id = _newest_run_named(tracker, experiment, name)
    if run_id is None:
        return None
    if stage:
        return tracker.find_run(experiment, stage, run_id) or run_id
    return run_id


def _newest_run_named(tracker: Any, experiment: str, name: str) -> str | None:
    from mlflow.entities import ViewType

    found = tracker.client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        return None
    runs = tracker.client.search_runs(
        [found.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, order_by=["attributes.start_time DESC"]
    )
    return next((run.info.run_id for run in runs if run.info.run_name == name), None)


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The records of a predictions JSONL (to re-score it with :meth:`Suite.score`)."""
    with Path(path).open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]
