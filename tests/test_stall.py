"""The stall watchdog on a real local cluster: CPUs held by a placement group, two tasks that cannot start."""

from __future__ import annotations

import time

from owl2.stall import StallWatchdog, cluster_status, holders, pending_demands


def test_the_watchdog_says_what_waits_and_what_holds_the_cpus(ray_cluster):
    ray = ray_cluster
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": 1.5}])
    ray.get(group.ready())

    @ray.remote(num_cpus=1)
    def starved() -> None:
        pass

    refs = [starved.remote() for _ in range(2)]
    said: list[str] = []
    try:
        with StallWatchdog(after_s=1.0, say=said.append, poll_s=0.2):
            deadline = time.monotonic() + 30
            while not said and time.monotonic() < deadline:
                time.sleep(0.2)
        status = cluster_status()
        assert pending_demands(status) == {"task/actor {'CPU': 1.0}": 2}
        assert "CPU 1.5 of 2 in use, 1.5 reserved by 1 placement group(s)" in holders(status)
    finally:
        remove_placement_group(group)
        ray.get(refs, timeout=60)  # they run once the group's CPUs are back
    assert said and said[0].startswith("[owl2] waiting ")
    assert "2 task/actor {'CPU': 1.0}" in said[0] and "1.5 reserved by 1 placement group(s)" in said[0], said
