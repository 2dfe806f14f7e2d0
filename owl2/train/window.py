"""What a logging window reports: loss, throughput, FLOPs and MFU, skipped records and learning rates.

The loop adds every micro-batch to a :class:`LogWindow`; at a logging step :func:`window_metrics` sums the
windows of all ranks (one gather) and turns them into the metrics that go to Ray Train, MLflow and the
terminal. The loss (weighted by the micro-batch's supervised tokens), the last gradient norm and the count
of skipped steps stay on the device and are read together once per window, never per step; everything else
is counted from the host batches, FLOPs included: :class:`~owl2.plan.flops.FlopModel` counts each batch from
its rows' real text tokens and images.

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
from owl2.data.batch import Batch
from owl2.data.sample import SkipStats
from owl2.plan.flops import FlopModel
from owl2.train.checkpoint import TrainState


def supervised_tokens(batch: Batch) -> int:
    """Positions whose next token is a label (the loss's denominator), counted on the host batch."""
    return (batch.labels[:, 1:] != IGNORE_INDEX).sum().tolist()  # tolist: a host read, no scalar op to dispatch


def decoder_tokens(batch: Batch, tokens_per_image: int) -> int:
    """Real tokens the decoder sees: text tokens plus each image's placeholder expanded to its tokens."""
    return sum(batch.attention_mask.sum(dim=1).tolist()) + len(batch.images) * (tokens_per_image - 1)


@dataclass
class LogWindow:
    """One worker's micro-batches since the last logging step.

    The loss and the last step's gradient norm stay on ``device``; the counts come from the host batches.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    loss_sum: torch.Tensor = field(init=False)
    """Sum over micro-batches of mean loss x supervised tokens (float64, on the device)."""
    grad_norm: torch.Tensor = field(init=False)
    """The last step's global gradient norm before clipping (on the device; NaN before the first step)."""
    supervised: int = 0
    micro: int = 0
    samples: int = 0
    tokens: int = 0
    images: int = 0
    model_flops: float = 0.0
    hardware_flops: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.grad_norm = torch.full((), float("nan"), device=self.device)

    def add(self, batch: Batch, loss: torch.Tensor, flop_model: FlopModel, labels: list[int] | None = None) -> None:
        """Count a micro-batch (``batch`` on the host, ``loss`` its mean loss on the device); never reads it.
        ``labels``: label positions per sample, where the LM head ran (None: every position)."""
        supervised = supervised_tokens(batch)
        self.loss_sum = self.loss_sum + loss.detach().double() * supervised
        self.supervised += supervised
        self.micro += 1
        self.samples += len(batch.ids)
        self.tokens += decoder_tokens(batch, flop_model.tokens_per_image)
        self.images += len(batch.images)
        # Per sample, packed or not (attention stays within a sample); each image is one placeholder among its
        # sample's tokens.
        layout = batch.layout
        images = [count for row in layout.images for count in row]
        text = [length - count for length, count in zip((n for row in layout.tokens for n in row), images, strict=True)]
        flops = flop_model.batch(text, images, labels)
        self.model_flops += flops.model
        self.hardware_flops += flops.hardware

    def totals(self, *device_values: torch.Tensor) -> tuple[tuple[float, ...], list[float]]:
        """The window's sums (the loss sum first), and the last step's grad norm followed by
        ``device_values`` (0-d tensors on the window's device), all read in one device->host copy: the
        window's only host sync."""
        stacked = torch.stack([self.loss_sum, self.grad_norm, *device_values])  # promoted to float64
        loss, *values = stacked.to("cpu", copy=True).tolist()  # copy=True: a real copy on a CPU run as well
        counts = (self.supervised, self.micro, self.samples, self.tokens, self.images)
        return (loss, *counts, self.model_flops, self.hardware_flops), values


def window_metrics(
    window: LogWindow,
    state: TrainState,
    stats: SkipStats,
    learning_rates: Sequence[float],
    groups: Sequence[dict[str, Any]],
    nonfinite_steps: torch.Tensor,
    all_gather: Callable[[Any], list[Any]],
    peak_tflops: float | None = None,
    peak_memory_gb: float | None = None,
) -> dict[str, float]:
    """The metrics of a logging step over every rank; also advances ``state``'s counters.

    ``nonfinite_steps`` is the stage's device counter of skipped steps (the same on every rank); it is read
    with the window's own values and copied to ``state.nonfinite_steps``. One device read and one gather.
    ``peak_tflops`` is one worker's dense bf16 peak; with it the metrics carry ``mfu``. ``peak_memory_gb``
    (this worker's) becomes the fullest worker's ``peak_memory_gb``.
    """
    totals, (grad_norm, nonfinite) = window.totals(nonfinite_steps)
    # After the read: the host runs ahead of the device, which has now finished the window's work.
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    gathered = all_gather((totals, stats, peak_memory_gb))
    loss, supervised, micro, samples, tokens, images, model_flops, hardware_flops = (
        sum(values) for values in zip(*(part[0] for part in gathered), strict=True)
    )
    merged = SkipStats.total(part for _, part, _ in gathered)
    state.samples += int(samples)
    state.tokens += int(tokens)
    state.images += int(images)
    state.nonfinite_steps = int(nonfinite)
    state.record_skips(merged)
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
    peaks = [peak for _, _, peak in gathered if peak is not None]
    if peaks:
        metrics["peak_memory_gb"] = max(peaks)  # the fullest worker
    metrics.update({f"skipped/{reason}": count for reason, count in merged.skipped.items()})
    for group, rate in zip(groups, learning_rates, strict=True):
        metrics[f"lr/{group['name']}"] = rate
    return metrics
