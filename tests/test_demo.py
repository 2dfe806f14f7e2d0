"""The main job end to end on a small budget: synthetic world, both stages of the shipped tiny-cpu pipeline on
local Ray (two workers), stage 2 at the higher resolution from stage 1's checkpoint, evaluation, MLflow."""

import json
from pathlib import Path

import mlflow
import pytest
from safetensors.torch import load_file

from owl2.demo import run_demo
from owl2.model.vision import resample_position_embedding

SUMMARY_KEYS = {
    "wall_seconds",
    "vqa_accuracy",
    "vqa_chance",
    "caption_cider",
    "text_exact_match",
    "mlflow_tracking_uri",
}


def _checkpoint(run):
    return Path(run.data.tags["owl2.checkpoint"])


@pytest.mark.slow
def test_quick_demo_trains_both_stages_evaluates_and_tracks_everything(ray_cluster, tmp_path):
    # Stage 2 also answers the first items of the world's held-out suite at its checkpoint (rank 0). A peak of
    # 0.001 TFLOP/s stands in for a GPU's: the metrics then carry mfu next to model_flops_per_s. System metrics
    # are sampled often enough for these short stages to get some.
    overrides = ["stages.stage2.eval.limit=4", "resources.peak_tflops=0.001", "tracking.system_metrics_s=0.2"]
    summary = run_demo(
        tmp_path / "demo", quick=True, overrides=overrides, train_images=48, heldout_images=8, eval_limit=8
    )

    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written == summary and SUMMARY_KEYS <= set(summary)
    assert 0.0 <= summary["vqa_accuracy"] <= 1.0 and 0.25 < summary["vqa_chance"] < 0.5
    assert summary["caption_cider"] >= 0.0 and 0.0 <= summary["text_exact_match"] <= 1.0

    # MLflow: the parent run and one child per stage, with metrics, params and artifacts.
    client = mlflow.MlflowClient(summary["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name(summary["mlflow_experiment"])
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    parent = runs["tiny-cpu"]
    assert parent.info.status == "FINISHED"
    for stage, steps in (("stage1", 8), ("stage2", 6)):
        run = runs[stage]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["owl2.stage"] == stage and "val_loss" in run.data.metrics
        assert json.loads((_checkpoint(run) / "state.json").read_text())["step"] == steps
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == list(range(2, steps + 1, 2))  # log_every=2
        assert any(key.startswith("lr/vision.layer_") for key in run.data.metrics)
        flops = run.data.metrics["model_flops_per_s"]
        # Both logged; no order between them: the hardware figure runs the LM head on label positions only,
        # which on this tiny model (a 1,024-token head on 128-wide layers) outweighs the recomputation it adds.
        assert 0 < flops and 0 < run.data.metrics["hardware_flops_per_s"]
        assert run.data.metrics["mfu"] == pytest.approx(flops / 2e9)  # two workers at 1e9 FLOP/s each
        assert {"param_groups.json", "param_groups.txt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # Stage 1 trains the whole (random) tiny model on captions: its loss must fall within the few quick steps.
    losses = [m.value for m in client.get_metric_history(runs["stage1"].info.run_id, "loss")]
    assert losses[-1] < losses[0] - 0.5

    # Stage 2 starts from stage 1's last checkpoint, its positions resampled from 4x4 to 8x8 patches, and moved
    # the decoder only by its few small steps.
    stage1 = load_file(_checkpoint(runs["stage1"]) / "model.safetensors")
    stage2 = load_file(_checkpoint(runs["stage2"]) / "model.safetensors")
    assert stage1["vision.pos_embed"].shape == (1, 17, 64) and stage2["vision.pos_embed"].shape == (1, 65, 64)
    config2 = json.loads((_checkpoint(runs["stage2"]) / "config.json").read_text())
    assert config2["vision"]["image_size"] == 112
    key = "decoder.layers.0.mlp.up_proj.weight"
    assert (stage1[key] - stage2[key]).abs().max() < 0.05
    expected = resample_position_embedding(stage1["vision.pos_embed"], 8)
    assert (expected - stage2["vision.pos_embed"]).abs().max() < 0.05

    # The stage's eval section: metrics at the checkpoint step, predictions as artifacts; none in stage 1.
    stage2_run = runs["stage2"].info.run_id
    accuracy = client.get_metric_history(stage2_run, "eval/shapes/vqa/accuracy")
    assert [m.step for m in accuracy] == [6] and 0.0 <= accuracy[0].value <= 1.0
    assert {"eval/shapes/captions/cider", "eval/shapes/text/exact_match"} <= set(runs["stage2"].data.metrics)
    assert not any(key.startswith("eval/") for key in runs["stage1"].data.metrics)
    eval_artifacts = {a.path for a in client.list_artifacts(stage2_run, "eval/step_000006")}
    assert {"eval/step_000006/shapes_predictions.jsonl", "eval/step_000006/eval_table.txt"} <= eval_artifacts

    # The demo's own held-out evaluation after training, nested under the stage run that wrote the checkpoint.
    evaluation = runs["eval-shapes"]
    assert evaluation.data.tags["mlflow.parentRunId"] == runs["stage2"].info.run_id
    assert "shapes/vqa/accuracy" in evaluation.data.metrics

    # What MLflow's UI compares: a model-training experiment whose parent rows carry each stage's final metrics,
    # its eval scores, the final checkpoint's evaluation and the wall time, as the columns owl2's link opens; the
    # stage runs carry system metrics.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    headline = parent.data.metrics
    for stage in ("stage1", "stage2"):
        for key in ("loss", "val_loss", "wall_time_s"):
            assert headline[f"{stage}/{key}"] == runs[stage].data.metrics[key]
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
            runs[stage].data.metrics
        )
    assert headline["stage2/eval/shapes/vqa/accuracy"] == accuracy[0].value and "stage2/eval/time_s" not in headline
    assert headline["wall_time_s"] > headline["stage1/wall_time_s"] + headline["stage2/wall_time_s"] > 0
    assert headline["eval/shapes/vqa/accuracy"] == evaluation.data.metrics["shapes/vqa/accuracy"]
    columns = json.loads(experiment.tags["mlflow.sharedViewState.owl2"])["selectedColumns"]
    assert {f"metrics.`{key}`" for key in headline} <= set(columns)
