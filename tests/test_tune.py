"""Sweeps: stage planning validated against the experiment, then one sweep end to end on local Ray: early stopping,
a crashing trial, MLflow tracking and a resumed re-run."""

import json
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
def test_a_sweep_stops_a_laggard_survives_a_crash_tracks_every_trial_and_a_rerun_retries_only_the_crash(
    ray_cluster, world, tmp_path
):
    # One trial of each kind, in grid order: one that learns, one that diverges (the NaN limit ends its stage;
    # Tune's retry of the trial fails at once with the same cause instead of training again), and a learning rate
    # too small to learn, which ASHA must stop against the first trial's results (one trial at a time: the first
    # has reported every rung by then).
    sweep, base = _stage2_sweep(
        tmp_path / "grid.yaml",
        world,
        "grid",
        {"stages.stage2.optim.lr": {"grid": [3.0e-3, 1.0e6, 1.0e-9]}},
        max_concurrent_trials=1,
        trial_max_failures=1,
    )
    summaries = run_sweep(sweep, base)
    by_lr = {s.values["stages.stage2.optim.lr"]: s for s in summaries}
    assert set(by_lr) == {3e-3, 1e6, 1e-9}
    assert by_lr[3e-3].status == "TERMINATED" and not by_lr[3e-3].stopped_early
    assert by_lr[1e-9].status == "TERMINATED" and by_lr[1e-9].stopped_early
    assert by_lr[1e6].status == "ERROR" and "NaN/inf" in by_lr[1e6].error
    assert "the trial's retry did not run it again" in by_lr[1e6].error
    assert summaries[0] is by_lr[3e-3] and by_lr[3e-3].metric < by_lr[1e-9].metric  # best first
    # A stopped trial's Train run gives its CPUs back (its controller dies with the trial; Ray Train's cleaner
    # then removes its placement group): a reservation left behind starves every later trial of its data.
    assert _cpus_all_free(ray_cluster), ray_cluster.available_resources()

    client = _client(world)
    experiment = client.get_experiment_by_name("owl2-tiny-cpu-sweeps")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == sweep.name)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = [r for r in children if r.info.run_name != f"{sweep.name}-shared"]
    assert len(trials) == 3 and len(children) == 4  # one shared stage-1 run, then one run per trial
    (shared,) = [r for r in children if r.info.run_name == f"{sweep.name}-shared"]
    assert shared.data.params == {"seed": str(base.seed), "objective": "min val_loss"}
    for trial in trials:
        # Only what MLflow's compare page should offer as axes; the whole config is the trial's experiment.yaml.
        assert set(trial.data.params) == {"stages.stage2.optim.lr", "seed", "objective"}
        assert trial.data.params["objective"] == "min val_loss"
        assert "experiment.yaml" in {a.path for a in client.list_artifacts(trial.info.run_id)}
        assert trial.data.tags["owl2.stopped_early"] in ("true", "false")
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]  # stopped trials end their stage runs
    # A trial and the stage run inside it end alike: FINISHED, KILLED by ASHA, FAILED by the crash.
    by_value = {float(trial.data.params["stages.stage2.optim.lr"]): trial for trial in trials}
    stage_runs = {}
    for lr, status in ((3e-3, "FINISHED"), (1e-9, "KILLED"), (1e6, "FAILED")):
        (stage_runs[lr],) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == by_value[lr].info.run_id]
        assert [by_value[lr].info.status, stage_runs[lr].info.status] == [status, status]
    # The finished trial's row carries its stage's final metrics, its objective and its wall time.
    finished, stage = by_value[3e-3].data.metrics, stage_runs[3e-3].data.metrics
    assert {f"stage2/{key}": stage[key] for key in ("loss", "val_loss", "wall_time_s")}.items() <= finished.items()
    assert finished["best_val_loss"] == pytest.approx(by_lr[3e-3].metric) and finished["wall_time_s"] > 0
    # The sweep's row: its best trial's values and objective, under the trials' own param names.
    best = {"stages.stage2.optim.lr": "0.003", "seed": str(base.seed), "objective": "min val_loss"}
    assert parent.data.params == best
    assert parent.data.metrics["best_val_loss"] == pytest.approx(by_lr[3e-3].metric)
    assert parent.data.metrics["wall_time_s"] > 0
    # The runs table that owl2's link opens shows the objective, the stage metrics and the swept values.
    columns = set(json.loads(experiment.tags["mlflow.sharedViewState.owl2"])["selectedColumns"])
    assert {"metrics.`best_val_loss`", "metrics.`stage2/val_loss`", "params.`stages.stage2.optim.lr`"} <= columns
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "summary.txt", "best.yaml"} <= artifacts
    assert load_experiment(world / "runs" / sweep.name / "best.yaml").stages["stage2"].optim.lr == 3e-3

    # Re-running a sweep under its name resumes it: the finished trials and the shared stage 1 are kept (no new
    # runs for them), only the errored trial runs again, under its old id.
    def run_names():
        runs = client.search_runs([experiment.experiment_id])
        return Counter(r.info.run_name for r in runs if r.info.run_name.startswith(("grid", "stage")))

    before = run_names()
    again = {s.values["stages.stage2.optim.lr"]: s for s in run_sweep(sweep, base)}
    assert {lr: s.trial_id for lr, s in again.items()} == {lr: s.trial_id for lr, s in by_lr.items()}
    assert again[3e-3].status == "TERMINATED" and again[3e-3].metric == by_lr[3e-3].metric
    assert again[1e6].status == "ERROR"
    after = run_names()
    assert after["grid-shared"] == before["grid-shared"] == 1
    assert after[f"grid-{by_lr[3e-3].trial_id}"] == before[f"grid-{by_lr[3e-3].trial_id}"] == 1
    assert after["grid"] == 1  # the sweep's own run is resumed, not duplicated
