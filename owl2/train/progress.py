"""Progress lines from the rank-0 worker to the driver's terminal, without Ray's log prefixes and noise.

The driver owns a ``ray.util.queue.Queue`` (an actor, so it works across a cluster) and prints what
arrives from a background thread while ``TorchTrainer.fit()`` blocks.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO


class ProgressPrinter:
    """``with ProgressPrinter() as progress:`` pass ``progress.queue`` to the workers; lines get printed."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.queue: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProgressPrinter:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._thread = threading.Thread(target=self._pump, name="owl2-progress", daemon=True)
        self._thread.start()
        return self

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set() or not self.queue.empty():
            try:
                line = self.queue.get(timeout=0.5)
            except Empty:
                continue
            print(line, file=self.stream, flush=True)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.queue.shutdown()


def say(line: str) -> None:
    """Driver side: print one line to the terminal at once (restarts, stalls)."""
    print(line, flush=True)


def emit(queue: Any, line: str) -> None:
    """Worker side: send one line (printed locally when no driver queue is attached)."""
    if queue is None:
        say(line)
    else:
        queue.put(line)
