"""owl2.tracking against a real MLflow (a sqlite store in a temporary folder)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from owl2 import tracking
from owl2.config import ConfigError, SourceConfig, TrackingConfig
from owl2.tracking import (
    Tracker,
    data_fingerprint,
    flatten,
    is_secret_key,
    redact,
    redact_text,
    resolve_tracking_uri,
    run_tags,
)

EXPERIMENT = "owl2-test"

# MLflow's own use of SQLAlchemy, not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the module: MLflow's first use of a sqlite file runs its migrations (a few seconds)."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def tracker(store: Path) -> Tracker:
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = resolve_tracking_uri(TrackingConfig(), str(store))
    return Tracker(uri)


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _artifact(tracker: Tracker, run_id: str, name: str) -> str:
    import mlflow.artifacts

    return mlflow.artifacts.load_text(f"{tracker.client.get_run(run_id).info.artifact_uri}/{name}")


# --------------------------------------------------------------------------------------------------
# resolve_tracking_uri
# --------------------------------------------------------------------------------------------------


def test_default_store_is_an_absolute_sqlite_file_under_storage_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(TrackingConfig(), "runs/here")
    assert uri == f"sqlite:///{tmp_path.resolve()}/runs/here/mlflow.db"
    assert uri.startswith("sqlite:////")
    assert (tmp_path / "runs" / "here").is_dir()


def test_home_in_storage_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert (
        resolve_tracking_uri(TrackingConfig(), "~/owl2_runs") == f"sqlite:///{tmp_path.resolve()}/owl2_runs/mlflow.db"
    )
    assert (
        resolve_tracking_uri(TrackingConfig(), f"file://{tmp_path}/x") == f"sqlite:///{tmp_path.resolve()}/x/mlflow.db"
    )


def test_environment_variable_wins_over_config(tmp_path, monkeypatch):
    config = TrackingConfig(tracking_uri="http://10.0.0.5:5000")
    assert resolve_tracking_uri(config, str(tmp_path)) == "http://10.0.0.5:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.9:5000")
    assert resolve_tracking_uri(config, str(tmp_path)) == "http://10.0.0.9:5000"
    assert resolve_tracking_uri(TrackingConfig(), "s3://bucket/runs") == "http://10.0.0.9:5000"


def test_relative_uris_are_anchored_at_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    assert resolve_tracking_uri(TrackingConfig("sqlite:///mlflow.db"), "x") == f"sqlite:///{here}/mlflow.db"
    assert (
        resolve_tracking_uri(TrackingConfig("sqlite:///a/b.db?timeout=5"), "x") == f"sqlite:///{here}/a/b.db?timeout=5"
    )
    assert resolve_tracking_uri(TrackingConfig("mlruns"), "x") == (here / "mlruns").as_uri()
    assert resolve_tracking_uri(TrackingConfig("file:mlruns"), "x") == (here / "mlruns").as_uri()
    for absolute in ("sqlite:////data/mlflow.db", "file:///data/mlruns", "http://mlflow:5000", "databricks"):
        assert resolve_tracking_uri(TrackingConfig(absolute), "x") == absolute


def test_remote_storage_needs_a_tracking_server():
    with pytest.raises(ConfigError, match="tracking server"):
        resolve_tracking_uri(TrackingConfig(), "s3://bucket/owl2-runs")
    assert resolve_tracking_uri(TrackingConfig("http://10.0.0.5:5000"), "s3://bucket/r") == "http://10.0.0.5:5000"


def test_importing_tracking_does_not_import_mlflow():
    code = "import sys, owl2.tracking; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------
# Tracker against a real store
# --------------------------------------------------------------------------------------------------


def test_parent_and_two_children(tracker: Tracker, store: Path):
    parent = tracker.start_run("exp-a", EXPERIMENT, tags=run_tags(None, "name: exp-a\n", None))
    tracker.log_params(parent, {"name": "exp-a", "resources": {"num_workers": 2, "use_gpu": False}})
    children = {}
    for stage in ("stage1", "stage2"):
        run_id = tracker.start_run(stage, EXPERIMENT, parent_run_id=parent, tags=run_tags(stage, "x: 1\n", "abc123"))
        tracker.log_params(
            run_id, {"stage": {"lr": 1e-4, "data": {"sources": [{"format": "llava", "path": "/d/a.json"}]}}}
        )
        for step in (1, 2, 3):
            skipped = tracker.log_metrics(
                run_id, {"loss": 1.0 / step, "grad_norm": math.nan if step == 2 else 2.0}, step
            )
            assert skipped == (1 if step == 2 else 0)
        tracker.log_text(run_id, f"table of {stage}\n", "param_groups.txt")
        tracker.log_dict(run_id, {"groups": [{"name": "decoder", "lr": 1e-4}]}, "param_groups.json")
        tracker.log_dict(run_id, {"stage": stage, "steps": 3}, "config/stage.yaml")
        tracker.set_tags(run_id, {"owl2.checkpoint": f"/ckpt/{stage}"})
        tracker.end_run(run_id, "FINISHED")
        children[stage] = run_id
    tracker.end_run(parent, "FINISHED")

    client = tracker.client
    top = client.get_run(parent)
    assert top.info.status == "FINISHED" and top.info.run_name == "exp-a"
    assert top.data.params == {"name": "exp-a", "resources.num_workers": "2", "resources.use_gpu": "False"}
    assert top.data.tags["owl2.version"] and "owl2.stage" not in top.data.tags
    for stage, run_id in children.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags[tracking.PARENT_RUN_TAG] == parent
        assert run.data.tags["owl2.stage"] == stage
        assert run.data.tags["owl2.data_fingerprint"] == "abc123"
        assert run.data.tags["owl2.checkpoint"] == f"/ckpt/{stage}"
        assert run.data.params["stage.lr"] == "0.0001"
        assert run.data.params["stage.data.sources.0.format"] == "llava"
        losses = client.get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in losses] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
        assert [m.step for m in client.get_metric_history(run_id, "grad_norm")] == [1, 3]
        assert [m.value for m in client.get_metric_history(run_id, "nonfinite_skipped")] == [1.0]
        assert tracker.nonfinite_counts(run_id) == {"grad_norm": 1}
        assert _artifact(tracker, run_id, "param_groups.txt") == f"table of {stage}\n"
        assert json.loads(_artifact(tracker, run_id, "param_groups.json")) == {
            "groups": [{"name": "decoder", "lr": 1e-4}]
        }
        assert yaml.safe_load(_artifact(tracker, run_id, "config/stage.yaml")) == {"stage": stage, "steps": 3}
        # Artifacts sit beside the database, not in ./mlruns of whatever directory the test ran in.
        assert Path(run.info.artifact_uri).is_relative_to(store.resolve())


def test_find_run_continues_the_same_runs(tracker: Tracker):
    parent = tracker.start_run("exp-resume", EXPERIMENT)
    child = tracker.start_run("stage1", EXPERIMENT, parent_run_id=parent)
    other_parent = tracker.start_run("exp-other", EXPERIMENT)
    tracker.start_run("stage1", EXPERIMENT, parent_run_id=other_parent)
    tracker.start_run("exp-resume", EXPERIMENT, parent_run_id=other_parent)  # same name, but a child
    tracker.end_run(child, "FAILED")

    assert tracker.find_run(EXPERIMENT, "exp-resume") == parent
    assert tracker.find_run(EXPERIMENT, "stage1", parent_run_id=parent) == child
    assert tracker.find_run(EXPERIMENT, "stage1") is None  # only children have that name
    assert tracker.find_run(EXPERIMENT, "never-ran") is None
    assert tracker.find_run("no-such-experiment", "exp-resume") is None

    resumed = tracker.start_run("stage1", EXPERIMENT, parent_run_id=parent, tags={"owl2.attempt": 2}, resume=True)
    assert resumed == child
    run = tracker.client.get_run(child)
    assert run.info.status == "RUNNING" and run.data.tags["owl2.attempt"] == "2"
    fresh = tracker.start_run("stage2", EXPERIMENT, parent_run_id=parent, resume=True)
    assert fresh != child and tracker.find_run(EXPERIMENT, "stage2", parent) == fresh


def test_names_with_quotes_are_found(tracker: Tracker):
    for name in ("it's", 'say "hi"', "both ' and \""):
        run_id = tracker.start_run(name, EXPERIMENT)
        assert tracker.find_run(EXPERIMENT, name) == run_id


def test_relogging_params_on_resume_keeps_the_run_usable(tracker: Tracker):
    run_id = tracker.start_run("relog", EXPERIMENT)
    assert tracker.log_params(run_id, {"a": 1, "b": {"c": "x"}}) == {}
    assert tracker.log_params(run_id, {"a": 1, "b": {"c": "x"}}) == {}  # identical: nothing to do
    changed = tracker.log_params(run_id, {"a": 2, "b": {"c": "x"}, "new": True})
    assert changed == {"a": ("1", "2")}
    assert tracker.client.get_run(run_id).data.params == {"a": "1", "b.c": "x", "new": "True"}


def test_many_and_long_params(tracker: Tracker):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    run_id = tracker.start_run("big", EXPERIMENT)
    tracker.log_params(run_id, {"p": {str(i): i for i in range(250)}, "long": "x" * (MAX_PARAM_VAL_LENGTH + 50)})
    params = tracker.client.get_run(run_id).data.params
    assert len(params) == 251
    assert len(params["long"]) == MAX_PARAM_VAL_LENGTH and params["long"].endswith("[truncated]")


def test_tracker_from_another_directory_uses_the_same_store(tracker: Tracker, store: Path, tmp_path, monkeypatch):
    elsewhere = tmp_path / "trial_dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # what Tune does to every trial
    other = Tracker(tracker.tracking_uri)
    run_id = other.start_run("from-a-trial", "owl2-other-experiment")
    other.log_metrics(run_id, {"loss": 0.5}, step=1)
    other.log_text(run_id, "hello", "note.txt")
    other.end_run(run_id)

    assert tracker.client.get_run(run_id).data.metrics == {"loss": 0.5}
    assert Path(tracker.client.get_run(run_id).info.artifact_uri).is_relative_to(store.resolve())
    assert _artifact(tracker, run_id, "note.txt") == "hello"
    assert list(elsewhere.iterdir()) == []  # no stray mlflow.db or mlruns/


def test_secrets_never_reach_the_store(tracker: Tracker):
    run_id = tracker.start_run("secrets", EXPERIMENT, tags={"db": "postgresql://me:pw@db:5432/x"})
    tracker.log_params(run_id, {"data": {"tokenizer": "/models/llama", "hf_token": "hf_abc"}, "api_key": "sk-1"})
    tracker.log_dict(run_id, {"tracking_uri": "http://u:p@host:5000", "password": "pw"}, "config.json")
    tracker.log_text(run_id, "hf_token: hf_abc\ntokenizer: /models/llama\n", "config.yaml")
    run = tracker.client.get_run(run_id)
    assert run.data.params == {"data.tokenizer": "/models/llama", "data.hf_token": "***", "api_key": "***"}
    assert run.data.tags["db"] == "postgresql://***@db:5432/x"
    assert json.loads(_artifact(tracker, run_id, "config.json")) == {
        "tracking_uri": "http://***@host:5000",
        "password": "***",
    }
    assert _artifact(tracker, run_id, "config.yaml") == "hf_token: ***\ntokenizer: /models/llama\n"


def test_bad_arguments(tracker: Tracker):
    run_id = tracker.start_run("bad", EXPERIMENT)
    with pytest.raises(ValueError, match="status"):
        tracker.end_run(run_id, "DONE")
    with pytest.raises(ValueError, match=".json, .yaml"):
        tracker.log_dict(run_id, {}, "x.txt")


def test_run_context_marks_failures(tracker: Tracker):
    with pytest.raises(RuntimeError), tracker.run("ctx-fail", EXPERIMENT) as failed:
        raise RuntimeError("boom")
    with tracker.run("ctx-ok", EXPERIMENT) as ok:
        pass
    assert tracker.client.get_run(failed).info.status == "FAILED"
    assert tracker.client.get_run(ok).info.status == "FINISHED"


# --------------------------------------------------------------------------------------------------
# What the MLflow UI compares: the experiment's view, headline metrics, params, statuses, system metrics
# --------------------------------------------------------------------------------------------------


VIEW = "mlflow.sharedViewState.owl2"


def _view_columns(tracker: Tracker, experiment_id: str) -> list[str]:
    return json.loads(tracker.client.get_experiment(experiment_id).tags[VIEW])["selectedColumns"]


def test_experiments_open_as_model_training_with_owl2s_columns(tracker: Tracker):
    experiment_id = tracker.experiment_id("owl2-view")
    tags = tracker.client.get_experiment(experiment_id).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING_KIND == "custom_model_development"
    assert _view_columns(tracker, experiment_id) == ["metrics.`wall_time_s`"]
    # An experiment from before owl2 tagged gets both; a kind someone chose in the UI stays theirs.
    old = tracker.client.create_experiment("owl2-untagged")
    chosen = tracker.client.create_experiment("owl2-chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    fresh = Tracker(tracker.tracking_uri)
    assert fresh.experiment_id("owl2-untagged") == old and fresh.experiment_id("owl2-chosen") == chosen
    assert tracker.client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert tracker.client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"
    assert _view_columns(tracker, old) == ["metrics.`wall_time_s`"]
    # MLflow 3.18's UI picks the view from the link, whatever the tag says; the link opens owl2's columns.
    assert tracking.experiment_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=owl2"
    )

    # Columns are added after those there, once each; a view that would outgrow MLflow's tag limit stays.
    columns = tracker.show_columns(experiment_id, ["stage1/loss", "wall_time_s"], ["seed"])
    assert columns == ["metrics.`wall_time_s`", "metrics.`stage1/loss`", "params.`seed`"]
    assert tracker.show_columns(experiment_id, ["stage1/loss"]) == columns
    assert tracker.show_columns(experiment_id, [f"eval/{'x' * 100}/{i}" for i in range(200)]) == columns
    assert _view_columns(tracker, experiment_id) == columns


def test_parent_runs_carry_each_stages_final_metrics(tracker: Tracker):
    parent = tracker.start_run("headline", "owl2-headline")
    stage1 = tracker.start_run("stage1", "owl2-headline", parent_run_id=parent)
    for step, loss in ((1, 3.0), (2, 2.5)):
        tracker.log_metrics(stage1, {"loss": loss, "val_loss": loss + 0.25, "grad_norm": 9.0}, step)
    assert tracker.add_wall_time(stage1, 40.0) == 40.0
    assert tracker.add_wall_time(stage1, 2.0) == 42.0  # a resumed stage keeps counting
    stage2 = tracker.start_run("stage2", "owl2-headline", parent_run_id=parent)
    tracker.log_metrics(stage2, {"loss": 1.5, "eval/shapes/vqa/accuracy": 0.25, "eval/time_s": 3.0}, 2)
    tracker.log_metrics(stage2, {"loss": 1.25, "eval/shapes/vqa/accuracy": 0.5, "eval/time_s": 4.0}, 4)
    tracker.start_run("stage1", "owl2-headline")  # a run of the same name elsewhere is not this parent's

    expected = {
        "stage1/loss": 2.5,
        "stage1/val_loss": 2.75,
        "stage1/wall_time_s": 42.0,
        "stage2/loss": 1.25,
        "stage2/eval/shapes/vqa/accuracy": 0.5,
    }
    assert tracker.log_headline(parent, ["stage1", "stage2", "stage3"]) == expected
    assert tracker.add_wall_time(parent, 50.0) == 50.0
    assert tracker.client.get_run(parent).data.metrics == {**expected, "wall_time_s": 50.0}
    # ... and the runs table that experiment_url opens shows them as columns.
    experiment_id = tracker.experiment_id("owl2-headline")
    assert _view_columns(tracker, experiment_id) == ["metrics.`wall_time_s`"] + [f"metrics.`{k}`" for k in expected]

    # Logged again after a re-run of stage 2, the parent shows the new values.
    tracker.log_metrics(stage2, {"loss": 1.0}, 6)
    tracker.log_headline(parent, ["stage1", "stage2"])
    assert tracker.client.get_run(parent).data.metrics["stage2/loss"] == 1.0


def test_a_trial_logs_only_its_swept_values_seed_and_objective(tracker: Tracker):
    from owl2.config import SweepConfig
    from owl2.tune.sweep import trial_params

    space = {"stages.stage2.optim.lr": {"grid": [1e-3, 1e-4]}, "model.overrides.abstractor.num_queries": {"grid": [8]}}
    sweep = SweepConfig(name="s", experiment="base.yaml", space=space, metric="val_loss", mode="min")
    sampled = {"stages.stage2.optim.lr": 1e-4, "model.overrides.abstractor.num_queries": 8}
    run_id = tracker.start_run("s-trial", EXPERIMENT)
    tracker.log_params(run_id, trial_params(sweep, sampled, seed=3))
    assert tracker.client.get_run(run_id).data.params == {
        "stages.stage2.optim.lr": "0.0001",
        "model.overrides.abstractor.num_queries": "8",
        "seed": "3",
        "objective": "min val_loss",
    }
    # The shared stages' run: the same seed and objective, so comparing it with the trials adds no axis.
    assert trial_params(sweep, {}, seed=3) == {"seed": 3, "objective": "min val_loss"}


def test_waiting_for_runs_that_another_process_ends(tracker: Tracker):
    ended_soon, never_ended = tracker.start_run("ended-soon", EXPERIMENT), tracker.start_run("killed", EXPERIMENT)
    threading.Timer(1.0, tracker.end_run, (ended_soon, "FAILED")).start()  # as a stopped trial's own process
    tracker.wait_ended([ended_soon], timeout_s=60)
    assert tracker.client.get_run(ended_soon).info.status == "FAILED"  # returned once it had ended
    tracker.wait_ended([never_ended], timeout_s=1)  # a process killed before it ended its run: returns all the same
    assert tracker.client.get_run(never_ended).info.status == "RUNNING"
    tracker.end_run(never_ended, "KILLED")


def test_a_stopped_trial_and_the_stage_it_was_in_end_alike(tracker: Tracker):
    def trial(stage2_status: str) -> tuple[str, str, str]:
        trial = tracker.start_run("trial", EXPERIMENT)
        stage1 = tracker.start_run("stage1", EXPERIMENT, parent_run_id=trial)
        tracker.end_run(stage1, "FINISHED")
        stage2 = tracker.start_run("stage2", EXPERIMENT, parent_run_id=trial)
        if stage2_status != "RUNNING":
            tracker.end_run(stage2, stage2_status)
        return trial, stage1, stage2

    def statuses(*run_ids: str) -> list[str]:
        return [tracker.client.get_run(run_id).info.status for run_id in run_ids]

    # Stopped by ASHA: the stage it was in failed in its own process when its trial went away, or never ended.
    for stage2_status in ("FAILED", "RUNNING"):
        runs = trial(stage2_status)
        tracker.end_stopped(runs[0], "KILLED")
        assert statuses(*runs) == ["KILLED", "FINISHED", "KILLED"]
    # A crashed trial: the stage left running failed with it.
    runs = trial("RUNNING")
    tracker.end_stopped(runs[0], "FAILED")
    assert statuses(*runs) == ["FAILED", "FINISHED", "FAILED"]
    # Stopped by ASHA, then the trial's own process fails as Ray tears it down: its runs stay KILLED.
    runs = trial("RUNNING")
    tracker.end_stopped(runs[0], "KILLED")
    for run_id in (runs[2], runs[0]):
        tracker.fail_run(run_id)  # as owl2's trainer ends its runs on an error
    assert statuses(*runs) == ["KILLED", "FINISHED", "KILLED"]
    running = tracker.start_run("crashed", EXPERIMENT)
    tracker.fail_run(running)
    assert statuses(running) == ["FAILED"]


def test_system_metrics_are_sampled_into_a_run_until_finished(tracker: Tracker):
    import threading
    import time

    run_id = tracker.start_run("system", EXPERIMENT)
    sampler = tracking.SystemMetrics(tracker.tracking_uri, run_id, interval_s=0.05)
    sampler.start()
    deadline = time.monotonic() + 60
    while "system/cpu_utilization_percentage" not in tracker.client.get_run(run_id).data.metrics:
        assert time.monotonic() < deadline, "no system metrics after 60 s"
        time.sleep(0.05)
    sampler.finish()
    metrics = tracker.client.get_run(run_id).data.metrics
    assert 0 < metrics["system/system_memory_usage_megabytes"]
    assert 0 < metrics["system/system_memory_usage_percentage"] <= 100
    assert not [thread for thread in threading.enumerate() if thread.name == "SystemMetricsMonitor"]
    sampler.finish()  # twice is harmless


def test_system_metrics_interval_is_validated():
    assert TrackingConfig().system_metrics_s == 10.0
    with pytest.raises(ConfigError, match=r"tracking\.system_metrics_s must be >= 0"):
        TrackingConfig(system_metrics_s=-1)


# --------------------------------------------------------------------------------------------------
# Redaction, tags, fingerprints
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "hf_token", "HF_TOKEN", "apiKey", "api_key", "aws_secret_access_key", "password", "db.passwd", "token",
        "auth", "http_auth", "Authorization", "bearer", "sas_sig", "passphrase",
    ],
)  # fmt: skip
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key", ["tokenizer", "tokenizer_actors", "max_new_tokens_x", "monkey", "keyframe", "name", "author", "signal"]
)
def test_not_secret_keys(key):
    assert not is_secret_key(key)


def test_redact_keeps_numbers_and_settings():
    data = {
        "max_keys": 10,
        "num_tokens": 512,
        "use_token": True,
        "hf_token": None,
        "secrets": ["a", "b"],
        "path": "s3://bucket/key.json?X-Amz-Signature=abc&X-Amz-Date=1&x=2",
        "url": "https://ghp_xyz@github.com/org/repo.git",
    }
    assert redact(data) == {
        "max_keys": 10,
        "num_tokens": 512,
        "use_token": True,
        "hf_token": None,
        "secrets": ["***", "***"],
        "path": "s3://bucket/key.json?X-Amz-Signature=***&X-Amz-Date=1&x=2",
        "url": "https://***@github.com/org/repo.git",
    }
    assert data["secrets"] == ["a", "b"]  # a copy: the caller's config is untouched


def test_redact_text():
    text = "export HF_TOKEN=hf_abc\n  api_key: 'sk'\nmax_keys: 10\ntracking: http://a:b@h:1/x\ntokenizer: /m\n"
    expected = "export HF_TOKEN=***\n  api_key: ***\nmax_keys: 10\ntracking: http://***@h:1/x\ntokenizer: /m\n"
    assert redact_text(text) == expected


def test_redact_finds_credentials_inside_values():
    assert redact({"header": "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig"}) == {
        "header": "Authorization: Bearer ***"
    }
    assert redact("https://acct.blob.core.windows.net/c/x.tar?sv=2024&sig=Zm9vYmFy%3D&se=2027") == (
        "https://acct.blob.core.windows.net/c/x.tar?sv=2024&sig=***&se=2027"
    )
    assert redact_text("curl -H 'Authorization: Basic dXNlcjpwYXNzd29yZA=='\nauth: hunter22\n") == (
        "curl -H 'Authorization: Basic ***'\nauth: ***\n"
    )


def test_the_experiment_copy_in_checkpoints_holds_no_secrets():
    from owl2.config import load_experiment
    from owl2.train.trainer import experiment_yaml

    experiment = load_experiment(
        Path(__file__).resolve().parents[1] / "experiments" / "tiny_cpu" / "pipeline.yaml",
        ["tracking.tracking_uri=https://owl:hunter22@mlflow.example.com", "storage_path=s3://runs?sig=c2VjcmV0"],
    )
    text = experiment_yaml(experiment)
    assert "hunter22" not in text and "c2VjcmV0" not in text
    assert "https://***@mlflow.example.com" in text and "s3://runs?sig=***" in text


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "l": [{"x": 1}, {"y": 2}], "e": {}}) == {
        "a.b": 1,
        "a.c": [1, 2],
        "l.0.x": 1,
        "l.1.y": 2,
        "e": {},
    }


def test_run_tags():
    tags = run_tags("stage1", "a: 1\n", "f00")
    assert tags["owl2.stage"] == "stage1" and tags["owl2.data_fingerprint"] == "f00"
    assert tags["owl2.git_dirty"] in {"true", "false", "unknown"}
    commit = tags["owl2.git_commit"]
    assert commit == "unknown" or (len(commit) == 40 and int(commit, 16) >= 0)
    assert tags["owl2.config_hash"] != run_tags("stage1", "a: 2\n", "f00")["owl2.config_hash"]
    assert "owl2.stage" not in run_tags(None, "", None) and "owl2.data_fingerprint" not in run_tags(None, "", None)


def test_run_tags_without_git(monkeypatch):
    monkeypatch.setenv("PATH", "")
    tracking._git_state.cache_clear()
    try:
        tags = run_tags(None, "", None)
    finally:
        tracking._git_state.cache_clear()
    assert tags["owl2.git_commit"] == "unknown" and tags["owl2.git_dirty"] == "unknown"
    assert "mlflow.source.git.commit" not in tags


def test_data_fingerprint(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": 1}\n')
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "000.tar").write_bytes(b"x" * 10)
    sources = [
        SourceConfig(format="llava", path=str(data), image_root=str(tmp_path / "images")),
        SourceConfig(format="webdataset", path=[str(shards)], weight=0.5),
        SourceConfig(format="captions", path="s3://bucket/captions.parquet"),
    ]
    first = data_fingerprint(sources)
    assert first == data_fingerprint(sources) and len(first) == 16

    stat = data.stat()
    data.write_text('{"a": 2}\n')  # same size, same modification time: indistinguishable without reading
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data_fingerprint(sources) == first

    data.write_text('{"a": 22}\n')  # size changed
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = data_fingerprint(sources)
    assert second != first

    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched
    third = data_fingerprint(sources)
    assert third != second

    (shards / "001.tar").write_bytes(b"y")  # a new shard in a folder
    fourth = data_fingerprint(sources)
    assert fourth != third

    sources[2] = SourceConfig(format="captions", path="s3://bucket/captions-v2.parquet")
    assert data_fingerprint(sources) != fourth
    sources[1].weight = 1.0
    assert data_fingerprint(sources) != fourth
