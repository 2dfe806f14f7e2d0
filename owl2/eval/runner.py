"""Evaluation suites: load a benchmark, answer it with Ray Data actors, score it, print a table, track it in MLflow.

Suites: ``shapes`` (the synthetic world's held-out VQA per question type against its chance level, caption
CIDEr, text-only exact match), and ``vqa``, ``mmbench``, ``mme``, ``captions`` on the files ``data`` names.

The eval run goes into MLflow as a child of the training run that wrote the checkpoint, found from the
checkpoint's ``experiment.yaml`` (experiment name and tracking experiment) and ``state.json`` (stage): under the
stage run when there is one, else under the experiment run, else (a released model, or a training run that
is not in the store) at the top level of the tracking experiment.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from owl2.eval import benchmarks, metrics
from owl2.eval.benchmarks import EvalItem
from owl2.eval.generate import ModelSource, model_source, predict_dataset

SUITES = ("shapes", "vqa", "mmbench", "mme", "captions")
DEFAULT_STORAGE_PATH = "~/owl2_runs"
"""Where a checkpoint without ``experiment.yaml`` (the released model) keeps its eval runs, as training would."""


@dataclass
class Row:
    """One line of the printed table."""

    metric: str
    value: float
    count: int
    chance: float | None = None


@dataclass
class EvalResult:
    suite: str
    metrics: dict[str, float]
    rows: list[Row]
    predictions: Path
    run_id: str | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def world_root(source: ModelSource | None, data: str | Path | None) -> Path:
    """The shapes world to evaluate on: ``data``, else the world whose tokenizer the checkpoint was trained with."""
    if data is not None:
        return Path(data)
    if source is not None and (Path(source.tokenizer).parent / "world.json").is_file():
        return Path(source.tokenizer).parent
    raise FileNotFoundError("the shapes suite needs --data WORLD_DIR (the checkpoint's tokenizer is not a world's)")


def load_suite(
    suite: str,
    data: str | Path | None = None,
    *,
    image_root: str | Path | None = None,
    limit: int | None = None,
    source: ModelSource | None = None,
) -> list[EvalItem]:
    """The items of a suite. ``limit`` keeps the first N items (of each split, for ``shapes``)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {list(SUITES)}")
    if suite == "shapes":
        splits = benchmarks.load_shapes(world_root(source, data), limit)
        return [item for split in ("vqa", "captions", "text") for item in splits[split]]
    if data is None:
        raise FileNotFoundError(f"the {suite} suite needs --data (the benchmark's file or folder)")
    loaders: dict[str, Callable[[], list[EvalItem]]] = {
        "vqa": lambda: benchmarks.load_vqa(data, image_root, limit),
        "mmbench": lambda: benchmarks.load_mmbench(data, limit),
        "mme": lambda: benchmarks.load_mme(data, limit),
        "captions": lambda: benchmarks.load_captions(data, image_root, limit),
    }
    return loaders[suite]()


def shapes_chance(world: str | Path) -> dict[str, float]:
    """The shapes world's chance level per question type (and ``text``), in the order the table follows."""
    levels = benchmarks.load_world(world)
    order = [*levels["question_types"], *levels["chance"]]
    return {kind: levels["chance"][kind] for kind in order if kind in levels["chance"]}


def check_local_images(items: Sequence[EvalItem]) -> None:
    """Fail before any model loads when local image files are missing (typically a wrong ``image_root``)."""
    missing = [
        image
        for item in items
        for image in item.images
        if isinstance(image, str) and "://" not in image and not Path(image).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the benchmark's images are missing, e.g. {missing[:3]}: check --image-root"
        )


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def score(suite: str, records: Sequence[dict[str, Any]], chance: dict[str, float] | None = None) -> list[Row]:
    """Table rows (metric name, value, item count, chance level) from prediction records.

    Records without reference answers (test-server splits) are not scored. ``chance`` (the shapes world's
    ``world.json`` levels per question type) adds chance columns.
    """
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record["answers"]:
            by_kind[record["kind"]].append(record)
    rows: list[Row] = []
    prefix = f"{suite}/" if suite == "shapes" else ""
    if by_kind["vqa"]:
        rows += _vqa_rows(f"{prefix}vqa", by_kind["vqa"], chance if suite == "shapes" else None)
    if by_kind["choice"]:
        rows += _choice_rows(f"{prefix}mmbench", by_kind["choice"])
    if by_kind["yes_no"]:
        rows += _mme_rows(f"{prefix}mme", by_kind["yes_no"])
    if by_kind["caption"]:
        found = by_kind["caption"]
        value = metrics.cider({r["id"]: r["prediction"] for r in found}, {r["id"]: r["answers"] for r in found})
        rows.append(Row(f"{prefix}captions/cider", value, len(found)))
    if by_kind["text"]:
        found = by_kind["text"]
        value = sum(metrics.exact_match(r["prediction"], r["answers"]) for r in found) / len(found)
        rows.append(Row(f"{prefix}text/exact_match", value, len(found), (chance or {}).get("text")))
    return rows


