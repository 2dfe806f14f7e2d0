"""The main job end to end on a small budget: synthetic world, both stages on local Ray, evaluation, MLflow."""

import json

import mlflow
import pytest

from owl2.demo import run_demo

SUMMARY_KEYS = {
    "wall_seconds",
    "vqa_accuracy",
    "vqa_chance",
    "caption_cider",
    "text_exact_match",
    "mlflow_tracking_uri",
}


@pytest.mark.slow
def test_quick_demo_trains_both_stages_evaluates_and_tracks_everything(ray_cluster, tmp_path):
    summary = run_demo(tmp_path / "demo", quick=True, train_images=48, heldout_images=8, eval_limit=8)

    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written == summary and SUMMARY_KEYS <= set(summary)
    assert 0.0 <= summary["vqa_accuracy"] <= 1.0 and 0.25 < summary["vqa_chance"] < 0.5
    assert summary["caption_cider"] >= 0.0 and 0.0 <= summary["text_exact_match"] <= 1.0

    client = mlflow.MlflowClient(summary["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name(summary["mlflow_experiment"])
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    parent = runs["tiny-cpu"]
    assert parent.info.status == "FINISHED"
    for stage in ("stage1", "stage2"):
        run = runs[stage]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert "val_loss" in run.data.metrics
    # Stage 1 trains the whole (random) tiny model on captions: its loss must fall within the few quick steps.
    losses = [m.value for m in client.get_metric_history(runs["stage1"].info.run_id, "loss")]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.5
    evaluation = runs["eval-shapes"]  # nested under the stage run that wrote the checkpoint
    assert evaluation.data.tags["mlflow.parentRunId"] == runs["stage2"].info.run_id
    assert "shapes/vqa/accuracy" in evaluation.data.metrics
