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
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from owl2.errors import Unrecoverable

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
EXPERIMENT_FILE = "experiment.yaml"


@dataclass
class DataPass:
    """One execution of a worker's data pipeline: epochs ``first`` to ``end`` (exclusive), ``rows`` good rows
    consumed so far. The loop streams one epoch first (to count rows), then every epoch it still needs."""

    first: int = 0
    end: int = 1
    rows: int = 0


@dataclass
class DataPosition:
    """Where a worker is in its data: the epoch in progress, the order key of the last sample it consumed
    (-1: none yet in that epoch) and the pass in progress."""

    epoch: int = 0
    last_key: int = -1
    current: DataPass = field(default_factory=DataPass)


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
    passes: list[list[int]] = field(default_factory=list)
    """Per rank: the pipeline pass in progress, ``[first epoch, end epoch, good rows consumed]``. A resumed run
    finishes that pass, so its batches and the size of its next pass are the uninterrupted run's."""
    samples: int = 0
    tokens: int = 0
    images: int = 0
    nonfinite_steps: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    records_seen: int = 0
    resumed_at: list[int] = field(default_factory=list)
    """Steps at which this stage was resumed from a checkpoint (after a failure or a re-run)."""

    def position(self, rank: int, world_size: int) -> DataPosition:
        """Where ``rank`` continues; a fresh stage starts at epoch 0 before its first key, in pass [0, 1)."""
        if not self.last_keys:
            return DataPosition()
        if len(self.last_keys) != world_size:
            raise Unrecoverable(
                f"the checkpoint of stage {self.stage!r} was written by {len(self.last_keys)} workers; resuming "
                f"with {world_size} would repeat or skip data. Resume with resources.num_workers="
                f"{len(self.last_keys)}, or start the stage afresh under a new run name"
            )
        epoch = self.epochs[rank]
        # Checkpoints from before passes: the rest of the epoch in progress is a pass of its own.
        current = DataPass(*self.passes[rank]) if self.passes else DataPass(epoch, epoch + 1, 0)
        return DataPosition(epoch, self.last_keys[rank], current)

    def record_positions(self, positions: list[DataPosition]) -> None:
        """Keep every rank's position (gathered in rank order) for the checkpoint."""
        self.epochs = [p.epoch for p in positions]
        self.last_keys = [p.last_key for p in positions]
        self.passes = [[p.current.first, p.current.end, p.current.rows] for p in positions]


def save(
    folder: str | Path,
    model: Any,
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    scheduler: Any,
    state: TrainState,
    experiment_yaml: str,
    model_state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint at ``folder`` atomically (``model`` is the unwrapped Owl2ForCausalLM).

    ``optimizer`` may be given as its state dict and ``model_state`` replaces the model's own state dict: a
    sharded (FSDP2) run passes the full states that ``owl2.train.parallel`` gathered to rank 0.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(
            staging, safe_serialization=True, state_dict=None if model_state is None else dict(model_state)
        )
        optimizer_state = optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict()
        torch.save(optimizer_state, staging / OPTIMIZER_FILE)
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


def load_training_state(
    folder: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any, model: torch.nn.Module | None = None
) -> TrainState:
    """Restore the optimizer, the scheduler and the train state; ``model`` is the wrapped model the optimizer
    belongs to (needed when it is sharded: rank 0 reads the full optimizer state and every rank keeps its shard)."""
    from owl2.train import parallel

    folder = Path(folder)
    optimizer_state = None
    if model is None or parallel.reads_full_state(model):
        optimizer_state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    parallel.load_optimizer_state(model, optimizer, optimizer_state)
    scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    return load_state(folder)


def _state_tensors(model_state: Mapping[str, Any], optimizer_state: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(label, value)`` of the model's entries, then of the optimizer's per-parameter state in torch's layout."""
    names = {}
    for group in optimizer_state.get("param_groups", []):
        names.update(zip(group["params"], group.get("param_names", group["params"]), strict=True))
    labelled = [(f"model weight {name}", value) for name, value in model_state.items()]
    for key, fields in optimizer_state.get("state", {}).items():
        labelled += [(f"optimizer {field} of {names.get(key, key)}", value) for field, value in fields.items()]
    return labelled


def check_finite(model_state: Mapping[str, Any], optimizer_state: Mapping[str, Any]) -> None:
    """Refuse to write a checkpoint that holds a NaN or an infinity: raises :class:`FloatingPointError`
    naming the first such tensor (the model's first, then the optimizer state's). One device read per
    device, not one per tensor; call it where the full states are (rank 0)."""
    tensors = [
        (label, value)
        for label, value in _state_tensors(model_state, optimizer_state)
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    ]
    by_device: dict[torch.device, list[int]] = {}
    for index, (_, tensor) in enumerate(tensors):
        by_device.setdefault(tensor.device, []).append(index)
    bad = []
    for indices in by_device.values():
        finite = torch.stack([torch.isfinite(tensors[i][1]).all() for i in indices]).tolist()
        bad += [index for index, ok in zip(indices, finite, strict=True) if not ok]
    if bad:
        raise FloatingPointError(f"refusing to write a checkpoint: {tensors[min(bad)][0]} holds NaN/inf values")
