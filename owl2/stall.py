"""A driver-side watchdog that says what a run waits for when Ray cannot schedule what it asked for.

Ray queues a task or actor whose resources are not free and says nothing: a run whose data tasks wait behind
CPUs that placement groups reserve looks exactly like a slow one. The watchdog reads the cluster's pending
demands (the same source as ``ray status``) every few seconds and, once the same kind of demand has waited
``after_s`` seconds, prints one line: what waits, for what, and what holds the CPUs and GPUs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


def cluster_status() -> Any:
    """Ray's own summary of the cluster: usage per resource and the demands it cannot place yet."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    return get_cluster_status(ray.get_runtime_context().gcs_address)


def pending_demands(status: Any) -> dict[str, int]:
    """``{"{'CPU': 1.0}": 2}``: waiting tasks/actors and placement groups, by the bundle they ask for."""
    demands = status.resource_demands
    waiting: dict[str, int] = {}
    for demand in demands.ray_task_actor_demand:
        for request in demand.bundles_by_count:
            waiting[f"task/actor {request.bundle}"] = waiting.get(f"task/actor {request.bundle}", 0) + request.count
    for demand in demands.placement_group_demand:
        for request in demand.bundles_by_count:
            key = f"placement-group bundle {request.bundle}"
            waiting[key] = waiting.get(key, 0) + request.count
    return waiting


def holders(status: Any) -> str:
    """``CPU 1.5 of 2 in use, 1.5 reserved by 2 placement group(s)``, and the same for GPUs when there are any."""
    usage = {item.resource_name: item for item in status.cluster_resource_usage}
    parts = []
    for resource in ("CPU", "GPU"):
        if resource not in usage:
            continue
        # A placement group shows as CPU_group_<id> (its total) beside CPU_group_<index>_<id> per bundle.
        groups = [
            item for name, item in usage.items() if name.startswith(f"{resource}_group_") and name.count("_") == 2
        ]
        reserved = sum(item.total for item in groups)
        total = usage[resource]
        parts.append(
            f"{resource} {total.used:g} of {total.total:g} in use, {reserved:g} reserved by {len(groups)} "
            "placement group(s)"
        )
    return "; ".join(parts)


class StallWatchdog:
    """``with StallWatchdog(120, print):`` says, every ``after_s`` seconds that demands stay pending, what waits."""

    def __init__(self, after_s: float, say: Callable[[str], None], poll_s: float = 5.0) -> None:
        self.after_s, self.say, self.poll_s = after_s, say, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="owl2-stall-watchdog", daemon=True)

    def __enter__(self) -> StallWatchdog:
        if self.after_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _watch(self) -> None:
        since: float | None = None  # when the current run of pending demands began
        last_said = 0.0
        while not self._stop.wait(self.poll_s):
            try:
                status = cluster_status()
            except Exception:  # the watchdog must never be why a run fails (e.g. Ray shutting down)
                continue
            waiting = pending_demands(status)
            now = time.monotonic()
            since = (since or now) if waiting else None
            if since is not None and now - since >= self.after_s and now - last_said >= self.after_s:
                last_said = now
                what = ", ".join(f"{count} {kind}" for kind, count in sorted(waiting.items()))
                self.say(f"[owl2] waiting {now - since:.0f} s for resources: {what}; {holders(status)}")
