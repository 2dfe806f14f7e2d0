"""``owl2 data stats``: run a dataset through the real pipeline and summarise it, before any GPU hour is spent."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from owl2.config import IMAGE_TOKEN_INDEX, DataConfig
from owl2.data.packing import padding_efficiency
from owl2.data.pipeline import encoded
from owl2.data.sample import SKIP_REASONS, SkipStats


def dataset_stats(
    config: DataConfig, tokens_per_image: int, micro_batch_size: int = 8, batch_size: int = 256
) -> dict[str, Any]:
    """Counts (total, ok, skipped by reason with examples and what each reason means), token-length percentiles,
    images per sample, and the padding efficiency of training micro-batches with and without packing.

    Every record goes through the training pipeline (tokenisation, truncation, image decoding), so a
    dataset that passes here will not surprise a training run. Lengths are in decoder tokens, each image
    counting ``tokens_per_image``. The padding efficiency (real decoder tokens over those run) takes the records
    in the order of one worker's first epoch, ``micro_batch_size`` at a time as the collator gets them (bad ones
    dropped): ``padded`` one sample a row, ``packed`` as ``data.packing`` packs them into ``max_length``.
    """
    skips = SkipStats(max_fraction=1.0)
    lengths: list[int] = []
    micro_batches: list[list[int]] = [[]]
    records = 0
    images_per_sample: Counter[int] = Counter()
    per_source: Counter[str] = Counter()
    for batch in encoded(config, tokens_per_image).iter_batches(batch_size=batch_size, batch_format="numpy"):
        for i, error in enumerate(batch["error"]):
            skips.add(error, str(batch["detail"][i]))
            if records and records % micro_batch_size == 0:
                micro_batches.append([])
            records += 1
            if error:
                continue
            ids = batch["input_ids"][i]
            num_images = int((np.asarray(ids) == IMAGE_TOKEN_INDEX).sum())
            lengths.append(len(ids) + num_images * (tokens_per_image - 1))
            micro_batches[-1].append(lengths[-1])
            images_per_sample[num_images] += 1
            per_source[str(batch["source"][i])] += 1
    summary = skips.as_dict()
    summary["skip_examples"] = {reason: examples for reason, examples in sorted(skips.examples.items())}
    summary["skip_reasons"] = {reason: SKIP_REASONS[reason] for reason in sorted(skips.skipped)}
    summary["skipped_fraction"] = round(skips.skipped_fraction, 6)
    summary["token_length"] = _percentiles(lengths)
    summary["images_per_sample"] = {str(n): count for n, count in sorted(images_per_sample.items())}
    summary["ok_by_source"] = dict(sorted(per_source.items()))
    summary["max_length"] = config.max_length
    summary["tokens_per_image"] = tokens_per_image
    summary["micro_batch_size"] = micro_batch_size
    summary["padding_efficiency"] = padding_efficiency(micro_batches, config.max_length)
    return summary


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    result = {f"p{q}": float(np.percentile(array, q)) for q in (50, 90, 95, 99)}
    return {"min": int(array.min()), **result, "max": int(array.max()), "mean": round(float(array.mean()), 2)}
