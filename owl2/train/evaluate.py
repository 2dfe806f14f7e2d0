"""Benchmark scores during training: a stage's ``eval`` suite, answered by generation at checkpoint steps.

The rank-0 worker runs it on the bare model (inside DDP) between the optimizer step and the checkpoint;
the other workers go on and wait in the checkpoint's first collective. Everything but the loop itself is
:mod:`owl2.eval`'s: the :class:`~owl2.eval.suite.Suite` (items, chance levels, scoring, table, artifacts),
prompts, image loading and generation, as ``owl2 eval`` uses them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from owl2.config import StageConfig
from owl2.eval.benchmarks import EvalItem
from owl2.eval.generate import ModelSource, generate_items, prediction_record, write_predictions
from owl2.eval.suite import Row, Suite

METRIC_PREFIX = "eval/"


@dataclass
class EvalOutcome:
    """One evaluation of ``suite``: ``metrics`` are named ``eval/<suite metric>`` and include ``eval/time_s``."""

    step: int
    metrics: dict[str, float]
    rows: list[Row]
    records: list[dict[str, Any]]
    headline: str
    suite: Suite

    def write_predictions(self, path: str | Path) -> Path:
        """The predictions as ``owl2 eval`` writes them (one JSON record per line; ``runner.read_predictions``)."""
        return write_predictions(self.records, path)

    def table(self, title: str = "") -> str:
        return self.suite.table(self.rows, title)


def eval_due(stage: StageConfig, step: int) -> bool:
    """Whether the checkpoint of ``step`` evaluates: with an eval section, multiples of ``eval.every`` and always
    the stage's last step. Every rank can ask: the others wait for rank 0's evaluation."""
    if stage.eval is None:
        return False
    every = stage.eval.every
    return step == stage.max_steps or every is None or step % every == 0


class CheckpointEval:
    """A stage's ``eval`` section: which steps evaluate, the suite's items (read once) and one evaluation."""

    def __init__(self, stage: StageConfig) -> None:
        if stage.eval is None:
            raise ValueError("the stage has no eval section")
        self.stage = stage
        self.config = stage.eval
        # What inference needs besides the weights, as ``owl2 eval`` describes a checkpoint this stage writes.
        self.source = ModelSource(
            checkpoint="",
            tokenizer=stage.data.tokenizer,
            template=stage.data.template,
            image_token_at_front=True,
            resize=stage.data.resize,
        )
        self._suite: Suite | None = None
        self._tokenizer: Any = None

    def due(self, step: int) -> bool:
        """Whether the checkpoint of ``step`` evaluates (:func:`eval_due`)."""
        return eval_due(self.stage, step)

    def suite(self) -> Suite:
        """The suite on its first ``limit`` items (per split), read on first use; local images must exist."""
        if self._suite is None:
            config = self.config
            self._suite = Suite.load(
                config.suite, config.data, image_root=config.image_root, limit=config.limit, source=self.source
            )
        return self._suite

    def items(self) -> list[EvalItem]:
        """The suite's items (loading it: the trainer calls this to check a suite before workers start)."""
        return self.suite().items

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from owl2.data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.stage.data.tokenizer)
        return self._tokenizer

    def run(self, model: torch.nn.Module, step: int, dtype: torch.dtype = torch.float32) -> EvalOutcome:
        """Answer and score the suite with ``model`` (the bare model, not its DDP wrapper) in eval mode under
        ``no_grad`` (bf16 autocast when ``dtype`` is bfloat16, as training computes), eagerly even where the stage
        compiled the layers; its mode is restored."""
        suite, tokenizer = self.suite(), self.tokenizer()
        items = suite.items
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with (
                torch.no_grad(),
                torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16),
                # Layers the stage compiled run eagerly here: with the KV cache they would compile again per layer
                # and per length, up to Dynamo's limit of graphs per forward, and a kind of training batch not seen
                # yet would then run uncompiled.
                torch.compiler.set_stance("force_eager"),
            ):
                replies = generate_items(
                    model,
                    tokenizer,
                    items,
                    self.config.batch_size,
                    chat_template=self.stage.data.template,
                    image_token_at_front=True,
                    resize=self.stage.data.resize,
                    image_size=self.stage.image_size,
                )
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        records = [prediction_record(item, reply) for item, reply in zip(items, replies, strict=True)]
        rows = suite.score(records)
        metrics = {METRIC_PREFIX + row.metric: row.value for row in rows}
        metrics[METRIC_PREFIX + "time_s"] = seconds
        return EvalOutcome(step, metrics, rows, records, self._headline(rows, step, len(items), seconds), suite)

    def _headline(self, rows: list[Row], step: int, count: int, seconds: float) -> str:
        """The first metric of each kind of item (e.g. VQA accuracy, caption CIDEr), with chance where known."""
        suite = self.config.suite
        first: dict[str, Row] = {}
        for row in rows:
            parts = row.metric.split("/")
            first.setdefault(parts[1] if suite == "shapes" and len(parts) > 2 else parts[0], row)
        shown = [
            f"{row.metric} {row.value:.4f}" + (f" (chance {row.chance:.4f})" if row.chance is not None else "")
            for row in first.values()
        ]
        scores = "  ".join(shown) if shown else "no reference answers"
        return f"eval {suite} step {step}: {scores}  [{count} items, {seconds:.1f}s]"


def log_outcome(tracker: Any, run_id: str, outcome: EvalOutcome, suite: str) -> None:
    """The predictions JSONL, the table and the rows as artifacts of the stage's run, under ``eval/step_<n>/``
    (the metrics go with the step's report)."""
    import tempfile

    folder = f"eval/step_{outcome.step:06d}"
    with tempfile.TemporaryDirectory() as scratch:
        path = outcome.write_predictions(Path(scratch) / f"{suite}_predictions.jsonl")
        outcome.suite.log(tracker, run_id, path, outcome.rows, folder, title=f"{suite} at step {outcome.step}")
