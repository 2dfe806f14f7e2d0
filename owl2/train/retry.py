"""The driver's restarts of a stage: resume after a lost worker or node, end at once when a restart cannot help.

Ray Train's own ``FailureConfig(max_failures=N)`` restarts the worker group after any worker error, so bad data
beyond the limit or the NaN limit would be replayed ``N`` times (and again for every Tune trial retry) before the
run fails, with the cause buried in tracebacks. The driver therefore runs each stage with Ray's retries off and
restarts it itself: a re-run of the same ``TorchTrainer`` run name resumes from its last checkpoint, an error
marked :class:`~owl2.errors.Unrecoverable` ends the stage with one line, and every restart is said in the terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from owl2.errors import StageFailed, Unrecoverable


def worker_errors(error: BaseException) -> dict[int, BaseException]:
    """The exceptions the workers raised, by rank (Ray wraps each one to carry its traceback string)."""
    failures = getattr(error, "worker_failures", None) or {}
    return {rank: getattr(failure, "_base_exc", failure) for rank, failure in failures.items()}


def unrecoverable_cause(error: BaseException) -> str | None:
    """One line naming the first :class:`Unrecoverable` worker error inside a failed run, or None."""
    for rank, failure in sorted(worker_errors(error).items()):
        if isinstance(failure, Unrecoverable):
            return f"worker {rank}: " + " ".join(str(failure).split())
    return None


# How Ray reports a worker whose process or node died (a health check of a dead actor fails first).
LOST = (
    "ActorDiedError",
    "ActorUnavailableError",
    "RayActorError",
    "WorkerCrashedError",
    "WorkerHealthCheckFailedError",
)


def describe_failure(error: BaseException) -> str:
    """``worker 1 lost (its process or node died)`` or ``worker 0 failed: ValueError: ...``, in one line.

    A lost worker is named before the others: when a worker dies, the others fail too, in the collective they were
    waiting in with it (gloo: ``Connection reset by peer``), and Ray may report both."""
    errors = worker_errors(error)
    if not errors:
        return " ".join(str(error).split())[:300]
    lost = sorted(rank for rank, failure in errors.items() if type(failure).__name__ in LOST)
    if lost:
        return f"worker {lost[0]} lost (its process or node died)"
    rank, failure = sorted(errors.items())[0]
    return f"worker {rank} failed: {type(failure).__name__}: " + " ".join(str(failure).split())[:300]


def last_checkpoint_step(storage_path: str, run_name: str) -> int | None:
    """The step of the run's newest complete local checkpoint (None for none, or storage that is not a local
    folder): a folder cut short by the crash, or damaged since, is passed over as the workers will pass it."""
    from owl2.folders import DamagedFolder, looks_complete
    from owl2.train.checkpoint import load_state

    if "://" in storage_path:
        return None
    # Ray Train keeps checkpoint_manager_snapshot.json beside the checkpoint_<time> folders.
    folders = [path for path in Path(storage_path, run_name).glob("checkpoint_*") if path.is_dir()]
    for folder in sorted(folders, reverse=True):
        try:
            looks_complete(folder)
        except DamagedFolder:
            continue
        return load_state(folder).step
    return None


def fit_with_restarts(
    fit: Callable[[], Any], stage: str, max_failures: int, storage_path: str, run_name: str, say: Callable[[str], None]
) -> Any:
    """``fit()`` (a ``TorchTrainer`` run with Ray's retries off) until it succeeds, resuming up to ``max_failures``
    times; an :class:`Unrecoverable` worker error raises :class:`StageFailed` at once."""
    from ray.train import TrainingFailedError

    restarts = 0
    while True:
        try:
            return fit()
        except TrainingFailedError as error:
            cause = unrecoverable_cause(error)
            if cause is not None:
                raise StageFailed(f"stage {stage} failed, not retried: {cause}") from error
            if restarts >= max_failures:
                raise
            restarts += 1
            step = last_checkpoint_step(storage_path, run_name)
            where = f"step {step}" if step is not None else "its start (no checkpoint yet)"
            say(f"[{stage}] {describe_failure(error)}: resuming from {where} (restart {restarts} of {max_failures})")
