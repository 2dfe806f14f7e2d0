"""``owl2 demo``: the whole system on a laptop CPU, from nothing to a trained, evaluated, tracked model.

Synthetic shapes world -> stage 1 and stage 2 of ``experiments/tiny_cpu/pipeline.yaml`` through Ray Data
and Ray Train on a local Ray -> the held-out evaluation -> a summary table, ``summary.json`` and the
command that opens MLflow on 127.0.0.1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# Smaller than the shipped recipe: for tests of the demo's plumbing, not for its accuracy.
QUICK = [
    "stages.stage1.max_steps=8",
    "stages.stage1.checkpoint_every=8",
    "stages.stage1.log_every=2",
    "stages.stage1.optim.warmup_steps=1",
    "stages.stage1.validation.every=8",
    "stages.stage2.max_steps=6",
    "stages.stage2.checkpoint_every=6",
    "stages.stage2.log_every=2",
    "stages.stage2.optim.warmup_steps=1",
    "stages.stage2.validation.every=6",
]


def run_demo(
    out: str | Path,
    quick: bool = False,
    overrides: list[str] | None = None,
    train_images: int = 6000,
    heldout_images: int = 200,
    eval_limit: int | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out``; returns (and writes to ``out/summary.json``) the headline numbers."""
    from owl2.config import ConfigError, load_experiment
    from owl2.data.world import generate_world
    from owl2.eval.runner import run_eval
    from owl2.eval.suite import Suite
    from owl2.tracking import Tracker, experiment_url, resolve_tracking_uri
    from owl2.train.trainer import resolve_paths, run_experiment

    start = time.perf_counter()
    out = Path(out).resolve()
    settings = [f"storage_path={out / 'runs'}", *(QUICK if quick else []), *(overrides or [])]
    experiment = resolve_paths(load_experiment(EXPERIMENTS / "tiny_cpu" / "pipeline.yaml", settings), base=out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {out}: cannot create it ({error.strerror})") from None
    world = out / "data" / "shapes_world"
    print(f"[demo] writing the synthetic shapes world to {world}", flush=True)
    generate_world(world, seed=0, num_train=train_images, num_heldout=heldout_images)

    name = experiment.name
    print(
        f"[demo] training {name}: {', '.join(experiment.stages)} on {experiment.resources.num_workers} workers",
        flush=True,
    )
    results = run_experiment(experiment)
    checkpoint = results[-1].checkpoint.path

    print(f"[demo] evaluating {checkpoint} on the held-out split", flush=True)
    evaluation = run_eval(checkpoint, "shapes", world, limit=eval_limit)
    rows = {row.metric: row for row in evaluation.rows}
    vqa = rows["shapes/vqa/accuracy"]
    tracking_uri = resolve_tracking_uri(experiment.tracking, experiment.storage_path)
    experiment_id = Tracker(tracking_uri).experiment_id(experiment.tracking.experiment)
    summary = {
        "wall_seconds": round(time.perf_counter() - start, 1),
        "vqa_accuracy": vqa.value,
        "vqa_chance": vqa.chance,
        "vqa_accuracy_by_type": {
            key.split("/")[2]: row.value for key, row in rows.items() if key.count("/") == 3 and "/vqa/" in key
        },
        "caption_cider": rows["shapes/captions/cider"].value,
        "text_exact_match": rows["shapes/text/exact_match"].value,
        "final_loss": {result.stage: result.metrics.get("loss") for result in results},
        "checkpoint": checkpoint,
        "mlflow_tracking_uri": tracking_uri,
        "mlflow_experiment": experiment.tracking.experiment,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(Suite.table(evaluation.rows, title="\n[demo] held-out results"), flush=True)
    print(
        f"\n[demo] done in {summary['wall_seconds']:.0f} s; VQA accuracy {summary['vqa_accuracy']:.3f} vs chance "
        f"{summary['vqa_chance']:.3f}; summary in {out / 'summary.json'}\n"
        f"[demo] browse the runs: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000\n"
        f"[demo] then open {experiment_url('http://127.0.0.1:5000', experiment_id)}",
        flush=True,
    )
    return summary
