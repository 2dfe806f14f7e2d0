"""Two-stage training on a local Ray cluster: loss falls, resume is exact, a killed worker recovers,
stage 2 starts from stage 1 at the higher resolution, and MLflow holds every run."""

import json
from pathlib import Path

import mlflow
import pytest
import ray.train
import torch
from safetensors.torch import load_file

from owl2.config import load_experiment
from owl2.errors import StageFailed
from owl2.model.vision import resample_position_embedding
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


def test_two_stage_pipeline_tracks_both_stages_and_raises_resolution(ray_cluster, world):
    # Stage 2 also answers the first items of the world's held-out suite at its checkpoint (rank 0).
    # A peak of 0.001 TFLOP/s stands in for a GPU's: the metrics then carry mfu next to model_flops_per_s.
    results = run_experiment(
        _experiment(world, "pipeline", "stages.stage2.eval.limit=4", "resources.peak_tflops=0.001")
    )
    assert [r.stage for r in results] == ["stage1", "stage2"]
    assert [_state(r)["step"] for r in results] == [4, 2]

    # Stage 2 starts from stage 1's last checkpoint, its positions resampled from 4x4 to 8x8 patches.
    stage1, stage2 = _weights(results[0]), _weights(results[1])
    assert stage1["vision.pos_embed"].shape == (1, 17, 64) and stage2["vision.pos_embed"].shape == (1, 65, 64)
    config2 = json.loads((Path(results[1].checkpoint.path) / "config.json").read_text())
    assert config2["vision"]["image_size"] == 112
    # Stage 1 froze the text side of the decoder; stage 2 moved it only by its two small steps.
    key = "decoder.layers.0.mlp.up_proj.weight"
    assert (stage1[key] - stage2[key]).abs().max() < 0.05
    expected = resample_position_embedding(stage1["vision.pos_embed"], 8)
    assert (expected - stage2["vision.pos_embed"]).abs().max() < 0.05

    # MLflow: the parent run and one child per stage, with metrics, params and artifacts.
    client = mlflow.MlflowClient(results[0].run_id and _tracking_uri(world))
    experiment = client.get_experiment_by_name("owl2-tiny-cpu")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "pipeline")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"stage1", "stage2"} and parent.info.status == "FINISHED"
    for name, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["owl2.stage"] == name and run.data.tags["owl2.checkpoint"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(
            range(1, {"stage1": 5, "stage2": 3}[name])
        )
        assert any(key.startswith("lr/vision.layer_") for key in run.data.metrics)
        flops = run.data.metrics["model_flops_per_s"]
        # Both logged; no order between them: the hardware figure runs the LM head on label positions only,
        # which on this tiny model (a 1,024-token head on 128-wide layers) outweighs the recomputation it adds.
        assert 0 < flops and 0 < run.data.metrics["hardware_flops_per_s"]
        assert run.data.metrics["mfu"] == pytest.approx(flops / 1e9)  # one worker at 1e9 FLOP/s
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"param_groups.json", "param_groups.txt"} <= artifacts

    # The eval section: metrics at the checkpoint step in MLflow and in Ray Train's report, predictions as artifacts.
    stage2_run = children["stage2"].info.run_id
    accuracy = client.get_metric_history(stage2_run, "eval/shapes/vqa/accuracy")
    assert [m.step for m in accuracy] == [2] and 0.0 <= accuracy[0].value <= 1.0
    assert {"eval/shapes/captions/cider", "eval/shapes/text/exact_match"} <= set(children["stage2"].data.metrics)
    assert results[1].metrics["eval/shapes/vqa/accuracy"] == pytest.approx(accuracy[0].value)
    assert not any(key.startswith("eval/") for key in children["stage1"].data.metrics)
    eval_artifacts = {a.path for a in client.list_artifacts(stage2_run, "eval/step_000002")}
    assert {"eval/step_000002/shapes_predictions.jsonl", "eval/step_000002/eval_table.txt"} <= eval_artifacts


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


def test_a_killed_worker_restarts_from_its_checkpoint_and_finishes(ray_cluster, world, tmp_path, capsys):
    write_plan(world / "runs", [Fault(run="killed-stage1", step=2, marker=str(tmp_path / "killed"))])
    result = run_experiment(_experiment(world, "killed", "max_failures=1"), stages=["stage1"])[0]
    assert (tmp_path / "killed").exists()
    # The terminal says what happened and where the stage goes on from.
    said = [line for line in capsys.readouterr().out.splitlines() if "resuming" in line]
    assert said == ["[stage1] worker 0 lost (its process or node died): resuming from step 2 (restart 1 of 1)"], said
    state = _state(result)
    assert state["step"] == 4 and state["resumed_at"] == [2]
    assert result.metrics["step"] == 4


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
