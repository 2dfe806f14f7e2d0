"""The driver: run an experiment's stages in order as Ray Train ``TorchTrainer`` runs, tracked in MLflow.

::

    parent MLflow run (the experiment): each stage's final loss, val_loss, eval scores and wall time
      +- child run "stage1"  <- TorchTrainer(name=<experiment>-stage1) -> last checkpoint
      +- child run "stage2"  <- TorchTrainer(name=<experiment>-stage2), starting from stage 1's checkpoint

Re-running an experiment under the same name resumes it: finished stages return their result at once,
an interrupted stage continues from its last checkpoint, and the MLflow runs are continued, not
duplicated.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from owl2.config import ConfigError, ExperimentConfig, to_dict
from owl2.train.sender import TrackingSender


@dataclass
class StageResult:
    stage: str
    checkpoint: Any  # ray.train.Checkpoint of the stage's last step
    metrics: dict[str, Any]
    run_id: str | None


def resolve_paths(experiment: ExperimentConfig, base: Path | None = None) -> ExperimentConfig:
    """Make every local path absolute (workers and Tune trials run in other directories); URIs stay."""
    base = base or Path.cwd()

    def absolute(path: str | None) -> str | None:
        if not path or "://" in path:
            return path
        return str((base / Path(path).expanduser()).resolve())

    experiment.storage_path = absolute(experiment.storage_path)
    for field in ("pretrained", "llama", "clip"):
        setattr(experiment.model, field, absolute(getattr(experiment.model, field)))
    for stage in experiment.stages.values():
        stage.init_from = absolute(stage.init_from)
        for data in [stage.data] + ([stage.validation.data] if stage.validation else []):
            data.tokenizer = absolute(data.tokenizer)
            for source in data.sources:
                paths = source.path
                source.path = [absolute(p) for p in paths] if isinstance(paths, list) else absolute(paths)
                source.image_root = absolute(source.image_root)
        if stage.eval is not None:
            stage.eval.data = absolute(stage.eval.data)
            stage.eval.image_root = absolute(stage.eval.image_root)
    return experiment


def preflight(experiment: ExperimentConfig, stages: list[str] | None = None) -> None:
    """The driver's checks of ``stages`` (default: all) that need no Ray: local data paths, tokenizers, the memory
    plan, ``init_from`` folders and eval suites; each raises a one-line :class:`ConfigError`."""
    check_stage_data(experiment, stages)
    check_tokenizers(experiment)
    check_memory_plan(experiment, stages)
    check_init_from(experiment, stages)
    check_evals(experiment, stages)


def check_stage_data(experiment: ExperimentConfig, stages: list[str] | None = None) -> None:
    """Every local data path, image root and tokenizer a stage names must exist: checked before Ray starts."""
    from owl2.data.preflight import check_data

    for name, stage in experiment.stages.items():
        if not stages or name in stages:
            check_data(stage.data, f"stages.{name}.data")
            if stage.validation is not None:
                check_data(stage.validation.data, f"stages.{name}.validation.data")


def check_tokenizers(experiment: ExperimentConfig) -> None:
    """The model's vocabulary must cover every stage's tokenizer: checked before any worker starts."""
    from owl2.config import ModelConfig
    from owl2.data.tokenizer import load_tokenizer

    if experiment.model.pretrained:
        return  # the released folder carries its own tokenizer and vocabulary
    vocab = ModelConfig.from_preset(experiment.model.preset, experiment.model.overrides).decoder.vocab_size
    for name, stage in experiment.stages.items():
        size = len(load_tokenizer(stage.data.tokenizer))
        if size > vocab:
            raise ConfigError(
                f"stages.{name}.data.tokenizer has {size} tokens but the model's vocabulary has {vocab}: set "
                f"model.overrides.decoder.vocab_size >= {size} or use the model's own tokenizer"
            )


def check_memory_plan(experiment: ExperimentConfig, stages: list[str] | None = None) -> None:
    """Each stage must fit on the workers' GPU by ``owl2 plan``'s estimate: checked before any worker starts,
    when the GPU is named (``resources.gpu``) and ``resources.ignore_memory_plan`` is off."""
    from owl2.plan.report import plan_stage

    resources = experiment.resources
    if not (resources.use_gpu and resources.gpu) or resources.ignore_memory_plan:
        return
    for name in experiment.stages:
        if stages and name not in stages:
            continue
        plan = plan_stage(experiment, name)
        if not plan.fits:
            raise ConfigError(
                f"stages.{name}: {plan.reason()}; see `owl2 plan`, or set resources.ignore_memory_plan=true to start "
                "it anyway"
            )


def check_evals(experiment: ExperimentConfig, stages: list[str] | None = None) -> None:
    """Each stage's eval suite must load, with its local images present: checked before any worker starts."""
    from owl2.train.evaluate import CheckpointEval

    for name, stage in experiment.stages.items():
        if stage.eval is not None and (not stages or name in stages):
            try:
                CheckpointEval(stage).items()
            except (FileNotFoundError, ValueError) as error:
                raise ConfigError(f"stages.{name}.eval: {error}") from error


