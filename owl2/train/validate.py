"""Held-out loss during training: token-weighted over all workers, on the same samples every time."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from owl2.config import IGNORE_INDEX, ValidationConfig
from owl2.data.pipeline import Collator, encoded, iterate
from owl2.data.sample import SkipStats


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    validation: ValidationConfig,
    tokens_per_image: int,
    pad_token_id: int,
    rank: int,
    world_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """Mean next-token loss over the first ``max_batches`` batches of each worker's held-out shard."""
    was_training = model.training
    model.eval()
    collator = Collator(pad_token_id=pad_token_id, image_size=validation.data.image_size)
    dataset = encoded(validation.data, tokens_per_image, epoch=0, rank=rank, world_size=world_size)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, supervised tokens
    skips = SkipStats(max_fraction=validation.data.max_bad_fraction)
    for index, batch in enumerate(iterate(dataset, collator, validation.batch_size, skips)):
        if index == validation.max_batches:
            break
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(**batch.to(device, dtype), use_cache=False)
        tokens = (out.labels[:, 1:] != IGNORE_INDEX).sum()
        totals += torch.stack([out.loss.double() * tokens, tokens.double()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


def should_validate(step: int, max_steps: int, validation: ValidationConfig | None) -> bool:
    return validation is not None and (step % validation.every == 0 or step == max_steps)


def merge_metrics(metrics: dict[str, Any] | None, step: int, val_loss: float | None) -> dict[str, Any] | None:
    """Add ``val_loss`` to this step's metrics (creating them if the step had none)."""
    if val_loss is None:
        return metrics
    return {**(metrics or {"step": step}), "val_loss": val_loss}
