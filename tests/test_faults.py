"""The fault plan (owl2.train.faults) without Ray: which fault fires where, once. The faults firing inside real
training runs, and the resumes after them, are test_train.py's."""

from __future__ import annotations

import pytest

from owl2.train import faults
from owl2.train.faults import Fault, FaultPlan, write_plan


class Died(Exception):
    """Raised in place of ``os._exit``: the worker would have died here."""


@pytest.fixture
def dies(monkeypatch):
    def exit_(status):
        raise Died(status)

    monkeypatch.setattr(faults.os, "_exit", exit_)


def test_a_run_reads_only_its_own_faults_and_unknown_points_are_refused(tmp_path):
    mine = Fault("exp-stage1", 3, str(tmp_path / "a"), "mid_step", rank=1, delay_s=0)
    other = Fault("exp-stage2", 3, str(tmp_path / "b"), "mid_step", delay_s=0)
    write_plan(tmp_path, [mine, other])
    assert FaultPlan.load(str(tmp_path), "exp-stage1").faults == [mine]
    assert FaultPlan.load(str(tmp_path / "elsewhere"), "exp-stage1").faults == []
    assert FaultPlan.load("s3://bucket/runs", "exp-stage1").faults == []
    with pytest.raises(ValueError, match=r"unknown fault point\(s\) \['mid_stpe'\]; choose from \['mid_step', "):
        write_plan(tmp_path, [Fault("exp-stage1", 3, str(tmp_path / "c"), "mid_stpe")])


def test_a_fault_fires_only_at_its_point_step_and_rank_and_only_once(tmp_path, dies):
    plan = FaultPlan(
        [
            Fault("run", 4, str(tmp_path / "save-4"), "during_save", rank=1, delay_s=0),
            Fault("run", 5, str(tmp_path / "report-5"), "after_report", rank=0, delay_s=0),
        ]
    )
    for point, step, rank in [("during_save", 4, 0), ("during_save", 5, 1), ("after_checkpoint", 4, 1)]:
        plan.fire(point, step, rank)  # nothing planned there: goes on
    with pytest.raises(Died):
        plan.fire("during_save", 4, 1)
    assert (tmp_path / "save-4").exists() and not (tmp_path / "report-5").exists()
    plan.fire("during_save", 4, 1)  # spent: the restarted worker passes
    assert plan.due("during_save", 4, 1) is None and plan.due("after_report", 5, 0) is plan.faults[1]


def test_mid_step_fires_after_the_steps_last_micro_batch_is_taken(tmp_path, dies):
    batches = iter(range(10))
    plan = FaultPlan([Fault("run", 2, str(tmp_path / "mid-2"), "mid_step", delay_s=0)])
    take = batches.__next__
    assert plan.mid_step(take, 1, 0, 3) is take and plan.mid_step(take, 2, 1, 3) is take  # not due: the stream
    wrapped = plan.mid_step(take, 2, 0, 3)
    assert [wrapped(), wrapped()] == [0, 1]
    with pytest.raises(Died):
        wrapped()
    assert next(batches) == 3  # the third micro-batch was taken before the worker died
    assert plan.mid_step(take, 2, 0, 3) is take
