"""Training on a local Ray cluster: two workers learn, resume is exact (also past a damaged checkpoint), and data
a restart cannot fix ends the stage at once. The whole two-stage pipeline runs in test_demo.py; a lost node and the
driver's restart in test_multinode.py."""

import json
from pathlib import Path

import mlflow
import pytest
import ray.train
import torch
from safetensors.torch import load_file

from owl2.config import load_experiment
from owl2.errors import StageFailed
from owl2.train.faults import Fault, write_plan
from owl2.train.trainer import run_experiment

PIPELINE = Path(__file__).resolve().parents[1] / "experiments" / "tiny_cpu" / "pipeline.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(pipeline_dir):
    return pipeline_dir  # the shared world: seed 0, 60 training images


def _experiment(world, name, *overrides):
    """The shipped tiny-cpu pipeline, shortened; its relative data paths resolve against ``world``."""
    short = [
        f"name={name}",
        f"storage_path={world / 'runs'}",
        "stages.stage1.max_steps=4",
        "stages.stage1.checkpoint_every=2",
        "stages.stage1.log_every=1",
        "stages.stage1.optim.warmup_steps=1",
        "stages.stage2.max_steps=2",
        "stages.stage2.checkpoint_every=2",
        "stages.stage2.log_every=1",
        "stages.stage2.optim.warmup_steps=1",
        "resources.num_workers=1",
        "resources.cpus_per_worker=0.5",
    ]
    experiment = load_experiment(PIPELINE, short + list(overrides))
    from owl2.train.trainer import resolve_paths

    return resolve_paths(experiment, base=world)


def _state(result):
    return json.loads((Path(result.checkpoint.path) / "state.json").read_text())


def _weights(result):
    return load_file(Path(result.checkpoint.path) / "model.safetensors")


def _tracking_uri(world):
    return f"sqlite:///{world / 'runs' / 'mlflow.db'}"


def test_two_workers_learn(ray_cluster, world):
    experiment = _experiment(
        world,
        "learn",
        "resources.num_workers=2",
        "stages.stage2.max_steps=16",
        "stages.stage2.checkpoint_every=16",
        "stages.stage2.optim.lr=3e-3",
    )
    result = run_experiment(experiment, stages=["stage2"])[0]
    client = mlflow.MlflowClient(_tracking_uri(world))
    losses = [m.value for m in client.get_metric_history(result.run_id, "loss")]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses
    assert len(_state(result)["last_keys"]) == 2  # one data position per worker


def test_resume_equals_an_uninterrupted_run_even_when_the_latest_checkpoint_is_damaged(ray_cluster, world, tmp_path):
    # 10 steps of 16 samples over 60 images: a first pass over epoch 0, then one pass over epochs 1 and 2. The
    # crash after step 6 leaves checkpoints at steps 2, 4 and 6; the weights of step 6 are then cut short on
    # storage, so the resumed run starts from step 4, finishes epoch 1, then takes epoch 2 in a pass of its own.
    steps = "stages.stage1.max_steps=10"
    straight = run_experiment(_experiment(world, "straight", steps), stages=["stage1"])[0]

    write_plan(world / "runs", [Fault(run="interrupted-stage1", step=6, marker=str(tmp_path / "crashed"))])
    with pytest.raises(ray.train.TrainingFailedError):  # max_failures=0: the crash after step 6 is final
        run_experiment(_experiment(world, "interrupted", steps, "max_failures=0"), stages=["stage1"])
    latest = sorted(path for path in (world / "runs" / "interrupted-stage1").glob("checkpoint_*") if path.is_dir())[-1]
    assert json.loads((latest / "state.json").read_text())["step"] == 6
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    resumed = run_experiment(_experiment(world, "interrupted", steps), stages=["stage1"])[0]

    assert _state(resumed)["resumed_at"] == [4] and _state(resumed)["step"] == 10
    assert _state(resumed)["epochs"] == _state(straight)["epochs"] == [2]
    assert _state(resumed)["passes"] == _state(straight)["passes"] and _state(straight)["passes"][0][:2] == [1, 3]
    assert _state(resumed)["last_keys"] == _state(straight)["last_keys"]  # same data position
    ours, reference = _weights(resumed), _weights(straight)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-6, rtol=1e-5, msg=key)


def test_data_that_is_all_bad_ends_the_stage_at_once_without_restarts(ray_cluster, world, tmp_path, capsys):
    """An error a restart would only repeat (here: too many bad records) is not retried, whatever max_failures."""
    empty_root = tmp_path / "no-images-here"
    empty_root.mkdir()
    experiment = _experiment(
        world,
        "all-bad",
        "max_failures=2",
        f"stages.stage1.data.sources.0.image_root={empty_root}",
        "stages.stage1.data.min_records_for_check=8",
    )
    with pytest.raises(StageFailed, match=r"stage stage1 failed, not retried: worker 0: .*missing_file"):
        run_experiment(experiment, stages=["stage1"])
    assert "resuming" not in capsys.readouterr().out
