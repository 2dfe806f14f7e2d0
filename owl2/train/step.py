"""One optimizer step that never waits for the device: micro-batches, backward, norm, a guarded update.

:class:`TrainStep` is the core of the loop's ``train_step``, callable without Ray (a model, its optimizer
and host batches are all it needs). The host only queues work: the loss goes into the
:class:`~owl2.train.window.LogWindow` on the device, and whether the step was finite is decided on the
device from the global gradient norm, which every rank already holds (DDP all-reduced the gradients, FSDP2
reduced the shard norms), so all ranks skip the same steps without another collective. The skip itself is
fused AdamW's ``found_inf`` (the flag :class:`torch.amp.GradScaler` sets): a flagged update leaves the
parameters and the optimizer state (``exp_avg``, ``exp_avg_sq``, ``step``) bitwise unchanged.

Skipped steps are counted on the device (:attr:`TrainStep.nonfinite`) and read at the logging window
and at checkpoints, so a run that exceeds ``stage.max_nonfinite_steps`` stops up to ``log_every`` steps
after the step that crossed the limit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from owl2.data.batch import Batch
from owl2.model.owl2 import count_labels
from owl2.plan.flops import FlopModel
from owl2.train import parallel
from owl2.train.window import LogWindow


class TrainStep:
    """Takes optimizer steps of ``accumulation`` micro-batches on ``model`` (bare or wrapped).

    ``optimizer`` must be a fused torch AdamW (:func:`~owl2.train.optim.build_optimizer`); ``dtype``
    bfloat16 runs the forwards under autocast; ``grad_clip`` 0 computes the norm without clipping.
    ``nonfinite_steps`` starts the device counter (a resumed stage's count).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        accumulation: int,
        grad_clip: float,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        nonfinite_steps: int = 0,
    ) -> None:
        if not all(group.get("fused") for group in optimizer.param_groups):
            raise ValueError(
                "TrainStep needs a fused AdamW (fused=True, as build_optimizer makes it): only it skips a step on "
                "the device (an optimizer state saved by a non-fused optimizer turns fused off when loaded)"
            )
        self.model, self.optimizer = model, optimizer
        self.accumulation, self.grad_clip = accumulation, grad_clip
        self.device, self.dtype = device, dtype
        self.nonfinite = torch.tensor(nonfinite_steps, dtype=torch.long, device=device)
        """Steps skipped so far (on the device)."""

    def run(self, next_batch: Callable[[], Batch], window: LogWindow, flop_model: FlopModel) -> None:
        """Forward and backward over ``accumulation`` batches from ``next_batch``, then the norm (clipping)
        and the update, skipped on the device when the norm is not finite. Adds every micro-batch to
        ``window`` and leaves the norm in ``window.grad_norm``."""
        self.optimizer.zero_grad(set_to_none=True)
        bf16 = self.dtype == torch.bfloat16
        for micro in range(self.accumulation):
            batch = next_batch()
            # On the host, per sample: the head runs on label positions.
            labels = count_labels(batch.input_ids, batch.labels, batch.sample_ids)
            with parallel.gradient_sync(self.model, sync=micro == self.accumulation - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                    inputs = batch.to(self.device, self.dtype)
                    loss = self.model(**inputs, use_cache=False, label_counts=labels).loss
                (loss / self.accumulation).backward()
            window.add(batch, loss, flop_model, labels)
        window.grad_norm = parallel.clip_grad_norm(self.model, self.grad_clip)
        self.guarded_update(window.grad_norm)

    def guarded_update(self, grad_norm: torch.Tensor) -> None:
        """``optimizer.step()`` unless ``grad_norm`` (a 0-d device tensor) is NaN/inf; counts a skip.

        A NaN/inf loss makes NaN gradients, so the norm covers the loss too, and it also catches an
        overflow in the backward of a finite loss.
        """
        skip = ~torch.isfinite(grad_norm)
        self.optimizer.found_inf = skip.float()  # fused AdamW: 1.0 skips the update and the step count
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        self.nonfinite += skip

    def nonfinite_steps(self) -> int:
        """The device counter read on the host: a sync, for checkpoints and the logging window only."""
        return int(self.nonfinite)
