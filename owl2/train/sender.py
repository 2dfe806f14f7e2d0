"""Rank 0's MLflow calls, off the training thread: a tracking server that goes away never stops training.

Every call the training loop makes to MLflow (metrics at each report, the parameter-group table, evaluation
artifacts) goes through a :class:`TrackingSender`: a background thread makes the calls in order. When one fails
(server down, network gone) the thread says so once, keeps the call and everything after it, and tries again
every ``retry_s`` seconds; when the server is back it catches up and says how much it sent. The MLflow client's
own retries (minutes of back-off per call) then cost the sender's thread, not the training step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class TrackingSender:
    """``sender.submit(lambda: tracker.log_metrics(...))``; ``sender.close()`` at the end of the stage."""

    def __init__(self, say: Callable[[str], None], retry_s: float = 10.0) -> None:
        self.say, self.retry_s = say, retry_s
        self._calls: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._send, name="owl2-tracking-sender", daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], Any]) -> None:
        """Queue one MLflow call; returns at once."""
        self._calls.put(call)

    def close(self, timeout_s: float = 120.0) -> int:
        """Wait up to ``timeout_s`` for the queued calls; returns how many were never sent (and says so)."""
        self._calls.put(None)
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            return 0
        left = self._calls.qsize()  # the queued calls and the one in flight, less the end marker
        self.say(f"[tracking] MLflow still unreachable: {left} call(s) not sent after waiting {timeout_s:.0f} s")
        return left

    def _send(self) -> None:
        failing_since: float | None = None
        while (call := self._calls.get()) is not None:
            while True:
                try:
                    call()
                    break
                except Exception as error:  # any failure of the tracking server must leave training alone
                    if failing_since is None:
                        failing_since = time.monotonic()
                        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                        self.say(
                            f"[tracking] MLflow unreachable ({reason}); training goes on, metrics are kept and sent "
                            "when it is back"
                        )
                    time.sleep(self.retry_s)
            if failing_since is not None:
                self.say(
                    f"[tracking] MLflow reachable again after {time.monotonic() - failing_since:.0f} s: catching up "
                    f"{self._calls.qsize()} queued call(s)"
                )
                failing_since = None
