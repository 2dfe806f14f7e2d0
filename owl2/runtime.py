"""Starting Ray the same way everywhere owl2 starts it: local by default, quiet, authenticated."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

# ``_system_config`` for a local cluster that many short runs share (the test suite, a laptop session): idle worker
# processes are kept for ten minutes (Ray keeps one per CPU, for a second), so each data pass runs its tasks in
# processes that already imported the pipeline (~0.4 s a pass, not ~10 s). A process is reused only for work whose
# runtime environment is the same: Ray Train gives its workers the ``RAY_TRAIN_*`` variables set in the driver as a
# runtime environment, so set those before the cluster starts (its processes inherit them), not in the driver.
WARM_LOCAL_CLUSTER: dict[str, Any] = {"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 600_000}


def ensure_ray(address: str | None = None, quiet: bool = True, **init_kwargs: Any) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; no-op when already connected.

    Ray's token authentication stays on (Ray 2.60's default). A local Ray starts its dashboard, on 127.0.0.1,
    and its processes are told where it is: Ray Train's placement-group cleaner asks it (the state API) whether a
    run's controller is alive, and without an answer the CPUs of a run whose controller was killed (a trial that
    ASHA stopped) stay reserved until the driver exits, which starves, then hangs, the trials after it.
    ``quiet`` keeps Ray's progress bars and INFO logs out of the user's terminal.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        init_kwargs.setdefault("include_dashboard", True)
        init_kwargs.setdefault("dashboard_host", "127.0.0.1")
        if quiet:
            init_kwargs.setdefault("log_to_driver", False)
            init_kwargs.setdefault("configure_logging", False)
        if _starts_a_local_cluster(address) and init_kwargs["include_dashboard"]:
            init_kwargs.setdefault("dashboard_port", _free_port())
            with _state_api_of_this_cluster(init_kwargs["dashboard_port"]):
                ray.init(address=address, **init_kwargs)
        else:
            ray.init(address=address, **init_kwargs)
    if quiet:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Its only message says that the progress bars just turned off are off.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _starts_a_local_cluster(address: str | None) -> bool:
    """Whether ``ray.init(address)`` starts a new local Ray (Ray's own resolution: ``local``, or no address and no
    cluster recorded by ``ray start``) rather than joining a running one."""
    from ray._private.services import get_ray_address_from_environment

    return get_ray_address_from_environment(address, None) in (None, "local")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _state_api_of_this_cluster(dashboard_port: int) -> Iterator[None]:
    """Point the state API of the local cluster's processes at its own dashboard while it starts (they inherit the
    environment; the driver's is restored after).

    Ray Train's placement-group cleaner asks the state API whether a run's controller is alive. Without an address
    the state API takes the one ``ray start`` last wrote to ``/tmp/ray/ray_current_cluster``, else the only GCS
    process running: with that file left by a cluster that is gone, or with two local clusters, the cleaner's
    thread dies, and the CPUs of every controller killed afterwards (each trial that ASHA stops) stay reserved
    until the driver exits."""
    name = "RAY_API_SERVER_ADDRESS"
    before = os.environ.get(name)
    os.environ[name] = f"http://127.0.0.1:{dashboard_port}"
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before
