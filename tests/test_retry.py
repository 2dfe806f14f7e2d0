"""The driver's restart decisions (owl2.train.retry), on the exceptions Ray Train hands back, without a cluster."""

from __future__ import annotations

import json

import pytest
from ray.exceptions import ActorDiedError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2.api.exceptions import WorkerGroupError

from owl2.data.sample import TooManyBadRecords
from owl2.errors import StageFailed
from owl2.folders import write_manifest
from owl2.train.retry import describe_failure, fit_with_restarts, last_checkpoint_step, unrecoverable_cause


def _failed(**by_rank: BaseException) -> WorkerGroupError:
    """A failed run as Ray Train raises it: each worker's exception wrapped with its traceback text."""
    failures = {
        int(rank[1:]): UserExceptionWithTraceback(error, f"Traceback ...\n{error!r}") for rank, error in by_rank.items()
    }
    return WorkerGroupError("worker errors", failures)


def test_unrecoverable_errors_are_found_on_any_rank():
    error = _failed(r0=ValueError("flaky"), r1=TooManyBadRecords("40 of 50 records were bad\n(missing_file x40)"))
    assert unrecoverable_cause(error) == "worker 1: 40 of 50 records were bad (missing_file x40)"
    assert unrecoverable_cause(_failed(r0=ValueError("flaky"))) is None


def test_failures_are_described_in_one_line():
    assert describe_failure(_failed(r0=ValueError("bad\nvalue"))) == "worker 0 failed: ValueError: bad value"
    lost = WorkerGroupError("lost", {1: ActorDiedError()})
    assert describe_failure(lost) == "worker 1 lost (its process or node died)"
    # Worker 0 failed in the collective it shared with worker 1, which died (as Ray reported a killed rank 1):
    # the lost worker is the cause.
    reset = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:45250: Connection reset by peer")
    both = WorkerGroupError("lost", {0: UserExceptionWithTraceback(reset, "Traceback ..."), 1: ActorDiedError()})
    assert describe_failure(both) == "worker 1 lost (its process or node died)"
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    unhealthy = WorkerGroupError("lost", {0: WorkerHealthCheckFailedError("a worker health check failed", None)})
    assert describe_failure(unhealthy) == "worker 0 lost (its process or node died)"


def test_restarts_resume_until_the_limit_and_say_so(tmp_path):
    # The newer checkpoint's weights were cut short by the crash: the workers resume from the older one.
    for minute, step in (("00", 200), ("05", 300)):
        checkpoint = tmp_path / "run-stage1" / f"checkpoint_2026-01-01_00-{minute}-00.000000"
        checkpoint.mkdir(parents=True)
        (checkpoint / "state.json").write_text(json.dumps({"stage": "stage1", "step": step}))
        (checkpoint / "model.safetensors").write_bytes(b"weights" * 100)
        write_manifest(checkpoint, step)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (checkpoint.parent / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's, beside them
    assert last_checkpoint_step(str(tmp_path), "run-stage1") == 200
    said, outcomes = [], [_failed(r0=ValueError("flaky")), _failed(r1=ValueError("again")), "done"]

    def fit():
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    assert fit_with_restarts(fit, "stage1", 2, str(tmp_path), "run-stage1", said.append) == "done"
    assert said == [
        "[stage1] worker 0 failed: ValueError: flaky: resuming from step 200 (restart 1 of 2)",
        "[stage1] worker 1 failed: ValueError: again: resuming from step 200 (restart 2 of 2)",
    ]
    outcomes[:] = [_failed(r0=ValueError("x")), _failed(r0=ValueError("y"))]
    with pytest.raises(WorkerGroupError):  # the limit reached: Ray's own error, as before
        fit_with_restarts(fit, "stage1", 1, str(tmp_path), "run-stage1", said.append)


def test_an_unrecoverable_error_is_not_retried(tmp_path):
    calls = []

    def fit():
        calls.append(1)
        raise _failed(r0=TooManyBadRecords("too many bad records"))

    with pytest.raises(StageFailed, match="stage stage1 failed, not retried: worker 0: too many bad records"):
        fit_with_restarts(fit, "stage1", 3, str(tmp_path), "run-stage1", print)
    assert len(calls) == 1
