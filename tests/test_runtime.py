"""The local cluster owl2 starts: its processes reach their own cluster's state API, which Ray Train's
placement-group cleaner needs to give back the CPUs of a killed run."""

from pathlib import Path

import pytest

RECORDED_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where `ray start` records the cluster to join


@pytest.fixture
def dead_recorded_cluster():
    """The file a crashed `ray start` cluster leaves behind (the multi-node test's cluster leaves one too)."""
    before = RECORDED_CLUSTER.read_text() if RECORDED_CLUSTER.exists() else None
    RECORDED_CLUSTER.parent.mkdir(parents=True, exist_ok=True)
    RECORDED_CLUSTER.write_text("192.0.2.1:6379")  # TEST-NET: nothing answers there
    yield
    if before is None:
        RECORDED_CLUSTER.unlink()
    else:
        RECORDED_CLUSTER.write_text(before)


def test_a_task_asks_the_state_api_of_its_own_cluster(ray_cluster, dead_recorded_cluster):
    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class Witness:
        def ping(self) -> bool:
            return True

    witness = Witness.remote()
    assert ray.get(witness.ping.remote())
    actor_id = witness._actor_id.hex()

    @ray.remote(num_cpus=0)
    def state_of(actor: str) -> str:
        from ray.util.state import get_actor

        return get_actor(actor, timeout=20).state  # as Ray Train's cleaner asks it

    assert ray.get(state_of.remote(actor_id), timeout=120) == "ALIVE"
    ray.kill(witness)
