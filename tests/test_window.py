"""The logging window: token-weighted loss over micro-batches and ranks, decoder tokens, FLOPs and MFU."""

import pytest
import torch

from owl2.config import IGNORE_INDEX, ModelConfig
from owl2.data.batch import Batch
from owl2.data.sample import SkipStats
from owl2.plan.flops import FlopModel
from owl2.train.checkpoint import TrainState
from owl2.train.window import LogWindow, window_metrics

SPEC = ModelConfig.from_preset("debug")
FLOPS = FlopModel(SPEC, ["all"], image_size=SPEC.vision.image_size)


def _batch(lengths: list[int], labelled: list[int], images: list[int]) -> Batch:
    """Right-padded rows of ``lengths`` real tokens, the last ``labelled`` of each supervised."""
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE_INDEX)
    for row, (length, count) in enumerate(zip(lengths, labelled, strict=True)):
        mask[row, :length] = 1
        labels[row, length - count : length] = 7
    side = SPEC.vision.image_size
    return Batch(
        input_ids=torch.ones_like(mask),
        attention_mask=mask,
        labels=labels,
        images=torch.zeros(sum(images), 3, side, side, dtype=torch.uint8),
        image_counts=images,
        ids=[f"r{i}" for i in range(len(lengths))],
        epoch=0,
        last_key=1,
    )


def test_loss_is_weighted_by_supervised_tokens_over_micro_batches_and_ranks() -> None:
    rank0, rank1 = LogWindow(), LogWindow()
    first, second, other = _batch([6, 4], [3, 1], [1, 0]), _batch([5], [2], [2]), _batch([8, 8], [5, 5], [1, 1])
    rank0.add(first, torch.tensor(1.0), FLOPS, [3, 1])  # 4 supervised tokens (the first position never is a target)
    rank0.add(second, torch.tensor(4.0), FLOPS, [2])  # 2
    rank1.add(other, torch.tensor(0.5), FLOPS, [5, 5])  # 10
    rank0.grad_norm = torch.tensor(0.5)
    stats = SkipStats()
    gathers = []

    def gather(value):  # rank 0's view of an all_gather over two ranks
        gathers.append(value)
        return [value, (rank1.totals()[0], SkipStats(), 3.0)]

    state = TrainState(stage="stage1", step=3)
    nonfinite = torch.tensor(2)
    metrics = window_metrics(rank0, state, stats, [1e-3], [{"name": "all"}], nonfinite, gather, 2.0, 1.5)

    assert len(gathers) == 1  # one gather per window
    assert metrics["grad_norm"] == 0.5 and metrics["nonfinite_steps"] == state.nonfinite_steps == 2
    assert metrics["peak_memory_gb"] == 3.0  # the fullest worker

    assert metrics["loss"] == pytest.approx((1.0 * 4 + 4.0 * 2 + 0.5 * 10) / 16)
    # Each image's placeholder counts as the tokens_per_image decoder tokens it becomes.
    per_image = SPEC.tokens_per_image - 1
    assert state.tokens == (10 + 5 + 16) + 5 * per_image and state.images == 5 and state.samples == 5
    # The LM head runs on the labelled positions only (hardware); the model count takes every token.
    expected = FLOPS.batch([5, 4], [1, 0], [3, 1]) + FLOPS.batch([3], [2], [2]) + FLOPS.batch([7, 7], [1, 1], [5, 5])
    elapsed = metrics["samples"] / metrics["samples_per_s"]
    assert metrics["model_flops_per_s"] * elapsed == pytest.approx(expected.model)
    assert metrics["hardware_flops_per_s"] * elapsed == pytest.approx(expected.hardware)
    assert metrics["mfu"] == pytest.approx(metrics["model_flops_per_s"] / (2.0e12 * 2))  # two workers' peak


def test_no_mfu_without_a_known_peak() -> None:
    window = LogWindow()
    window.add(_batch([4], [2], [1]), torch.tensor(2.0), FLOPS)
    metrics = window_metrics(
        window, TrainState(stage="s"), SkipStats(), [1e-3], [{"name": "all"}], torch.tensor(0), lambda v: [v]
    )
    assert (
        "mfu" not in metrics
        and "peak_memory_gb" not in metrics
        and metrics["model_flops_per_s"] > 0
        and metrics["loss"] == pytest.approx(2.0)
    )


def test_skip_counts_span_ranks_and_restarts() -> None:
    # Rank 0 resumed from a checkpoint that had counted 40 records, 3 of them bad; then each rank read more.
    resumed = TrainState(stage="stage1", step=4, skipped={"missing_file": 2, "too_long": 1}, records_seen=40)
    rank0 = SkipStats()
    rank0.carry(resumed.records_seen, resumed.skipped)
    rank0.add()
    rank0.add("missing_file", "a.png")
    rank1 = SkipStats()
    rank1.add("not_an_image", "b.png")

    def gather(value):  # rank 0's view of an all_gather over two ranks
        return [value, (LogWindow().totals()[0], rank1, None)]

    window = LogWindow()
    window.add(_batch([4], [2], [1]), torch.tensor(1.0), FLOPS, [2])
    metrics = window_metrics(window, resumed, rank0, [1e-3], [{"name": "all"}], torch.tensor(0), gather)
    assert resumed.records_seen == metrics["records_seen"] == 43
    assert resumed.skipped == {"missing_file": 3, "too_long": 1, "not_an_image": 1}
    assert metrics["records_skipped"] == 5 and metrics["skipped/missing_file"] == 3
    assert SkipStats.total([rank0, rank1]).examples == {"missing_file": ["a.png"], "not_an_image": ["b.png"]}
