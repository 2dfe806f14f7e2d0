"""Training checkpoints: weights as safetensors, optimizer/scheduler state, step and data position.

A checkpoint folder holds ``config.json`` + ``model.safetensors`` (loadable with
``Owl2ForCausalLM.from_pretrained``), ``optimizer.pt`` and ``scheduler.pt`` (plain tensors and numbers,
read back with ``weights_only=True``), ``state.json`` (stage, step, per-rank data positions, counters)
and ``experiment.yaml`` (the resolved configuration that produced it). It is written into a temporary
folder that is renamed into place only when complete, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
EXPERIMENT_FILE = "experiment.yaml"


@dataclass
class TrainState:
    """Everything besides tensors that a resumed stage needs to continue exactly."""

    stage: str
    step: int = 0
    """Optimizer steps done."""
    epochs: list[int] = field(default_factory=list)
    """Per rank: the data epoch in progress."""
    last_keys: list[int] = field(default_factory=list)
    """Per rank: order key of the last sample consumed in that epoch (-1: none yet)."""
    samples: int = 0
    tokens: int = 0
    images: int = 0
    nonfinite_steps: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    records_seen: int = 0
    resumed_at: list[int] = field(default_factory=list)
    """Steps at which this stage was resumed from a checkpoint (after a failure or a re-run)."""

    def position(self, rank: int, world_size: int) -> tuple[int, int]:
        """(epoch, last key) where ``rank`` continues; a fresh stage starts at (0, -1)."""
        if not self.last_keys:
            return 0, -1
        if len(self.last_keys) != world_size:
            raise ValueError(
                f"the checkpoint of stage {self.stage!r} was written by {len(self.last_keys)} workers; resuming "
                f"with {world_size} would repeat or skip data. Resume with resources.num_workers="
                f"{len(self.last_keys)}, or start the stage afresh under a new run name"
            )
        return self.epochs[rank], self.last_keys[rank]


def save(
    folder: str | Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    experiment_yaml: str,
) -> Path:
    """Write a complete checkpoint at ``folder`` atomically (``model`` is the unwrapped Owl2ForCausalLM)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), staging / SCHEDULER_FILE)
        (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        (staging / EXPERIMENT_FILE).write_text(experiment_yaml)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_state(folder: str | Path) -> TrainState:
    return TrainState(**json.loads((Path(folder) / STATE_FILE).read_text()))


def load_training_state(folder: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
    folder = Path(folder)
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    return load_state(folder)
