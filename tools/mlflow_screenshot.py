"""Screenshots of the MLflow UI over a store, as a new user first sees it: what comparing runs looks like.

Starts ``mlflow server`` on 127.0.0.1 at a free port over the store, opens the pages below one after the other in
headless Chromium (a fresh profile, so no earlier UI setting carries over), saves a PNG of each, then stops both::

    python tools/mlflow_screenshot.py --store OUT/runs/mlflow.db --experiment owl2-tiny-cpu --out shots/
    python tools/mlflow_screenshot.py --store runs/mlflow.db --experiment owl2-tiny-cpu-sweeps --compare grid \\
        --out shots/                    # also the compare page of the sweep "grid"'s trials

Pages, in ``--out``:

* ``default.png``: the experiment's page as its plain link opens it (MLflow 3.18 picks GenAI unless told);
* ``runs_table.png`` and ``runs_charts.png``: its runs table and charts in the model-training view
  (``owl2.tracking.experiment_url``), parent runs collapsed;
* ``compare.png`` (with ``--compare RUN``): MLflow's compare page for the child runs of the run called RUN.

Needs ``chromium`` (Debian: ``apt-get install -y chromium``) or ``--chromium PATH``. On a busy machine the MLflow
app takes minutes to load; ``--timeout-s`` bounds the server's start and each page.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from owl2.tracking import experiment_url

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def store_uri(store: str) -> str:
    """A path to an ``mlflow.db`` becomes its sqlite URI; URIs stay as given."""
    return store if "://" in store else f"sqlite:///{Path(store).resolve()}"


@contextlib.contextmanager
def _process(command: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=sink)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def mlflow_server(uri: str, log: Path, timeout_s: float) -> Iterator[str]:
    """``mlflow server`` over ``uri`` on 127.0.0.1 at a free port; yields its base URL once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    with _process([*command, "--port", str(port), "--workers", "1"], log) as server:
        deadline = time.monotonic() + timeout_s  # the first start over a store runs its migrations
        while True:
            if server.poll() is not None:
                raise SystemExit(f"mlflow server exited with {server.returncode}; its output is in {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"mlflow server did not answer within {timeout_s:.0f} s; see {log}") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def headless_browser(browser: str, size: tuple[int, int], log: Path) -> Iterator[int]:
    """Chromium in a fresh profile; yields its DevTools port. Chromium's own ``--screenshot`` fires before the
    MLflow app has fetched its runs (and with a virtual-time budget never fires), so pages are driven through
    the DevTools protocol instead."""
    with tempfile.TemporaryDirectory() as profile:
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            "--remote-debugging-port=0",  # Chromium writes the port it picked to DevToolsActivePort
            "about:blank",
        ]
        with _process(command, log) as process:
            port_file = Path(profile, "DevToolsActivePort")
            deadline = time.monotonic() + 120
            while not port_file.is_file() or not port_file.read_text().strip():
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit(f"{browser} did not open its DevTools port; see {log}")
                time.sleep(0.2)
            yield int(port_file.read_text().split()[0])


