"""Sweeps: stage planning validated against the experiment, then 2x2 and crash sweeps end to end on local Ray."""

import time
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import yaml

from owl2.config import load_experiment
from owl2.tune.sweep import load_sweep, plan_stages, run_sweep

SWEEPS = Path(__file__).resolve().parents[1] / "experiments" / "sweeps"


def _stage2_sweep(path, world, name, space, **settings):
    """A sweep of stage-2 keys on the shortened tiny-cpu pipeline: stage 1 runs once, trials run stage 2."""
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "experiment": str(SWEEPS.parent / "tiny_cpu" / "pipeline.yaml"),
                "overrides": [
                    "resources.num_workers=1",
                    "stages.stage1.max_steps=2",
                    "stages.stage1.checkpoint_every=2",
                    "stages.stage1.log_every=2",
                    "stages.stage1.optim.warmup_steps=1",
                    "stages.stage1.validation.every=2",
                    "stages.stage2.max_steps=6",
                    "stages.stage2.checkpoint_every=6",
                    "stages.stage2.log_every=2",
                    "stages.stage2.optim.warmup_steps=1",
                    "stages.stage2.validation.every=2",
                    "stages.stage2.max_nonfinite_steps=0",
                ],
                "space": space,
                "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 10},
                "storage_path": str(world / "runs"),
                "tracking": {"experiment": "owl2-tiny-cpu-sweeps"},
                **settings,
            }
        )
    )
    sweep, base = load_sweep(path)
    assert plan_stages(sweep, base) == (["stage1"], ["stage2"])
    return sweep, base


def test_shipped_architecture_sweep_plans_both_stages_per_trial():
    sweep, base = load_sweep(SWEEPS / "tiny_cpu.yaml")
    assert plan_stages(sweep, base) == ([], ["stage1", "stage2"])  # architecture knobs re-run stage 1


def test_stage_two_keys_share_stage_one(tmp_path):
    sweep, base = _stage2_sweep(
        tmp_path / "decay.yaml", Path(tmp_path), "decay", {"stages.stage2.optim.layer_decay": {"grid": [0.8, 1.0]}}
    )
    assert sweep.space and base.stages["stage2"].max_steps == 6


@pytest.fixture(scope="module")
def world(pipeline_dir, monkeypatch_module):
    monkeypatch_module.chdir(pipeline_dir)  # the shipped YAMLs name data/shapes_world relative to the working directory
    return pipeline_dir


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _cpus_all_free(ray, within_s=30.0):
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _client(root):
    return mlflow.MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")


@pytest.mark.slow
def test_two_by_two_grid_tracks_every_trial_and_writes_the_best_config(ray_cluster, world, tmp_path):
    # A learning rate too small to learn is a constructed laggard: ASHA must stop at least one of its trials.
    sweep, base = _stage2_sweep(
        tmp_path / "grid.yaml",
        world,
        "grid",
        {"stages.stage2.optim.lr": {"grid": [3.0e-3, 1.0e-9]}, "stages.stage2.optim.layer_decay": {"grid": [0.8, 1.0]}},
        max_concurrent_trials=2,
    )
    summaries = run_sweep(sweep, base)

    assert len(summaries) == 4 and all(s.status == "TERMINATED" for s in summaries)
    assert {(s.values["stages.stage2.optim.lr"], s.values["stages.stage2.optim.layer_decay"]) for s in summaries} == {
        (3e-3, 0.8),
        (3e-3, 1.0),
        (1e-9, 0.8),
        (1e-9, 1.0),
    }
    metrics = [s.metric for s in summaries]
    assert all(m is not None for m in metrics) and metrics == sorted(metrics)
    assert summaries[0].values["stages.stage2.optim.lr"] == 3e-3
    assert any(s.stopped_early for s in summaries if s.values["stages.stage2.optim.lr"] == 1e-9)
    # A stopped trial's Train run gives its CPUs back (its controller dies with the trial; Ray Train's cleaner
    # then removes its placement group): a reservation left behind starves every later trial of its data.
    assert _cpus_all_free(ray_cluster), ray_cluster.available_resources()

    client = _client(world)
    experiment = client.get_experiment_by_name("owl2-tiny-cpu-sweeps")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == sweep.name)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = [r for r in children if r.info.run_name != f"{sweep.name}-shared"]
    assert len(trials) == 4 and len(children) == 5  # one shared stage-1 run, then one run per trial
    for trial in trials:
        assert {"sweep.stages.stage2.optim.lr", "sweep.stages.stage2.optim.layer_decay"} <= set(trial.data.params)
        assert trial.data.tags["owl2.stopped_early"] in ("true", "false")
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]  # stopped trials end their stage runs
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "summary.txt", "best.yaml"} <= artifacts

    best = load_experiment(world / "runs" / sweep.name / "best.yaml")
    assert best.stages["stage2"].optim.lr == 3e-3
    assert best.stages["stage2"].optim.layer_decay == summaries[0].values["stages.stage2.optim.layer_decay"]


@pytest.mark.slow
def test_a_crashing_trial_does_not_stop_the_sweep_and_a_rerun_retries_it(ray_cluster, world, tmp_path):
    sweep, base = _stage2_sweep(
        tmp_path / "crash.yaml",
        world,
        "crash",
        {"stages.stage2.optim.lr": {"grid": [3.0e-3, 1.0e6]}},  # the second diverges: NaN loss, then a crash
        max_concurrent_trials=1,
        trial_max_failures=0,  # a retry would only repeat the NaN limit (and cost this test a run)
    )
    summaries = {s.values["stages.stage2.optim.lr"]: s for s in run_sweep(sweep, base)}
    assert summaries[3e-3].status == "TERMINATED" and not summaries[3e-3].stopped_early
    assert summaries[1e6].status == "ERROR" and "NaN/inf" in summaries[1e6].error

    # Re-running a sweep under its name resumes it: the finished trial and the shared stage 1 are kept (no new
    # runs for them), only the errored trial runs again, under its old id.
    def run_names():
        experiment = _client(world).get_experiment_by_name("owl2-tiny-cpu-sweeps")
        runs = _client(world).search_runs([experiment.experiment_id])
        return Counter(r.info.run_name for r in runs if r.info.run_name.startswith(("crash", "stage")))

    before = run_names()
    again = {s.values["stages.stage2.optim.lr"]: s for s in run_sweep(sweep, base)}
    assert {lr: s.trial_id for lr, s in again.items()} == {lr: s.trial_id for lr, s in summaries.items()}
    assert again[3e-3].status == "TERMINATED" and again[3e-3].metric == summaries[3e-3].metric
    assert again[1e6].status == "ERROR"
    after = run_names()
    assert after["crash-shared"] == before["crash-shared"] == 1
    assert after[f"crash-{summaries[3e-3].trial_id}"] == before[f"crash-{summaries[3e-3].trial_id}"] == 1
    assert after["crash"] == 1  # the sweep's own run is resumed, not duplicated
