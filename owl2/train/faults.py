"""Fault injection for tests: the one seam through which a test makes a training worker die.

A test writes a fault plan next to the runs (``write_plan(storage_path, [Fault(...)])``); each worker reads
it once when its stage starts and calls :meth:`FaultPlan.fire` at named points of the loop (:data:`POINTS`). A
fault fires once: it leaves a marker file, so the restarted worker goes on. Without a plan file nothing happens,
and no production signature carries anything for tests.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

PLAN_FILE = "owl2-faults.json"
POINTS = ("mid_step", "during_eval", "during_save", "after_checkpoint", "after_report")
"""Where a worker can die, in the order a step passes them (``step`` is the step in progress, counted as it
will be once done):

* ``mid_step``: right after the step's last micro-batch was taken from the data stream: the earlier
  micro-batches' forward and backward are done, the step's data is consumed, the update is not;
* ``during_eval``: at a checkpoint that evaluates, rank 0 after its evaluation and before its scores are
  reported; the other ranks at the same point of the loop, while rank 0 evaluates;
* ``during_save``: after the checkpoint's gathers and rank 0's write into its scratch folder, before
  ``ray.train.report`` hands the checkpoint to Ray Train;
* ``after_checkpoint``: after the checkpoint's report returned;
* ``after_report``: after the report of a logging step that does not checkpoint returned.
"""

T = TypeVar("T")


@dataclass(frozen=True)
class Fault:
    run: str
    """The ``TorchTrainer`` run it applies to, ``<experiment>-<stage>``."""
    step: int
    marker: str
    """File created when the fault fires; while it exists the fault is spent."""
    point: str = "after_checkpoint"
    rank: int = 0
    delay_s: float = 2.0
    """Wait before dying, e.g. for the controller to register the checkpoint just reported."""


@dataclass
class FaultPlan:
    faults: list[Fault] = field(default_factory=list)

    @classmethod
    def load(cls, storage_path: str, run: str) -> FaultPlan:
        """The faults for ``run`` (none when ``storage_path`` is remote or holds no plan)."""
        path = Path(storage_path) / PLAN_FILE
        if "://" in storage_path or not path.is_file():
            return cls()
        faults = [Fault(**entry) for entry in json.loads(path.read_text())]
        return cls([fault for fault in faults if fault.run == run])

    def due(self, point: str, step: int, rank: int) -> Fault | None:
        """The unspent fault planned at ``point`` of ``step`` on ``rank``, if any."""
        for fault in self.faults:
            if (fault.point, fault.step, fault.rank) == (point, step, rank) and not os.path.exists(fault.marker):
                return fault
        return None

    def fire(self, point: str, step: int, rank: int) -> None:
        """Die here, as a worker killed by the OS would, if a fault is due at this point."""
        fault = self.due(point, step, rank)
        if fault is not None:
            Path(fault.marker).touch()
            time.sleep(fault.delay_s)
            os._exit(1)

    def mid_step(self, take: Callable[[], T], step: int, rank: int, micro_batches: int) -> Callable[[], T]:
        """``take`` (the data stream's next batch) for the ``micro_batches`` batches of ``step``, firing
        ``mid_step`` right after the last one is taken; ``take`` itself when no such fault is due."""
        if self.due("mid_step", step, rank) is None:
            return take
        taken = 0

        def take_then_fire() -> T:
            nonlocal taken
            batch = take()
            taken += 1
            if taken == micro_batches:
                self.fire("mid_step", step, rank)
            return batch

        return take_then_fire


def write_plan(storage_path: str | Path, faults: list[Fault]) -> Path:
    """Test side: the faults every worker under ``storage_path`` will find."""
    unknown = [fault.point for fault in faults if fault.point not in POINTS]
    if unknown:
        raise ValueError(f"unknown fault point(s) {unknown}; choose from {list(POINTS)}")
    path = Path(storage_path) / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(fault) for fault in faults]))
    return path
