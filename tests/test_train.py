"""Training on a local Ray cluster, and the fault-injection matrix: a worker of either rank, among one or two,
killed mid-step, during a checkpoint's save, right after a report or during a checkpoint's evaluation; a driver
killed and its experiment re-run; a damaged checkpoint. Each resumes with the data position of an uninterrupted
run and, where one is run to compare, its weights. Data a restart cannot fix ends the stage at once. The whole
two-stage pipeline runs in test_demo.py; a lost node in test_multinode.py.

Cost: every Train attempt (a start or a restart) takes 15-25 s on a quiet 2-core machine; each test says how
many it makes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import ray
import ray.train
import torch
from conftest import registered_steps
from safetensors.torch import load_file

from owl2.config import load_experiment
from owl2.errors import StageFailed
from owl2.train.faults import Fault, write_plan
from owl2.train.trainer import resolve_paths, run_experiment

PIPELINE = Path(__file__).resolve().parents[1] / "experiments" / "tiny_cpu" / "pipeline.yaml"
# Ten steps of 16 samples over 60 images, a checkpoint every 2 steps; a tiny evaluation (3 items) at the
# checkpoints of steps 6 and 10.
TEN_STEPS = ("stages.stage1.max_steps=10", "stages.stage1.eval.every=6", "stages.stage1.eval.limit=1")
# Everything a checkpoint's state says about the data consumed (not resumed_at, which tells the resumes apart).
POSITION = (
    *("step", "epochs", "last_keys", "passes", "samples", "tokens", "images", "nonfinite_steps"),
    *("records_seen", "skipped"),  # the skip counters carry across restarts
)
LOST = "worker {rank} lost (its process or node died): resuming from step {step} (restart {restart} of {of})"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(pipeline_dir):
    return pipeline_dir  # the shared world: seed 0, 60 training images


def _overrides(world, name, *overrides):
    """The shipped tiny-cpu pipeline's overrides for a short run named ``name`` (one worker)."""
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
    return short + list(overrides)


def _experiment(world, name, *overrides):
    """The shipped tiny-cpu pipeline, shortened; its relative data paths resolve against ``world``."""
    return resolve_paths(load_experiment(PIPELINE, _overrides(world, name, *overrides)), base=world)


def _folder(result):
    """The folder of a stage's last checkpoint."""
    return Path(result.checkpoint.path)


def _state(folder):
    return json.loads((Path(folder) / "state.json").read_text())


def _position(folder):
    state = _state(folder)
    return {key: state[key] for key in POSITION}


def _weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def _assert_same_weights(ours, reference):
    assert ours.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-6, rtol=1e-5, msg=key)


def _tracking_uri(world):
    return f"sqlite:///{world / 'runs' / 'mlflow.db'}"


def _said_restarts(out):
    """The driver's restart lines in ``out``, without the stage prefix."""
    return [line.removeprefix("[stage1] ").removeprefix("[stage2] ") for line in out.splitlines() if "resuming" in line]


@pytest.fixture(scope="module")
def straight(ray_cluster, world):
    """Stage 1's ten steps, uninterrupted (1 Train attempt): the weights and data position to resume to."""
    return _folder(run_experiment(_experiment(world, "straight", *TEN_STEPS), stages=["stage1"])[0])


