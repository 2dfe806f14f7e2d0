"""Held-out loss during training: token-weighted over all workers, on the same samples every time."""

from __future__ import annotations

import torch
import torch.distributed as dist

from owl2.config import IGNORE_INDEX, ValidationConfig
from owl2.data.batch import Batch, Collator, iterate
from owl2.data.pipeline import encoded
from owl2.data.sample import SkipStats
from owl2.model.owl2 import count_labels


class HeldOut:
    """One worker's held-out batches, read once through the data pipeline and kept in memory.

    The set is small (``max_batches`` batches), and building a Ray Data pipeline per evaluation would cost
    its start-up each time; every evaluation sees exactly the same samples.
    """

    def __init__(
        self, validation: ValidationConfig, tokens_per_image: int, pad_token_id: int, rank: int, world_size: int
    ) -> None:
        self.validation = validation
        self.tokens_per_image = tokens_per_image
        self.pad_token_id = pad_token_id
        self.rank = rank
        self.world_size = world_size
        self._batches: list[Batch] | None = None

    def batches(self) -> list[Batch]:
        if self._batches is None:
            data = self.validation.data
            dataset = encoded(data, self.tokens_per_image, epoch=0, rank=self.rank, world_size=self.world_size)
            collator = Collator.of(data, self.pad_token_id, self.tokens_per_image)
            skips = SkipStats(max_fraction=data.max_bad_fraction)
            kept: list[Batch] = []
            for batch in iterate(dataset, collator, self.validation.batch_size, skips):
                kept.append(batch)
                if len(kept) == self.validation.max_batches:
                    break
            # Every rank must run the same number of forward passes (FSDP2 gathers parameters collectively).
            if dist.is_available() and dist.is_initialized():
                counts: list[int | None] = [None] * self.world_size
                dist.all_gather_object(counts, len(kept))
                kept = kept[: min(c for c in counts if c is not None)]
            self._batches = kept
        return self._batches

    @torch.no_grad()
    def loss(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> float:
        """Mean next-token loss over every worker's held-out batches."""
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, supervised tokens
        for batch in self.batches():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                labels = count_labels(batch.input_ids, batch.labels, batch.sample_ids)
                out = model(**batch.to(device, dtype), use_cache=False, label_counts=labels)
            tokens = (out.labels[:, 1:] != IGNORE_INDEX).sum()
            totals += torch.stack([out.loss.double() * tokens, tokens.double()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        model.train(was_training)
        return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def should_validate(step: int, max_steps: int, validation: ValidationConfig | None) -> bool:
    return validation is not None and (step % validation.every == 0 or step == max_steps)