def check_init_from(experiment: ExperimentConfig, stages: list[str] | None = None) -> None:
    """A stage's local ``init_from`` must be a model folder (config.json): checked before any worker starts."""
    for name, stage in experiment.stages.items():
        path = stage.init_from
        if path and "://" not in path and (not stages or name in stages) and not (Path(path) / "config.json").is_file():
            what = "does not exist" if not Path(path).exists() else "is not a checkpoint folder (no config.json)"
            raise ConfigError(f"stages.{name}.init_from {path} {what}")


def experiment_yaml(experiment: ExperimentConfig) -> str:
    """The resolved experiment as YAML, as MLflow and every checkpoint keep it: secrets (a password in a tracking
    URI, a signed URL) left out."""
    from owl2.tracking import redact

    return yaml.safe_dump(redact(to_dict(experiment)), sort_keys=False)


def run_experiment(
    experiment: ExperimentConfig,
    stages: list[str] | None = None,
    parent_run_id: str | None = None,
    params: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    progress: bool = True,
) -> list[StageResult]:
    """Run ``stages`` (default: all, in order); each starts from the previous stage's last checkpoint.

    ``parent_run_id`` nests the experiment's MLflow run (a sweep's trial); ``params`` are that run's MLflow
    params (a trial's swept values), by default the whole resolved config (it is the run's ``experiment.yaml``
    either way); ``callbacks`` go to every ``TorchTrainer`` (Tune's report forwarding); ``progress`` prints the
    rank-0 worker's progress lines here.
    """
    from owl2.runtime import ensure_ray
    from owl2.stall import StallWatchdog
    from owl2.tracking import Tracker, resolve_tracking_uri, run_tags
    from owl2.train.progress import ProgressPrinter, say

    experiment = resolve_paths(experiment)
    unknown = [name for name in stages or [] if name not in experiment.stages]
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; the experiment defines {list(experiment.stages)}")
    preflight(experiment, stages)
    ensure_ray()

    start = time.monotonic()
    config_yaml = experiment_yaml(experiment)
    tracking_uri = resolve_tracking_uri(experiment.tracking, experiment.storage_path)
    tracker = Tracker(tracking_uri)
    parent = tracker.start_run(
        experiment.name,
        experiment.tracking.experiment,
        parent_run_id=parent_run_id,
        tags=run_tags(None, config_yaml, None),
        resume=True,
    )
    tracker.log_params(parent, to_dict(experiment) if params is None else params)
    tracker.log_text(parent, config_yaml, "experiment.yaml")

    # What the driver logs once a stage has run goes through a sender: a tracking server that is away then delays
    # those calls (they are kept and sent when it is back) instead of failing a stage that has finished.
    sender = TrackingSender(say)
    results: list[StageResult] = []
    previous, failed = None, True
    try:
        with (
            ProgressPrinter() if progress else nullcontext() as printer,
            StallWatchdog(experiment.resources.stall_warning_s if progress else 0, say),
        ):
            for name, stage in experiment.stages.items():
                if stages and name not in stages:
                    continue
                init_from = stage.init_from or (previous.checkpoint.path if previous else None)
                queue = printer.queue if printer is not None else None
                result = run_stage(experiment, name, tracker, sender, parent, config_yaml, init_from, callbacks, queue)
                results.append(result)
                previous = result
                # After every stage: a later stage that fails leaves the earlier ones' results in the runs table.
                sender.submit(partial(tracker.log_headline, parent, list(experiment.stages)))
        failed = False
    finally:
        sender.submit(partial(tracker.add_wall_time, parent, time.monotonic() - start))
        sender.submit(partial(tracker.fail_run, parent) if failed else partial(tracker.end_run, parent, "FINISHED"))
        sender.close()
    return results