def test_one_worker_killed_at_every_point_resumes_exactly_even_past_a_damaged_checkpoint(
    straight, world, tmp_path, capsys
):
    # 6 Train attempts (+1 for the straight run). Two micro-batches a step. The worker dies in step 3 with its
    # second micro-batch taken, during the save of step 4, after the report of step 5 and after the evaluation
    # of step 6: the driver's four restarts resume from steps 2, 2, 4 and 4. After the checkpoint of step 8 it
    # dies once more, past max_failures; the weights of step 8 are then cut short on storage, so the re-run
    # resumes from step 6, finishes epoch 1 and takes epoch 2 in a pass of its own.
    points = [("mid_step", 3), ("during_save", 4), ("after_report", 5), ("during_eval", 6), ("after_checkpoint", 8)]
    # Only after_checkpoint waits before dying (the default 2 s): for the controller to register the checkpoint.
    faults = [Fault("interrupted-stage1", step, str(tmp_path / point), point, delay_s=0) for point, step in points]
    faults[-1] = Fault("interrupted-stage1", 8, str(tmp_path / "after_checkpoint"))
    write_plan(world / "runs", faults)
    with pytest.raises(ray.train.TrainingFailedError):
        run_experiment(_experiment(world, "interrupted", *TEN_STEPS, "max_failures=4"), stages=["stage1"])
    assert all((tmp_path / point).exists() for point, _ in points)
    assert _said_restarts(capsys.readouterr().out) == [
        LOST.format(rank=0, step=step, restart=restart, of=4) for restart, step in enumerate([2, 2, 4, 4], 1)
    ]
    latest = sorted(path for path in (world / "runs" / "interrupted-stage1").glob("checkpoint_*") if path.is_dir())[-1]
    assert _state(latest)["step"] == 8
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    resumed = _folder(run_experiment(_experiment(world, "interrupted", *TEN_STEPS), stages=["stage1"])[0])

    # The checkpoints that survived were resumed at steps 2 (the one of step 4), 4 (of 6 and 8) and 6 (of 10).
    assert _state(resumed)["resumed_at"] == [2, 4, 6]
    assert _position(resumed) == _position(straight)  # no sample twice, none skipped
    assert _state(straight)["epochs"] == [2] and _state(straight)["passes"][0][:2] == [1, 3]
    _assert_same_weights(_weights(resumed), _weights(straight))


