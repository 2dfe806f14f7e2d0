"""cluster.yaml: valid for Ray's cluster launcher (checked offline) and closed to the outside."""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw: dict[str, Any]) -> dict[str, Any]:
    """The config as `ray up` sees it after merging Ray's AWS defaults (no AWS calls: see the test below)."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw))


def _commands(config: dict[str, Any], *sections: str) -> list[str]:
    return [command for section in sections for command in config.get(section) or []]


def _all_commands(config: dict[str, Any]) -> list[str]:
    sections = [key for key in config if key.endswith("_commands")]
    commands = _commands(config, *sections)
    for node_type in config["available_node_types"].values():
        commands += _commands(node_type, *[key for key in node_type if key.endswith("_commands")])
    return commands


def _option(command: str, name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` in a shell command."""
    words = shlex.split(command.replace(";", " ; "))
    for i, word in enumerate(words):
        if word == name and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def test_validates_offline_against_the_ray_schema(raw, monkeypatch):
    from ray.autoscaler._private.util import prepare_config, validate_config

    def no_network(*args, **kwargs):
        raise AssertionError("cluster.yaml validation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    validate_config(prepare_config(copy.deepcopy(raw)))


def test_validation_catches_a_wrong_head_node_type(raw):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(raw)
    broken["head_node_type"] = "no-such-type"
    with pytest.raises((ValueError, KeyError)):
        validate_config(prepare_config(broken))


def test_node_types(prepared):
    node_types = prepared["available_node_types"]
    head = node_types[prepared["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), "training must not land on the head"
    workers = {name: spec for name, spec in node_types.items() if name != prepared["head_node_type"]}
    assert workers and all(spec["resources"].get("GPU", 0) > 0 for spec in workers.values())
    for name, spec in node_types.items():
        assert spec["node_config"]["InstanceType"], name  # node_config is free-form in Ray's schema
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= prepared["max_workers"], name
    assert sum(spec["min_workers"] for spec in workers.values()) <= prepared["max_workers"]


def test_image_matches_the_installed_ray():
    import ray

    image = yaml.safe_load(CLUSTER_YAML.read_text())["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-"), "cluster and client Ray versions must match"


def test_nothing_binds_all_interfaces(raw):
    for command in _all_commands(raw):
        assert "0.0.0.0" not in command and "[::]" not in command, command


def test_dashboard_and_job_api_listen_on_localhost_only(raw):
    (head_start,) = [c for c in raw["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in head_start
    assert _option(head_start, "--dashboard-host") == "127.0.0.1"


def test_token_authentication_stays_on(raw):
    starts = [c for c in _all_commands(raw) if "ray start" in c]
    assert len(starts) == 2  # head and workers
    for command in starts:
        assert re.search(r"\bRAY_AUTH_MODE=token\b", command), command
    assert "disabled" not in " ".join(_all_commands(raw))
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_mlflow_server_listens_on_the_private_address(raw):
    (server,) = [c for c in raw["head_start_ray_commands"] if "mlflow server" in c]
    host = _option(server, "--host")
    assert host is not None, "mlflow server without --host"
    if host.startswith("$"):
        variable = host.lstrip("${").rstrip("}")
        assignment = re.search(rf"\b{variable}=\$\((.*?)\);", server)
        assert assignment and "hostname -I" in assignment.group(1), "the address must be the node's own IP"
    else:
        address = ipaddress.ip_address(host)
        assert address.is_private and not address.is_loopback and not address.is_unspecified, host
    allowed = _option(server, "--allowed-hosts") or ""
    assert "*" not in allowed.split(","), "MLflow must not accept every Host header"


def test_the_package_is_installed_on_every_node(prepared):
    assert prepared["file_mounts"]["~/owl2"] == "."
    for section in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "~/owl2" in c for c in prepared[section]), section