def run_stage(
    experiment: ExperimentConfig,
    name: str,
    tracker: Any,
    sender: TrackingSender,
    parent_run_id: str,
    config_yaml: str,
    init_from: str | None,
    callbacks: list[Any] | None = None,
    progress: Any = None,
) -> StageResult:
    """One stage as a ``TorchTrainer`` run named ``<experiment>-<stage>`` (re-running it resumes it);
    ``progress`` is the queue that carries the rank-0 worker's progress lines to this terminal; ``sender`` makes
    the MLflow calls that follow the training."""
    import ray.train

    from owl2.tracking import data_fingerprint, run_tags
    from owl2.train.job import StageJob
    from owl2.train.progress import say
    from owl2.train.retry import fit_with_restarts

    stage = experiment.stages[name]
    run_id = tracker.start_run(
        name,
        experiment.tracking.experiment,
        parent_run_id=parent_run_id,
        tags=run_tags(name, config_yaml, data_fingerprint(stage.data.sources)),
        resume=True,
    )
    tracker.log_params(
        run_id,
        {
            "stage": to_dict(stage),
            "model": to_dict(experiment.model),
            "resources": to_dict(experiment.resources),
            "init_from": init_from or "",
        },
    )
    job = StageJob(
        experiment=experiment,
        stage_name=name,
        experiment_yaml=config_yaml,
        init_from=ray.train.Checkpoint(init_from) if init_from else None,
        tracking_uri=tracker.tracking_uri,
        run_id=run_id,
        progress=progress,
    )
    start, failed = time.monotonic(), True
    try:
        result = fit_with_restarts(
            lambda: stage_trainer(job, callbacks).fit(),  # Ray
            name,
            experiment.max_failures,
            experiment.storage_path,
            job.run_name,
            say=say,
        )
        if result.checkpoint is None:
            raise RuntimeError(f"stage {name} finished without a checkpoint")
        failed = False
    finally:
        sender.submit(partial(tracker.add_wall_time, run_id, time.monotonic() - start))
        if failed:
            sender.submit(partial(tracker.fail_run, run_id))
        else:
            sender.submit(partial(tracker.set_tags, run_id, {"owl2.checkpoint": result.checkpoint.path}))
            sender.submit(partial(tracker.end_run, run_id, "FINISHED"))
    return StageResult(name, result.checkpoint, dict(result.metrics or {}), run_id)


def stage_trainer(job: Any, callbacks: list[Any] | None = None) -> Any:
    """The stage's ``TorchTrainer``; its run name makes a second ``fit()`` resume from the last checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from owl2.train.loop import train_stage

    resources = job.experiment.resources
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return TorchTrainer(
        train_stage,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(  # Ray
            num_workers=resources.num_workers, use_gpu=resources.use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(  # Ray
            name=job.run_name,
            storage_path=job.experiment.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Restarts are the driver's (owl2.train.retry): it knows which errors a restart cannot fix.
            failure_config=ray.train.FailureConfig(max_failures=0),
            callbacks=callbacks or [],
        ),
    )