def test_a_killed_driver_is_re_run_and_resumes_exactly(straight, ray_cluster, world, tmp_path):
    # 2 Train attempts. `owl2 train` in a child process on the session's cluster stops after the checkpoint of
    # step 2 (its worker waits there) and is killed with SIGKILL; the same command again resumes from step 2.
    command = [sys.executable, "-c", "import sys; from owl2.cli import main; sys.exit(main())", "train"]
    command += ["--config", str(PIPELINE), "--stage", "stage1", *_overrides(world, "killed", *TEN_STEPS)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    marker, snapshot = tmp_path / "checkpointed", world / "runs" / "killed-stage1" / "checkpoint_manager_snapshot.json"
    write_plan(world / "runs", [Fault("killed-stage1", 2, str(marker), delay_s=600.0)])
    before = _held_placement_groups()
    with open(tmp_path / "killed.out", "w") as out:
        driver = subprocess.Popen(command, cwd=world, env=env, stdout=out, stderr=subprocess.STDOUT)
        while not (marker.exists() and 2 in registered_steps(snapshot)):
            assert driver.poll() is None, (tmp_path / "killed.out").read_text()[-4000:]
            time.sleep(0.2)
        assert _held_placement_groups() - before  # the killed run's worker group holds CPUs
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    # Ray ends what the dead driver owned: the run's controller, its worker (asleep in the fault) and the placement
    # group that holds the worker's CPUs, which the re-run would otherwise wait for.
    deadline = time.monotonic() + 300
    while _held_placement_groups() - before:
        assert time.monotonic() < deadline, f"the killed run still holds {_held_placement_groups() - before}"
        time.sleep(0.5)

    rerun = subprocess.run(command, cwd=world, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-4000:]
    (line,) = [line for line in rerun.stdout.splitlines() if line.startswith("stage1: step 10,")]
    resumed = line.rpartition("checkpoint ")[2]
    assert _state(resumed)["resumed_at"] == [2]
    assert _position(resumed) == _position(straight)
    _assert_same_weights(_weights(resumed), _weights(straight))


def _held_placement_groups() -> set[str]:
    """The placement groups that hold resources now."""
    return {key for key, group in ray.util.placement_group_table().items() if group["state"] != "REMOVED"}


def _uninterrupted_positions(experiment, stage_name):
    """Every rank's data position after the stage's steps and the samples they took, as an uninterrupted run
    consumes them: the workers' own data streams, read here without training."""
    from owl2.config import ModelConfig
    from owl2.train.checkpoint import TrainState
    from owl2.train.job import StageJob

    job = StageJob(experiment=experiment, stage_name=stage_name, experiment_yaml="")
    spec = ModelConfig.from_preset(experiment.model.preset, experiment.model.overrides)
    world_size, state = experiment.resources.num_workers, TrainState(stage=stage_name)
    positions = []
    for rank in range(world_size):
        position, samples = _consume(job, spec, rank, world_size)
        positions.append(position)
        state.samples += samples
    state.record_positions(positions)
    return {"epochs": state.epochs, "last_keys": state.last_keys, "passes": state.passes, "samples": state.samples}


def _consume(job, spec, rank, world_size):
    """``rank``'s stream after the stage's steps, and the samples it gave."""
    from owl2.train.checkpoint import DataPosition
    from owl2.train.loop import ShardStream

    steps = samples = 0
    stream = ShardStream(job, spec, DataPosition(), rank, world_size, lambda: steps)  # sizes passes by steps done
    while steps < job.stage.max_steps:
        samples += sum(len(stream.next().ids) for _ in range(job.accumulation))
        steps += 1
    return stream.position, samples


def test_two_workers_learn_and_resume_exactly_after_faults_on_either_rank(ray_cluster, world, tmp_path, capsys):
    # 6 Train attempts. Stage 2 on two workers (one micro-batch a step each). Worker 1 dies in step 3 with its
    # batch taken, during the save of step 4 (worker 0 waits in the report), after the report of step 5 and while
    # worker 0 evaluates step 6; then worker 0 dies during the save of step 8 (worker 1 waits in the report).
    experiment = _experiment(
        world,
        "two-workers",
        "resources.num_workers=2",
        "stages.stage2.max_steps=16",
        "stages.stage2.optim.lr=3e-3",
        "stages.stage2.eval.every=6",
        "stages.stage2.eval.limit=1",
        "max_failures=5",
    )
    planned = [("mid_step", 3, 1), ("during_save", 4, 1), ("after_report", 5, 1), ("during_eval", 6, 1)]
    planned += [("during_save", 8, 0)]
    faults = [
        Fault("two-workers-stage2", step, str(tmp_path / f"{point}-{rank}"), point, rank, delay_s=0)
        for point, step, rank in planned
    ]
    write_plan(world / "runs", faults)
    result = run_experiment(experiment, stages=["stage2"])[0]

    assert all(Path(fault.marker).exists() for fault in faults)
    restarts = [(1, 2), (1, 2), (1, 4), (1, 4), (0, 6)]
    assert _said_restarts(capsys.readouterr().out) == [
        LOST.format(rank=rank, step=step, restart=restart, of=5) for restart, (rank, step) in enumerate(restarts, 1)
    ]
    state = _state(_folder(result))
    assert state["step"] == 16 and state["resumed_at"] == [2, 4, 6]
    assert {key: state[key] for key in ("epochs", "last_keys", "passes", "samples")} == _uninterrupted_positions(
        experiment, "stage2"
    )
    assert state["records_seen"] == state["samples"] and not state["skipped"]  # every record good, each counted once
    # Every step reported once or more (the steps replayed after a restart); a replayed step's loss is the
    # first one's: each resume continued the same computation.
    client = mlflow.MlflowClient(_tracking_uri(world))
    by_step = {}
    for metric in client.get_metric_history(result.run_id, "loss"):
        by_step.setdefault(metric.step, []).append(metric.value)
    assert sorted(by_step) == list(range(1, 17))
    for step, values in by_step.items():
        assert values == pytest.approx([values[0]] * len(values), rel=1e-5), (step, values)
    losses = [by_step[step][0] for step in range(1, 17)]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.5, losses


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
