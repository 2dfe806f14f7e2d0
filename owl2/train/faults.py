"""Fault injection for tests: the one seam through which a test makes a training worker die.

A test writes a fault plan next to the runs (``write_plan(storage_path, [Fault(...)])``); each worker reads
it once when its stage starts and calls :meth:`FaultPlan.fire` at named points of the loop. A fault fires
once: it leaves a marker file, so the restarted worker goes on. Without a plan file nothing happens, and no
production signature carries anything for tests.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLAN_FILE = "owl2-faults.json"
POINTS = ("after_checkpoint",)


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

    def fire(self, point: str, step: int, rank: int) -> None:
        """Die here, as a worker killed by the OS would, if a fault is due at this point."""
        for fault in self.faults:
            due = (fault.point, fault.step, fault.rank) == (point, step, rank)
            if due and not os.path.exists(fault.marker):
                Path(fault.marker).touch()
                time.sleep(fault.delay_s)
                os._exit(1)


def write_plan(storage_path: str | Path, faults: list[Fault]) -> Path:
    """Test side: the faults every worker under ``storage_path`` will find."""
    unknown = [fault.point for fault in faults if fault.point not in POINTS]
    if unknown:
        raise ValueError(f"unknown fault point(s) {unknown}; choose from {list(POINTS)}")
    path = Path(storage_path) / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(fault) for fault in faults]))
    return path