def _vqa_rows(name: str, records: list[dict[str, Any]], chance: dict[str, float] | None) -> list[Row]:
    def accuracy(group: list[dict[str, Any]]) -> float:
        return metrics.vqa_score([r["prediction"] for r in group], [r["answers"] for r in group])

    overall_chance = None
    if chance is not None:
        levels = [chance.get(r["meta"].get("question_type")) for r in records]
        overall_chance = sum(levels) / len(levels) if None not in levels else None
    rows = [Row(f"{name}/accuracy", accuracy(records), len(records), overall_chance)]
    if chance is not None:
        types: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in records:
            types[record["meta"]["question_type"]].append(record)
        order = [t for t in chance if t in types] + sorted(t for t in types if t not in chance)
        rows += [Row(f"{name}/{t}/accuracy", accuracy(types[t]), len(types[t]), chance.get(t)) for t in order]
    return rows


def _choice_rows(name: str, records: list[dict[str, Any]]) -> list[Row]:
    def accuracy(group: list[dict[str, Any]]) -> float:
        return metrics.multiple_choice_accuracy(
            [r["prediction"] for r in group], [r["answers"][0] for r in group], [r["meta"]["options"] for r in group]
        )

    rows = [Row(f"{name}/accuracy", accuracy(records), len(records))]
    categories: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record["meta"].get("category"):
            categories[record["meta"]["category"]].append(record)
    rows += [Row(f"{name}/{c}/accuracy", accuracy(g), len(g)) for c, g in sorted(categories.items())]
    return rows


def _mme_rows(name: str, records: list[dict[str, Any]]) -> list[Row]:
    scores = metrics.mme_scores(
        {
            "prediction": r["prediction"],
            "answer": r["answers"][0],
            "category": r["meta"]["category"],
            "image": r["meta"]["image"],
        }
        for r in records
    )
    count = len(records)
    rows = [
        Row(f"{name}/total", scores["total"], count),
        Row(f"{name}/perception", scores["perception"], count),
        Row(f"{name}/cognition", scores["cognition"], count),
        Row(f"{name}/acc", scores["acc"], count),
        Row(f"{name}/acc_plus", scores["acc_plus"], count),
    ]
    rows += [Row(f"{name}/{task}/score", s["score"], s["questions"]) for task, s in scores["subtasks"].items()]
    return rows


def format_table(rows: Sequence[Row], title: str = "") -> str:
    """The rows as an aligned text table (chance level in its own column where known)."""
    width = max([len("metric"), *(len(row.metric) for row in rows)])
    lines = [title] if title else []
    lines.append(f"{'metric':<{width}}  {'value':>9}  {'chance':>7}  {'n':>6}")
    for row in rows:
        chance = f"{row.chance:7.4f}" if row.chance is not None else f"{'':>7}"
        lines.append(f"{row.metric:<{width}}  {row.value:9.4f}  {chance}  {row.count:>6}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Running and tracking
# --------------------------------------------------------------------------------------------------


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
    items = load_suite(suite, data, image_root=image_root, limit=limit, source=source)
    if not items:
        raise ValueError(f"the {suite} suite has no items (data: {data})")
    check_local_images(items)
    chance = shapes_chance(world_root(source, data)) if suite == "shapes" else None
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
        "num_items": len(items),
        "num_actors": num_actors,
        "use_gpu": use_gpu,
    }

    def evaluate() -> EvalResult:
        records = predict_dataset(source, items, output, batch_size, num_actors, use_gpu)
        rows = score(suite, records, chance)
        notes = [] if rows else [f"no item of {suite} has reference answers: predictions only"]
        return EvalResult(suite, {row.metric: row.value for row in rows}, rows, output, notes=notes)

    if not track:
        return evaluate()
    return _tracked(source, suite, params, evaluate)


def _tracked(source: ModelSource, suite: str, params: dict[str, Any], evaluate: Callable[[], EvalResult]) -> EvalResult:
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
        "owl2.eval.suite": suite,
        "owl2.eval.checkpoint": source.checkpoint,
    }
    step = int((source.state or {}).get("step", 0))
    with tracker.run(f"eval-{suite}", tracking.experiment, parent_run_id=parent, tags=tags) as run_id:
        tracker.log_params(run_id, {**params, "training_stage": stage or "", "training_step": step})
        result = evaluate()
        tracker.log_metrics(run_id, result.metrics, step=step)
        log_artifacts(tracker, run_id, result.predictions, result.rows)
    result.run_id = run_id
    return result


def log_artifacts(
    tracker: Any, run_id: str, predictions: str | Path, rows: Sequence[Row], folder: str | None = None, title: str = ""
) -> None:
    """An evaluation's predictions JSONL, its table and its rows (``metrics.json``) as artifacts of ``run_id``."""
    prefix = f"{folder}/" if folder else ""
    tracker.client.log_artifact(run_id, str(predictions), folder)
    tracker.log_text(run_id, format_table(rows, title) + "\n", f"{prefix}eval_table.txt")
    tracker.log_dict(run_id, {row.metric: vars(row) for row in rows}, f"{prefix}metrics.json")


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
    """The records of a predictions JSONL (to re-score it with :func:`score`)."""
    with Path(path).open(encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]
