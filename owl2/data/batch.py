"""The consumer side of the pipeline, in the training process: padded :class:`Batch` es of good rows.

:func:`iterate` turns a worker's Ray Data stream (``pipeline.encoded``) into batches: the :class:`Collator`
drops and counts bad rows, packs the rest into rows with ``data.packing`` (in order, within the batch) and
right-pads the rows to the longest; :meth:`Batch.to` moves a batch to the device and normalises its pixels
there. Kept apart from ``pipeline.py`` because this side needs torch, and the Ray
Data workers that run the pipeline's steps then do not import it (seconds per fresh worker process).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.data
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from owl2.config import IGNORE_INDEX, DataConfig
from owl2.data import images as image_ops
from owl2.data.packing import rows_of
from owl2.data.pipeline import EPOCH, ORDER_KEY
from owl2.data.sample import SkipStats
from owl2.model.layout import RowLayout


@dataclass
class Batch:
    """A padded training batch (right padding), plus what the model needs to route without device syncs.

    A row holds one sample, or with packing several whole samples one after another; ``ids`` and the images
    follow the samples' order either way.
    """

    input_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, L] long
    labels: torch.Tensor  # [B, L] long, -100 ignored
    images: torch.Tensor  # [N, 3, S, S] uint8, batch order then placeholder order
    image_counts: list[int]  # images per row, on the host
    ids: list[str]  # one per sample
    epoch: int  # epoch and order key of the last row (good or bad) of this batch: the resume position
    last_key: int
    skips: SkipStats = field(default_factory=SkipStats)
    layout: RowLayout | None = None
    """Each row's samples (tokens and images); None: one sample a row, read from the mask."""
    sample_ids: torch.Tensor | None = None
    """``[B, L]`` long when a row holds several samples: each token's sample within its row (0, 1, ...), trailing
    padding counted with the row's last sample."""

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = RowLayout.unpacked(self.attention_mask.sum(dim=1).tolist(), self.image_counts)

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Model keyword arguments on ``device``; pixels are normalised there.

        For a CUDA device each tensor is first copied into pinned host memory: only from there is a
        ``non_blocking`` copy asynchronous (from pageable memory the host waits for it).
        """
        pin = torch.device(device).type == "cuda"

        def moved(tensor: torch.Tensor) -> torch.Tensor:
            return (tensor.pin_memory() if pin else tensor).to(device, non_blocking=True)

        return {
            "input_ids": moved(self.input_ids),
            "attention_mask": moved(self.attention_mask),
            "labels": moved(self.labels),
            "images": image_ops.normalize(moved(self.images), dtype) if len(self.images) else None,
            "image_counts": self.image_counts,
            "layout": self.layout,
            "sample_ids": moved(self.sample_ids) if self.sample_ids is not None else None,
        }


class Collator(NumpyBatchCollateFn):
    """``collate_fn`` for ``iter_torch_batches``: drops and counts bad rows, packs the rest into rows of up to
    ``pack_length`` decoder tokens (None: one sample a row), pads to the longest row.

    Packing keeps the batch's samples in their order (:func:`~owl2.data.packing.rows_of`), so the resume position
    is untouched; each packed sample's first label is dropped, as a row's first one is (nothing predicts it).
    ``tokens_per_image`` measures the samples for packing.
    """

    def __init__(
        self, pad_token_id: int, image_size: int, pack_length: int | None = None, tokens_per_image: int = 0
    ) -> None:
        if pack_length is not None and tokens_per_image < 1:
            raise ValueError(f"packing needs the decoder tokens per image, got tokens_per_image={tokens_per_image}")
        self.pad_token_id = pad_token_id
        self.image_size = image_size
        self.pack_length = pack_length
        self.tokens_per_image = tokens_per_image

    @classmethod
    def of(cls, data: DataConfig, pad_token_id: int, tokens_per_image: int) -> Collator:
        """The collator of a data section: packing into ``data.max_length`` tokens if ``data.packing``."""
        pack_length = data.max_length if data.packing else None
        return cls(pad_token_id, data.image_size, pack_length, tokens_per_image)

    def __call__(self, batch: dict[str, np.ndarray]) -> Batch:
        skips = SkipStats()
        good = []
        for i, error in enumerate(batch["error"]):
            skips.add(error, str(batch["detail"][i]) if error else "")
            if not error:
                good.append(i)
        counts = [int(batch["num_images"][i]) for i in good]
        lengths = [len(batch["input_ids"][i]) for i in good]
        per_row = [1] * len(good)
        if self.pack_length is not None:
            expanded = [n + (self.tokens_per_image - 1) * c for n, c in zip(lengths, counts, strict=True)]
            per_row = rows_of(expanded, self.pack_length)
        layout = RowLayout(*(_split(values, per_row) for values in (lengths, counts)))
        width = max(layout.row_tokens, default=0)
        input_ids = torch.full((len(per_row), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(per_row), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(per_row), width), dtype=torch.long)
        sample_ids = torch.zeros((len(per_row), width), dtype=torch.long) if layout.packed else None
        sample = 0
        for row, row_lengths in enumerate(layout.tokens):
            start = 0
            for number, n in enumerate(row_lengths):
                i = good[sample]
                input_ids[row, start : start + n] = torch.from_numpy(np.array(batch["input_ids"][i], dtype=np.int64))
                labels[row, start : start + n] = torch.from_numpy(np.array(batch["labels"][i], dtype=np.int64))
                if sample_ids is not None:
                    labels[row, start] = IGNORE_INDEX
                    sample_ids[row, start:] = number  # the trailing padding stays with the last sample
                start += n
                sample += 1
            attention_mask[row, :start] = 1
        # One copy of each row's bytes into the batch tensor: torch.cat of uint8 tensors is ~10x slower than
        # this and runs in the consumer's process, which competes with the pipeline's workers for the CPUs.
        side = self.image_size
        images = torch.empty((sum(counts), 3, side, side), dtype=torch.uint8)
        flat, size, offset = images.numpy().reshape(-1), 3 * side * side, 0
        for i, count in zip(good, counts, strict=True):
            if count:
                data = batch["pixels"][i]  # uint8 [n, 3, S, S] from pipeline.encode, or load_images' bytes
                data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.ravel(data)
                if data.size != count * size:
                    raise ValueError(f"{batch['id'][i]}: {data.size} pixel bytes for {count} images of {side}px")
                flat[offset * size : (offset + count) * size] = data
                offset += count
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            images=images,
            image_counts=layout.image_counts,
            ids=[str(batch["id"][i]) for i in good],
            epoch=int(batch[EPOCH][-1]) if len(batch[EPOCH]) else -1,
            last_key=int(batch[ORDER_KEY][-1]) if len(batch[ORDER_KEY]) else -1,
            skips=skips,
            layout=layout,
            sample_ids=sample_ids,
        )


def _split(values: list[int], per_row: list[int]) -> tuple[tuple[int, ...], ...]:
    """``values`` cut into consecutive rows of ``per_row`` entries."""
    ends = np.cumsum(per_row).tolist()
    return tuple(tuple(values[end - n : end]) for end, n in zip(ends, per_row, strict=True))


def iterate(
    dataset: ray.data.Dataset, collator: Collator, batch_size: int, stats: SkipStats, prefetch_batches: int = 2
) -> Iterator[Batch]:
    """Batches of good rows; bad rows are counted into ``stats``, which stops the run past its limit.

    Works on a ``Dataset`` or on the ``DataIterator`` Ray Train hands each worker.
    """
    # Ray runs the collate function in its prefetch thread, off the training loop's critical path.
    for batch in dataset.iter_torch_batches(
        batch_size=batch_size, collate_fn=collator, prefetch_batches=prefetch_batches
    ):
        stats.merge(batch.skips)
        stats.check()
        if batch.ids:
            yield batch
