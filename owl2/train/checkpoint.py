"""Training checkpoints: weights as safetensors, optimizer/scheduler state, step and data position.

A checkpoint folder holds ``config.json`` + ``model.safetensors`` (loadable with
``Owl2ForCausalLM.from_pretrained``), ``optimizer.pt`` and ``scheduler.pt`` (plain tensors and numbers,
read back with ``weights_only=True``), ``state.json`` (stage, step, per-rank data positions, counters)
and ``experiment.yaml`` (the resolved configuration that produced it), then ``owl2_manifest.json`` last (every
file's size and sha256, the step, the format version: ``owl2.folders``). It is written into a temporary
folder that is renamed into place only when complete, so a crash never leaves half a checkpoint; a copy that
Ray Train's upload or the storage damaged is refused on load (:func:`load_training_state`, and
``from_pretrained`` through ``checkpoint_io.read_config``), and a resumed worker falls back to the newest
earlier checkpoint of its run that verifies (:func:`usable`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from owl2.errors import Unrecoverable
from owl2.folders import DamagedFolder, replacing, verify

if TYPE_CHECKING:
    from owl2.data.sample import SkipStats

logger = logging.getLogger(__name__)

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
    """Records read and records skipped by reason, every rank's together, since the stage began (across
    restarts: a resumed rank 0 carries them on)."""
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

    def record_skips(self, stats: SkipStats) -> None:
        """Keep the skip counts of every rank together (:meth:`SkipStats.total`)."""
        self.skipped = dict(stats.skipped)
        self.records_seen = stats.seen

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
    with replacing(folder, step=state.step) as staging:
        model.save_pretrained(
            staging, safe_serialization=True, state_dict=None if model_state is None else dict(model_state)
        )
        optimizer_state = optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict()
        torch.save(optimizer_state, staging / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), staging / SCHEDULER_FILE)
        (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        (staging / EXPERIMENT_FILE).write_text(experiment_yaml)
    return Path(folder)


def usable(checkpoint: Any) -> Any:
    """The ``ray.train.Checkpoint`` a resumed worker should start from: ``checkpoint`` (what Ray handed it) if it
    verifies, else the newest earlier checkpoint of the same run that does, else a one-line error.

    Ray Train keeps ``num_to_keep`` checkpoints as ``checkpoint_<local time>`` folders of the run's storage
    folder and restarts from the last one its controller registered; folders named after that one (written
    just before a crash, never registered) are not considered. Every worker lists the same folders and so
    picks the same checkpoint.
    """
    if checkpoint is None:
        return None
    problems = []
    for candidate in [checkpoint, *_earlier_siblings(checkpoint)]:
        try:
            with candidate.as_directory() as folder:
                verify(folder, shown_as=candidate.path)
        except DamagedFolder as error:
            problems.append(str(error))
            continue
        if candidate is not checkpoint:
            logger.warning("%s; resuming from the earlier %s", problems[0], candidate.path)
        return candidate
    raise DamagedFolder(
        f"no checkpoint of this run verifies, so it cannot resume (and will not start afresh): {'; '.join(problems)}"
    )


def _earlier_siblings(checkpoint: Any) -> list[Any]:
    """The ``checkpoint_*`` folders beside ``checkpoint`` whose names sort before its own, newest first."""
    import ray.train
    from pyarrow import fs

    parent, _, name = checkpoint.path.rstrip("/").rpartition("/")
    entries = checkpoint.filesystem.get_file_info(fs.FileSelector(parent))
    names = sorted(
        (entry.base_name for entry in entries if entry.type == fs.FileType.Directory),
        reverse=True,
    )
    return [
        ray.train.Checkpoint(f"{parent}/{other}", filesystem=checkpoint.filesystem)
        for other in names
        if other.startswith("checkpoint_") and other < name
    ]


def load_state(folder: str | Path) -> TrainState:
    return TrainState(**json.loads((Path(folder) / STATE_FILE).read_text()))


def load_training_state(
    folder: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any, model: torch.nn.Module | None = None
) -> TrainState:
    """Restore the optimizer, the scheduler and the train state; ``model`` is the wrapped model the optimizer
    belongs to (needed when it is sharded: rank 0 reads the full optimizer state and every rank keeps its shard)."""
    from owl2.train import parallel

    folder = Path(folder)
    verify(folder)
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
