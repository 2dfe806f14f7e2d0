"""Training's MLflow calls survive the tracking server going away: a real ``mlflow server`` on 127.0.0.1 is
stopped and started again while a :class:`TrackingSender` keeps logging; every metric arrives in order."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from owl2.tracking import Tracker
from owl2.train.sender import TrackingSender


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(root: Path, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("mlflow server did not start within 120 s")


def _stop(server: subprocess.Popen) -> None:
    import os
    import signal

    os.killpg(server.pid, signal.SIGKILL)  # the server and its worker processes, as a crash would
    server.wait(timeout=30)


def _wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow  # two mlflow server starts (database migrations): ~30 s on a quiet 2-core machine
def test_metrics_logged_while_the_server_is_down_arrive_when_it_is_back(tmp_path, monkeypatch):
    # MLflow's client would otherwise retry each call for minutes; the sender's own retries are under test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    port = _free_port()
    server = _start_server(tmp_path, port)
    try:
        tracker = Tracker(f"http://127.0.0.1:{port}")
        run_id = tracker.start_run("stage1", "owl2-sender-test")
        said: list[str] = []
        sender = TrackingSender(said.append, retry_s=0.5)

        def history() -> list[tuple[int, float]]:
            return [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, "loss")]

        sender.submit(lambda: tracker.log_metrics(run_id, {"loss": 3.0}, step=1))
        _wait_for(lambda: history() == [(1, 3.0)])

        _stop(server)
        for step, loss in ((2, 2.5), (3, 2.0)):
            sender.submit(lambda step=step, loss=loss: tracker.log_metrics(run_id, {"loss": loss}, step=step))
        _wait_for(lambda: any("MLflow unreachable" in line for line in said))

        server = _start_server(tmp_path, port)
        assert sender.close(timeout_s=120) == 0
        assert sorted(history()) == [(1, 3.0), (2, 2.5), (3, 2.0)]
        assert any("MLflow reachable again" in line for line in said), said
    finally:
        _stop(server)


def test_close_says_what_was_not_sent(monkeypatch):
    said: list[str] = []
    sender = TrackingSender(said.append, retry_s=0.1)

    def unreachable() -> None:
        raise ConnectionError("connection refused")

    sender.submit(unreachable)
    sender.submit(unreachable)
    assert sender.close(timeout_s=0.5) == 2
    assert said[0].startswith("[tracking] MLflow unreachable (ConnectionError: connection refused)")
    assert said[-1] == "[tracking] MLflow still unreachable: 2 call(s) not sent after waiting 0 s"
