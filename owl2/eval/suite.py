"""An evaluation suite: its items, the chance levels it scores against, its scoring, its table and its MLflow
artifacts, the same for ``owl2 eval`` (:mod:`owl2.eval.runner`) and evaluation during training
(:mod:`owl2.train.evaluate`).

Suites: ``shapes`` (the synthetic world's held-out VQA per question type against its chance level, caption
CIDEr, text-only exact match), and ``vqa``, ``mmbench``, ``mme``, ``captions`` on the files ``data`` names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl2.eval import benchmarks, metrics
from owl2.eval.benchmarks import EvalItem
from owl2.eval.generate import ModelSource
from owl2.tables import Column, format_table

SUITES = ("shapes", "vqa", "mmbench", "mme", "captions")

TABLE_COLUMNS = (
    Column("metric", align="<"),
    Column("value", spec=".4f", width=9),
    Column("chance", spec=".4f", width=7),
    Column("count", "n", width=6),
)
"""The printed and logged table: chance level in its own column where known."""


@dataclass
class Row:
    """One scored metric: one line of the table."""

    metric: str
    value: float
    count: int
    chance: float | None = None


@dataclass
class Suite:
    """A suite by name, with its items (empty for scoring only) and, for ``shapes``, the chance level of each
    question type (and ``text``), in the order the table follows."""

    name: str
    items: list[EvalItem] = field(default_factory=list)
    chance: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.name not in SUITES:
            raise ValueError(f"unknown suite {self.name!r}; choose one of {list(SUITES)}")

    @classmethod
    def load(
        cls,
        name: str,
        data: str | Path | None = None,
        *,
        image_root: str | Path | None = None,
        limit: int | None = None,
        source: ModelSource | None = None,
    ) -> Suite:
        """The suite's items (``limit``: the first N, of each split for ``shapes``) and chance levels.

        ``source`` finds the shapes world when ``data`` is None. Fails before any model loads when there is no
        item or local image files are missing (typically a wrong ``image_root``).
        """
        suite = cls(name)
        suite.items = _load_items(name, data, image_root, limit, source)
        if not suite.items:
            raise ValueError(f"the {name} suite has no items (data: {data})")
        _check_local_images(suite.items)
        if name == "shapes":
            suite.chance = _shapes_chance(_world_root(source, data))
        return suite

    def score(self, records: Sequence[dict[str, Any]]) -> list[Row]:
        """Table rows (metric name, value, item count, chance level) from prediction records.

        Records without reference answers (test-server splits) are not scored; the shapes suite's VQA rows
        (overall and per question type) carry chance levels.
        """
        by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in records:
            if record["answers"]:
                by_kind[record["kind"]].append(record)
        rows: list[Row] = []
        prefix = f"{self.name}/" if self.name == "shapes" else ""
        if by_kind["vqa"]:
            rows += _vqa_rows(f"{prefix}vqa", by_kind["vqa"], self.chance if self.name == "shapes" else None)
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
            rows.append(Row(f"{prefix}text/exact_match", value, len(found), (self.chance or {}).get("text")))
        return rows

    @staticmethod
    def table(rows: Sequence[Row], title: str = "") -> str:
        """The rows as an aligned text table (metric, value, chance, n), under ``title`` when given."""
        return format_table([vars(row) for row in rows], TABLE_COLUMNS, title=title)

    def log(
        self,
        tracker: Any,
        run_id: str,
        predictions: str | Path,
        rows: Sequence[Row],
        folder: str | None = None,
        title: str = "",
    ) -> None:
        """An evaluation's predictions JSONL, its table (``eval_table.txt``) and its rows (``metrics.json``) as
        artifacts of ``run_id``, under ``folder`` when given."""
        prefix = f"{folder}/" if folder else ""
        tracker.client.log_artifact(run_id, str(predictions), folder)
        tracker.log_text(run_id, self.table(rows, title) + "\n", f"{prefix}eval_table.txt")
        tracker.log_dict(run_id, {row.metric: vars(row) for row in rows}, f"{prefix}metrics.json")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _world_root(source: ModelSource | None, data: str | Path | None) -> Path:
    """The shapes world to evaluate on: ``data``, else the world whose tokenizer the checkpoint was trained with."""
    if data is not None:
        return Path(data)
    if source is not None and (Path(source.tokenizer).parent / "world.json").is_file():
        return Path(source.tokenizer).parent
    raise FileNotFoundError("the shapes suite needs --data WORLD_DIR (the checkpoint's tokenizer is not a world's)")


def _load_items(
    name: str,
    data: str | Path | None,
    image_root: str | Path | None,
    limit: int | None,
    source: ModelSource | None,
) -> list[EvalItem]:
    if name == "shapes":
        splits = benchmarks.load_shapes(_world_root(source, data), limit)
        return [item for split in ("vqa", "captions", "text") for item in splits[split]]
    if data is None:
        raise FileNotFoundError(f"the {name} suite needs --data (the benchmark's file or folder)")
    loaders: dict[str, Callable[[], list[EvalItem]]] = {
        "vqa": lambda: benchmarks.load_vqa(data, image_root, limit),
        "mmbench": lambda: benchmarks.load_mmbench(data, limit),
        "mme": lambda: benchmarks.load_mme(data, limit),
        "captions": lambda: benchmarks.load_captions(data, image_root, limit),
    }
    return loaders[name]()


def _shapes_chance(world: str | Path) -> dict[str, float]:
    """The shapes world's chance level per question type (and ``text``), in the order the table follows."""
    levels = benchmarks.load_world(world)
    order = [*levels["question_types"], *levels["chance"]]
    return {kind: levels["chance"][kind] for kind in order if kind in levels["chance"]}


def _check_local_images(items: Sequence[EvalItem]) -> None:
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
