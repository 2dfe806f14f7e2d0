"""A stage on a local multi-node Ray cluster (a worker on each of two nodes) resumed exactly after losing a node.

The cluster runs in a process of its own (this file, run as a script): the other Ray tests of a session share
one single-node local Ray (``conftest.ray_cluster``), which a second cluster in the same process would replace.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "experiments" / "tiny_cpu" / "pipeline.yaml"
# Workers take 2 of a node's 3 CPUs: two never share a node, and each node keeps a CPU for the pipelines.
NODE_CPUS, WORKER_CPUS = 3, 2
FILES, ROWS_PER_FILE, MICRO_BATCH = 4, 12, 8

pytestmark = pytest.mark.slow


def test_a_stage_resumes_exactly_after_losing_a_node(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=900
    )
    assert child.returncode == 0, child.stdout[-2000:] + child.stderr[-4000:]
    lines = child.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    # Losing a node that held a worker ended the first attempt; the driver said so and resumed the stage on the
    # head and the two nodes left.
    assert report["lost_a_worker_node"]
    said = [line for line in lines if "resuming" in line]
    assert len(said) == 1 and said[0].startswith("[stage1] "), said
    assert said[0].endswith(": resuming from step 2 (restart 1 of 1)"), said
    assert report["alive_nodes"] == 3
    state = report["state"]
    assert state["step"] == 4 and state["resumed_at"] == [2]
    # Each worker's share of epoch 0 is 2 files = 3 batches; step 4 took the first batch of its epoch 1: the
    # resumed run neither repeated nor skipped a sample of the interrupted one.
    assert state["epochs"] == [1, 1]
    assert state["last_keys"] == [keys[MICRO_BATCH - 1] for keys in report["epoch1_keys"]]


def _experiment(root: Path, name: str, *overrides: str):
    from owl2.config import load_experiment
    from owl2.train.trainer import resolve_paths

    source = {"format": "captions", "path": "data/shards", "image_root": "data/shapes_world", "name": "captions"}
    short = [
        f"name={name}",
        f"storage_path={root / 'runs'}",
        f"stages.stage1.data.sources=[{json.dumps(source)}]",
        "stages.stage1.validation=null",
        "stages.stage1.max_steps=4",
        "stages.stage1.checkpoint_every=2",
        "stages.stage1.log_every=1",
        "stages.stage1.optim.warmup_steps=1",
        f"stages.stage1.micro_batch_size={MICRO_BATCH}",
        f"stages.stage1.global_batch_size={2 * MICRO_BATCH}",
        "resources.num_workers=2",
        f"resources.cpus_per_worker={WORKER_CPUS}",
    ]
    return resolve_paths(load_experiment(PIPELINE, short + list(overrides)), base=root)


def _world(root: Path) -> None:
    """The shapes world, its training captions split into ``FILES`` files (dealt 2 to each worker)."""
    from owl2.data.world import generate_world

    generate_world(root / "data" / "shapes_world", seed=0, num_train=FILES * ROWS_PER_FILE, num_heldout=4)
    lines = (root / "data" / "shapes_world" / "captions" / "train.jsonl").read_text().splitlines()
    (root / "data" / "shards").mkdir()
    for index in range(FILES):
        part = lines[index * ROWS_PER_FILE : (index + 1) * ROWS_PER_FILE]
        (root / "data" / "shards" / f"train-{index}.jsonl").write_text("\n".join(part) + "\n")


def _free_port() -> int:
    """A port for this cluster's dashboard: the session's own Ray (conftest.ray_cluster) may hold 8265."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _scenario(root: Path) -> dict:
    """Train to the checkpoint of step 2 on three nodes, remove a node that holds a worker, resume to step 4 on
    the two left (nodes are not added later: a node starting on a loaded machine can time out). The driver's
    restart line goes to stdout, the report is the last line."""
    import ray
    from conftest import TRAIN_POLL_ENV, registered_steps
    from ray.cluster_utils import Cluster

    from owl2.data.pipeline import samples
    from owl2.runtime import WARM_LOCAL_CLUSTER, ensure_ray
    from owl2.train.faults import Fault, write_plan
    from owl2.train.trainer import run_experiment

    _world(root)
    # As in conftest.ray_cluster: warm worker processes, the dashboard on (runtime.ensure_ray), Ray Train's fast
    # poll in the nodes' environment only.
    head = {
        "num_cpus": 0,
        "include_dashboard": True,
        "dashboard_port": _free_port(),
        "_system_config": WARM_LOCAL_CLUSTER,
    }
    os.environ.update(TRAIN_POLL_ENV)
    cluster = Cluster(initialize_head=True, head_node_args=head)
    nodes = {cluster.add_node(num_cpus=NODE_CPUS) for _ in range(3)}
    cluster.wait_for_nodes()
    for name in TRAIN_POLL_ENV:
        del os.environ[name]
    ensure_ray(cluster.address)
    marker, lost = root / "checkpointed", []

    def lose_a_worker_node() -> None:
        # The worker waits after its checkpoint of step 2 (the marker) until the controller has registered it.
        snapshot = root / "runs" / "two-nodes-stage1" / "checkpoint_manager_snapshot.json"
        while not (marker.exists() and 2 in registered_steps(snapshot)):
            time.sleep(0.1)
        # The training workers' placement group (two bundles) says where they run.
        groups = ray.util.placement_group_table().values()
        (group,) = [g for g in groups if g["state"] == "CREATED" and len(g["bundles"]) == 2]
        lost.append(next(node for node in nodes if node.node_id == group["bundles_to_node_id"][1]))
        cluster.remove_node(lost[0], allow_graceful=False)

    threading.Thread(target=lose_a_worker_node, daemon=True).start()
    # After its checkpoint of step 2 the run waits (delay_s) until the node is gone; the driver's one restart
    # (max_failures=1) resumes it.
    write_plan(root / "runs", [Fault(run="two-nodes-stage1", step=2, marker=str(marker), delay_s=300.0)])
    experiment = _experiment(root, "two-nodes", "max_failures=1")
    result = run_experiment(experiment, stages=["stage1"], progress=False)[0]
    data = experiment.stages["stage1"].data
    epoch1 = [[int(row["order_key"]) for row in samples(data, 1, rank, 2).take_all()] for rank in range(2)]
    state = json.loads((Path(result.checkpoint.path) / "state.json").read_text())
    alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    return {
        "lost_a_worker_node": len(lost) == 1 and lost[0].node_id not in alive,
        "alive_nodes": len(alive),
        "state": state,
        "epoch1_keys": epoch1,
    }


if __name__ == "__main__":
    print(json.dumps(_scenario(Path(sys.argv[1]))), flush=True)
    # The report is out; tearing down a cluster that lost a node can fail in Ray's exit handlers, which would
    # turn a finished scenario into a non-zero exit status.
    os._exit(0)