async def take_screenshots(
    port: int, pages: dict[Path, tuple[str, str]], size: tuple[int, int], timeout_s: float
) -> None:
    """Each page (``{png: (url, ready)}``) in turn in one tab: saved once the JavaScript expression ``ready`` holds
    and the page had a few seconds more to draw its rows and charts."""
    import aiohttp  # a dependency of ray[default], so of owl2

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
            tab = next(target for target in await response.json() if target["type"] == "page")
        async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as devtools:
            calls = 0

            async def call(method: str, **params: Any) -> dict[str, Any]:
                nonlocal calls
                calls += 1
                await devtools.send_json({"id": calls, "method": method, "params": params})
                while True:
                    message = await devtools.receive_json()
                    if message.get("id") == calls:
                        if "error" in message:
                            raise SystemExit(f"DevTools {method}: {message['error']}")
                        return message["result"]

            width, height = size
            await call(
                "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
            )
            for path, (url, ready) in pages.items():
                # A blank page first: each page is then a fresh load of the app (a move between its own pages may
                # keep the state of the one before: from the shared view, the charts stayed a skeleton).
                await call("Page.navigate", url="about:blank")
                await call("Page.navigate", url=url)
                deadline = time.monotonic() + timeout_s
                while not (await call("Runtime.evaluate", expression=ready, returnByValue=True))["result"].get("value"):
                    if time.monotonic() > deadline:
                        print(f"warning: {url} not ready after {timeout_s:.0f} s ({ready}); saved as it is", flush=True)
                        break
                    await asyncio.sleep(0.5)
                await asyncio.sleep(5)
                shot = await call("Page.captureScreenshot", format="png")
                path.write_bytes(base64.b64decode(shot["data"]))
                print(f"{path}  <- {url}", flush=True)


def _has_text(text: str) -> str:
    return f"document.body !== null && document.body.innerText.includes({json.dumps(text)})"


def _has_link(text: str) -> str:
    """A link reading exactly ``text``, as a run's name in the runs table or the charts' run list."""
    return f"Array.from(document.querySelectorAll('a')).some(a => a.textContent.trim() === {json.dumps(text)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="tracking URI, or the path of an mlflow.db")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--compare", metavar="RUN", help="also the compare page of this run's child runs")
    parser.add_argument("--out", default="mlflow_screenshots", help="folder for the PNGs")
    parser.add_argument("--chromium", help=f"browser binary (default: the first of {', '.join(BROWSERS)} on PATH)")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=300,
        help="how long the server may take to start, and a page to show its runs",
    )
    parser.add_argument("--window-size", default="2400,1000", help="WIDTH,HEIGHT (wide: metric columns come last)")
    args = parser.parse_args(argv)

    browser = args.chromium or next((found for name in BROWSERS if (found := shutil.which(name))), None)
    if browser is None:
        print("no chromium on PATH: apt-get install -y chromium, or pass --chromium", file=sys.stderr)
        return 2
    width, height = (int(n) for n in args.window_size.split(","))
    from mlflow import MlflowClient

    uri = store_uri(args.store)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"--experiment {args.experiment!r}: no such experiment in {uri}", file=sys.stderr)
        return 2
    experiment_id = experiment.experiment_id
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])
    top_level = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]  # the rows the table shows
    compared: list[str] = []
    if args.compare:
        parents = client.search_runs([experiment_id], f"attributes.run_name = '{args.compare}'")
        if not parents:
            print(f"--compare {args.compare!r}: no such run in {args.experiment}", file=sys.stderr)
            return 2
        children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
        compared = [run.info.run_id for run in children]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with mlflow_server(uri, out / "mlflow_server.log", args.timeout_s) as base:
        # Each page with what shows it has loaded: the newest top-level run's link (the rows), or a text. The runs
        # tab's own route: the experiment's route redirects there keeping only a few settings (not the charts mode).
        run_link = _has_link(top_level[0].info.run_name) if top_level else _has_text(args.experiment)
        runs_tab = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        pages = {
            out / "default.png": (f"{base}/#/experiments/{experiment_id}", _has_text(args.experiment)),
            out / "runs_table.png": (experiment_url(base, experiment_id), run_link),
            out / "runs_charts.png": (f"{runs_tab}&compareRunsMode=CHART", run_link),
        }
        if compared:
            ids = json.dumps(compared, separators=(",", ":"))
            url = f'{base}/#/compare-runs?runs={ids}&experiments=["{experiment_id}"]&workflowType=machine_learning'
            pages[out / "compare.png"] = (url, _has_text("Run details"))
        with headless_browser(browser, (width, height), out / "chromium.log") as port:
            asyncio.run(take_screenshots(port, pages, (width, height), args.timeout_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
