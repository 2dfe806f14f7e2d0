"""What a logging window reports: loss, throughput, FLOPs and MFU, skipped records and learning rates.

The loop adds every micro-batch to a :class:`LogWindow`; at a logging step :func:`window_metrics` sums the
windows of all ranks (one gather) and turns them into the metrics that go to Ray Train, MLflow and the
terminal. The loss is kept on the device, weighted by the micro-batch's supervised tokens, so it is read
once per window rather than once per micro-batch; everything else is known on the host, FLOPs included:
:class:`~owl2.plan.flops.FlopModel` counts each batch from its rows' real text tokens and images.

``mfu`` is model FLOPs per second over all workers divided by their peak (``resources.peak_tflops``, or the
GPU table's for ``resources.gpu``), reported only when that peak is known.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from owl2.config import IGNORE_INDEX
from owl2.data.pipeline import Batch
from owl2.data.sample import SkipStats
from owl2.model.owl2 import count_labels
from owl2.plan.flops import FlopModel
from owl2.train.checkpoint import TrainState


def supervised_tokens(batch: Batch) -> int:
    """Positions whose next token is a label (the loss's denominator), counted on the host."""
    return int((batch.labels[:, 1:] != IGNORE_INDEX).sum())


def decoder_tokens(batch: Batch, tokens_per_image: int) -> int:
    """Real tokens the decoder sees: text tokens plus each image's placeholder expanded to its tokens."""
    images = len(batch.images)
    return int(batch.attention_mask.sum()) + images * (tokens_per_image - 1)


@dataclass
class LogWindow:
    """One worker's micro-batches since the last logging step."""

    loss_sum: torch.Tensor | None = None
    """Sum over micro-batches of mean loss x supervised tokens (on the device)."""
    supervised: int = 0
    micro: int = 0
    samples: int = 0
    tokens: int = 0
    images: int = 0
    model_flops: float = 0.0
    hardware_flops: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, batch: Batch, loss: torch.Tensor, flop_model: FlopModel) -> None:
        supervised = supervised_tokens(batch)
        weighted = loss.detach().double() * supervised
        self.loss_sum = weighted if self.loss_sum is None else self.loss_sum + weighted
        self.supervised += supervised
        self.micro += 1
        self.samples += len(batch.ids)
        self.tokens += decoder_tokens(batch, flop_model.tokens_per_image)
        self.images += len(batch.images)
        # Each image is one placeholder among the row's real tokens.
        text = (batch.attention_mask.sum(dim=1) - torch.tensor(batch.image_counts, dtype=torch.long)).tolist()
        flops = flop_model.batch(text, batch.image_counts, count_labels(batch.input_ids, batch.labels))
        self.model_flops += flops.model
        self.hardware_flops += flops.hardware

    def totals(self) -> tuple[float, ...]:
        loss = float(self.loss_sum) if self.loss_sum is not None else 0.0  # the window's one device read
        counts = (self.supervised, self.micro, self.samples, self.tokens, self.images)
        return (loss, *counts, self.model_flops, self.hardware_flops)


def window_metrics(
    window: LogWindow,
    state: TrainState,
    stats: SkipStats,
    learning_rates: Sequence[float],
    groups: Sequence[dict[str, Any]],
    grad_norm: float,
    all_gather: Callable[[Any], list[Any]],
    peak_tflops: float | None = None,
) -> dict[str, float]:
    """The metrics of a logging step over every rank; also advances ``state``'s counters.

    ``peak_tflops`` is one worker's dense bf16 peak; with it the metrics carry ``mfu``.
    """
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    gathered = all_gather(window.totals())
    loss, supervised, micro, samples, tokens, images, model_flops, hardware_flops = (
        sum(values) for values in zip(*gathered, strict=True)
    )
    merged = SkipStats()
    for part in all_gather(stats):
        merged.merge(part)
    state.samples += int(samples)
    state.tokens += int(tokens)
    state.images += int(images)
    state.skipped = dict(merged.skipped)
    state.records_seen = merged.seen
    metrics = {
        "step": state.step,
        "loss": loss / supervised if supervised else float("nan"),
        "grad_norm": grad_norm,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "images_per_s": images / elapsed,
        "model_flops_per_s": model_flops / elapsed,
        "hardware_flops_per_s": hardware_flops / elapsed,
        "samples": state.samples,
        "nonfinite_steps": state.nonfinite_steps,
        "records_seen": merged.seen,
        "records_skipped": sum(merged.skipped.values()),
    }
    if peak_tflops:
        metrics["mfu"] = metrics["model_flops_per_s"] / (peak_tflops * 1e12 * len(gathered))
    metrics.update({f"skipped/{reason}": count for reason, count in merged.skipped.items()})
    for group, rate in zip(groups, learning_rates, strict=True):
        metrics[f"lr/{group['name']}"] = rate
    return metrics
