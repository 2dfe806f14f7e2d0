"""Starting Ray the same way everywhere owl2 starts it: local by default, quiet, authenticated."""

from __future__ import annotations

import logging
import os
from typing import Any

# ``_system_config`` for a local cluster that many short runs share (the test suite, a laptop session): idle worker
# processes are kept for ten minutes (Ray keeps one per CPU, for a second), so each data pass runs its tasks in
# processes that already imported the pipeline (~0.4 s a pass, not ~10 s). A process is reused only for work whose
# runtime environment is the same: Ray Train gives its workers the ``RAY_TRAIN_*`` variables set in the driver as a
# runtime environment, so set those before the cluster starts (its processes inherit them), not in the driver.
WARM_LOCAL_CLUSTER: dict[str, Any] = {"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 600_000}


def ensure_ray(address: str | None = None, quiet: bool = True, **init_kwargs: Any) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; no-op when already connected.

    Ray's token authentication stays on (Ray 2.60's default). A local Ray starts its dashboard, on 127.0.0.1:
    Ray Train's placement-group cleaner asks it (the state API) whether a run's controller is alive, and
    without it the CPUs of a run whose controller was killed (a trial that ASHA stopped) stay reserved until
    the driver exits, which starves, then hangs, the trials after it. ``quiet`` keeps Ray's progress bars and
    INFO logs out of the user's terminal.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        init_kwargs.setdefault("include_dashboard", True)
        init_kwargs.setdefault("dashboard_host", "127.0.0.1")
        if quiet:
            init_kwargs.setdefault("log_to_driver", False)
            init_kwargs.setdefault("configure_logging", False)
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), **init_kwargs)
    if quiet:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Its only message says that the progress bars just turned off are off.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
