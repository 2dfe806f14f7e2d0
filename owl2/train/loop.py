"""The per-worker training loop of one stage: set up -> (resume) -> fit -> checkpoint, on Ray Train.

Ray-specific lines are marked ``# Ray``. The driver hands each worker a :class:`~owl2.train.job.StageJob`;
:func:`train_stage` builds a :class:`StageRun` from it and repeats two named steps until the stage is done:

* :meth:`StageRun.train_step`: one optimizer step over ``accumulation`` micro-batches
  (:class:`~owl2.train.step.TrainStep`: no host sync; a NaN/inf gradient norm skips the update);
* :meth:`StageRun.after_step`: the logging window's metrics, validation (``val_loss``), the checkpoint
  evaluation (rank 0), then a checkpoint or a plain report.

Each worker builds its own shard of the Ray Data pipeline (:class:`ShardStream`), reading only its own files:
the shard and its order are functions of the seed, the epoch and the world size, so a restart continues
exactly after the last sample a checkpoint recorded.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from owl2.config import ModelConfig, ModelInitConfig, ResourcesConfig
from owl2.data.batch import Batch, Collator, iterate
from owl2.data.pipeline import encoded
from owl2.data.sample import SkipStats
from owl2.errors import Unrecoverable
from owl2.plan.flops import FlopModel
from owl2.plan.gpus import peak_tflops
from owl2.train import checkpoint as ckpt
from owl2.train import parallel
from owl2.train.evaluate import CheckpointEval, eval_due, log_outcome
from owl2.train.faults import FaultPlan
from owl2.train.job import StageJob
from owl2.train.optim import (
    apply_trainable,
    build_optimizer,
    format_group_table,
    group_table_rows,
    verify_optimizer_setup,
    warmup_cosine,
)
from owl2.train.parallel import unwrap
from owl2.train.progress import emit
from owl2.train.sender import TrackingSender
from owl2.train.step import TrainStep
from owl2.train.validate import HeldOut, should_validate
from owl2.train.window import LogWindow, window_metrics


def train_stage(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of one stage; ``config["job"]`` is its :class:`StageJob`."""
    run = StageRun(config["job"])
    while run.state.step < run.stage.max_steps:
        run.train_step()
        run.after_step()
    run.close_tracking()


def initial_model(init: ModelInitConfig, seed: int) -> Any:
    """The first stage's starting weights: a released/owl2 folder, LLaMA-2 + CLIP, or a random preset."""
    from owl2.model import Owl2Config, Owl2ForCausalLM
    from owl2.model.build import build_from_llama_and_clip

    if init.pretrained:
        return Owl2ForCausalLM.from_pretrained(init.pretrained, overrides=init.overrides)
    spec = ModelConfig.from_preset(init.preset, init.overrides)
    if init.llama:
        return build_from_llama_and_clip(init.llama, init.clip, spec=spec)
    torch.manual_seed(seed)
    return Owl2ForCausalLM(Owl2Config.from_spec(spec))


def starting_model(job: StageJob, resume: Any) -> Any:
    """The weights this worker starts from: its own checkpoint when resuming, else ``init_from``, else the
    model section's initial weights."""
    start_from = resume or job.init_from
    if start_from is None:
        return initial_model(job.experiment.model, job.experiment.seed)
    from owl2.model import Owl2ForCausalLM

    with start_from.as_directory() as folder:
        return Owl2ForCausalLM.from_pretrained(folder)


def device_peak_tflops(resources: ResourcesConfig) -> float | None:
    """One worker's dense bf16 peak: ``resources.peak_tflops``, else the table's for ``resources.gpu``."""
    if resources.peak_tflops:
        return resources.peak_tflops
    return peak_tflops(resources.gpu) if resources.gpu and resources.use_gpu else None


def _all_gather(value: Any) -> list[Any]:
    if not dist.is_available() or not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class ShardStream:
    """This worker's batches, pass after pass, tracking the :class:`~owl2.train.checkpoint.DataPosition`.

    Each pass over the data pays the pipeline's start-up while training waits (10-15 s on 2 CPUs). The first
    pass streams one epoch and counts its rows; the next one streams every epoch the stage still needs, so a
    stage of many short epochs waits twice, not once an epoch. Batches run across the epochs of a pass.
    """

    def __init__(
        self,
        job: StageJob,
        spec: ModelConfig,
        position: ckpt.DataPosition,
        rank: int,
        world_size: int,
        steps_done: Callable[[], int],
    ) -> None:
        self.job, self.stage, self.spec = job, job.stage, spec
        self.position = position
        self.rank, self.world_size = rank, world_size
        self.steps_done = steps_done  # the next pass's size depends on the optimizer steps still to do
        self.collator = Collator.of(self.stage.data, spec.decoder.pad_token_id, spec.tokens_per_image)
        data = self.stage.data
        self.stats = SkipStats(max_fraction=data.max_bad_fraction, min_records=data.min_records_for_check)
        self._batches = self._stream()

    def next(self) -> Batch:
        batch = next(self._batches)
        self.position.epoch, self.position.last_key = batch.epoch, batch.last_key
        return batch

    def _stream(self) -> Iterator[Batch]:
        position = self.position
        while True:
            current = position.current  # each pass replaces it
            fresh = position.last_key < 0
            epochs = current.end - position.epoch
            dataset = encoded(
                self.stage.data,
                self.spec.tokens_per_image,
                position.epoch,
                self.rank,
                self.world_size,
                position.last_key,
                epochs,
            )
            for batch in iterate(dataset, self.collator, self.stage.micro_batch_size, self.stats):
                current.rows += len(batch.ids)
                yield batch
            if not current.rows and fresh:
                raise Unrecoverable(
                    f"stage {self.job.stage_name}: worker {self.rank} got no usable sample from its data shard"
                )
            self._next_pass()

    def _next_pass(self) -> None:
        """Size the next pass from the rows the finished one held: every epoch the stage still needs."""
        current = self.position.current
        needed = (self.stage.max_steps - self.steps_done()) * self.job.accumulation * self.stage.micro_batch_size
        rows, span = current.rows, current.end - current.first
        epochs = max(1, math.ceil(needed * span / rows)) if rows else 1
        self.position.epoch, self.position.last_key = current.end, -1
        self.position.current = ckpt.DataPass(current.end, current.end + epochs, 0)


class StageRun:
    """One worker's stage: the wrapped model, optimizer, schedule, data stream, tracking and train state."""

    def __init__(self, job: StageJob) -> None:
        import ray.train
        import ray.train.torch

        self.job, self.stage = job, job.stage
        context = ray.train.get_context()  # Ray
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()  # Ray
        self.dtype = torch.bfloat16 if parallel.use_bf16(self.stage, self.device) else torch.float32
        # Ray: set when restarting after a failure or re-running the run name; one that fails verification gives
        # way to the run's previous checkpoint.
        resume = ckpt.usable(ray.train.get_checkpoint())
        self._build_model(starting_model(job, resume))
        self._build_optimizer(resume)
        self.spec: ModelConfig = unwrap(self.wrapped).config.spec
        stage = self.stage
        self.flop_model = FlopModel(self.spec, stage.trainable, stage.image_size, stage.activation_checkpointing)
        self.peak_tflops = device_peak_tflops(job.experiment.resources)
        position = self.state.position(self.rank, self.world_size)
        self.data = ShardStream(job, self.spec, position, self.rank, self.world_size, lambda: self.state.step)
        if self.rank == 0:  # the stage's counts so far, once: the other ranks' new records add to them when merged
            self.data.stats.carry(self.state.records_seen, self.state.skipped)
        self.stepper = TrainStep(
            self.wrapped,
            self.optimizer,
            accumulation=job.accumulation,
            grad_clip=stage.optim.grad_clip,
            device=self.device,
            dtype=self.dtype,
            nonfinite_steps=self.state.nonfinite_steps,
        )
        self.window = LogWindow(self.device)
        self.learning_rates: list[float] = []
        self.val_loss: float | None = None
        self.held_out = self._held_out()
        # Generation-based scores (stage.eval) on rank 0 only: the config refuses them under FSDP2.
        self.evaluator = CheckpointEval(self.stage) if self.stage.eval is not None and self.rank == 0 else None
        self.faults = FaultPlan.load(job.experiment.storage_path, job.run_name)
        # Rank 0's MLflow calls run on a thread of their own: a tracking server that goes away never stops training.
        self.sender = TrackingSender(lambda line: emit(job.progress, line)) if self.rank == 0 and job.run_id else None
        self.system_metrics: Any = None
        self.tracker = self._tracker()

    # ------------------------------------------------------------------ set-up
    def _build_model(self, model: Any) -> None:
        # From stage 1's 224 px to stage 2's 448 px: the learned position table is resampled.
        model.set_image_size(self.stage.image_size)
        apply_trainable(model, self.stage.trainable)
        # bf16 stages keep frozen weights in bf16 (no fp32 copy, no per-forward cast), fp32 masters for the rest.
        parallel.prepare_precision(model, self.stage, self.device)
        model.train()
        # DDP or FSDP2, with activation checkpointing and per-layer torch.compile if asked (compile: auto is on for
        # GPUs). FSDP2 replaces the parameters by shards, so the optimizer is built from the wrapped model, and a
        # resumed optimizer state is loaded into it afterwards.
        self.wrapped = parallel.wrap(model, self.stage, self.device)

    def _build_optimizer(self, resume: Any) -> None:
        stage = self.stage
        self.optimizer, self.groups = build_optimizer(self.wrapped, stage.optim)
        self.scheduler = warmup_cosine(
            self.optimizer, stage.optim.warmup_steps, stage.max_steps, stage.optim.min_lr_ratio
        )
        self.state = ckpt.TrainState(stage=self.job.stage_name)
        if resume is not None:
            with resume.as_directory() as folder:
                self.state = ckpt.load_training_state(folder, self.optimizer, self.scheduler, model=self.wrapped)
            self.state.resumed_at.append(self.state.step)
        verify_optimizer_setup(self.wrapped, self.optimizer, stage.trainable)

    def _held_out(self) -> HeldOut | None:
        if self.stage.validation is None:
            return None
        spec = self.spec
        return HeldOut(
            self.stage.validation, spec.tokens_per_image, spec.decoder.pad_token_id, self.rank, self.world_size
        )

    def _tracker(self) -> Any:
        if self.rank != 0 or not self.job.run_id:
            return None
        from owl2.tracking import SystemMetrics, Tracker

        tracker = Tracker(self.job.tracking_uri)
        if self.state.step == 0:
            table = format_group_table(self.groups)
            emit(self.job.progress, f"[{self.job.stage_name}] parameter groups\n{table}")
            rows, run_id = group_table_rows(self.groups), self.job.run_id
            self.sender.submit(lambda: tracker.log_dict(run_id, {"groups": rows}, "param_groups.json"))
            self.sender.submit(lambda: tracker.log_text(run_id, table, "param_groups.txt"))
        # CPU, memory and (with nvidia-ml-py) every GPU of this node, sampled on a thread of MLflow's; started and
        # stopped on the sender's thread, so a tracking server that is away delays the samples, never training.
        interval = self.job.experiment.tracking.system_metrics_s
        if interval > 0:
            self.system_metrics = SystemMetrics(self.job.tracking_uri, self.job.run_id, interval)
            self.sender.submit(self.system_metrics.start)
        return tracker

    def close_tracking(self) -> None:
        """At the end of the stage: stop the system metrics, then wait for rank 0's queued MLflow calls."""
        if self.system_metrics is not None:
            self.sender.submit(self.system_metrics.finish)
        if self.sender is not None:
            self.sender.close()

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> None:
        """Forward and backward over ``accumulation`` micro-batches, then clip and step, or skip the update if
        the gradient norm is not finite (the same decision on every rank). Never waits for the device."""
        take = self.faults.mid_step(self.data.next, self.state.step + 1, self.rank, self.job.accumulation)
        self.stepper.run(take, self.window, self.flop_model)
        self.learning_rates = [group["lr"] for group in self.optimizer.param_groups]  # the rates this step used
        self.scheduler.step()  # skipped steps too: the schedule follows the step count
        self.state.step += 1

    def _check_nonfinite(self) -> None:
        """Stop once more steps were skipped than ``stage.max_nonfinite_steps`` allows. ``state.nonfinite_steps``
        is read from the device at logging windows and checkpoints only, so the error comes up to
        ``log_every`` steps after the step that crossed the limit."""
        if self.state.nonfinite_steps > self.stage.max_nonfinite_steps:
            raise Unrecoverable(
                f"stage {self.job.stage_name}: {self.state.nonfinite_steps} steps had a NaN/inf loss (limit "
                f"{self.stage.max_nonfinite_steps}); lower the learning rate or check the data"
            )

    # ------------------------------------------------------------------ after the step: metrics, checkpoint
    def after_step(self) -> None:
        step, stage = self.state.step, self.stage
        logging = step % stage.log_every == 0 or step == stage.max_steps
        checkpointing = step % stage.checkpoint_every == 0 or step == stage.max_steps
        metrics = self._window_metrics() if logging else None
        if self.held_out is not None and (logging or checkpointing):
            # Every report carries val_loss (the last value between evaluations): Tune's schedulers need it.
            metrics = {**(metrics or {"step": step}), "val_loss": self._validate()}
        evaluating = checkpointing and eval_due(stage, step)
        if evaluating and self.evaluator is not None:  # rank 0's: the other ranks go on to the checkpoint
            metrics = {**(metrics or {"step": step}), **self._evaluate()}
        if evaluating:
            self.faults.fire("during_eval", step, self.rank)
        if metrics is not None:
            metrics["stage_index"] = self.job.stage_index
        if checkpointing:
            self._checkpoint(metrics or {"step": step})
            self.faults.fire("after_checkpoint", step, self.rank)
        elif metrics is not None:
            self._report(metrics, None)
            self.faults.fire("after_report", step, self.rank)

    def _window_metrics(self) -> dict[str, float]:
        metrics = window_metrics(
            self.window,
            self.state,
            self.data.stats,
            self.learning_rates,
            self.groups,
            self.stepper.nonfinite,
            _all_gather,
            self.peak_tflops,
            parallel.peak_memory_gb(self.device),
        )
        self._check_nonfinite()
        self.window = LogWindow(self.device)
        return metrics

    def _validate(self) -> float:
        if should_validate(self.state.step, self.stage.max_steps, self.stage.validation) or self.val_loss is None:
            self.val_loss = self.held_out.loss(self.wrapped, self.device, self.dtype)
        return self.val_loss

    def _evaluate(self) -> dict[str, float]:
        """Rank 0 answers the eval suite; the other ranks go on to the checkpoint and wait in its first
        collective meanwhile."""
        outcome = self.evaluator.run(unwrap(self.wrapped), self.state.step, self.dtype)
        if self.tracker is not None:
            tracker, run_id, suite = self.tracker, self.job.run_id, self.stage.eval.suite
            self.sender.submit(lambda: log_outcome(tracker, run_id, outcome, suite))
        emit(self.job.progress, f"[{self.job.stage_name}] {outcome.headline}")
        return outcome.metrics

    def _checkpoint(self, metrics: dict[str, Any]) -> None:
        import ray.train

        self.state.nonfinite_steps = self.stepper.nonfinite_steps()  # a checkpoint waits for the device anyway
        self._check_nonfinite()
        positions, stats = zip(*_all_gather((self.data.position, self.data.stats)), strict=True)
        self.state.record_positions(list(positions))
        self.state.record_skips(SkipStats.total(stats))  # exact here: a checkpoint need not be a logging step
        # Every rank takes part: under FSDP2 these gather the full states to rank 0.
        model_state = parallel.model_state_for_checkpoint(self.wrapped)
        optimizer_state = parallel.optimizer_state_for_checkpoint(self.wrapped, self.optimizer)
        with tempfile.TemporaryDirectory() as scratch:
            checkpoint = None
            if self.rank == 0:
                ckpt.check_finite(model_state, optimizer_state)
                folder = ckpt.save(
                    Path(scratch) / "checkpoint",
                    unwrap(self.wrapped),
                    optimizer_state,
                    self.scheduler,
                    self.state,
                    self.job.experiment_yaml,
                    model_state=model_state,
                )
                checkpoint = ray.train.Checkpoint.from_directory(str(folder))
            self.faults.fire("during_save", self.state.step, self.rank)
            self._report(metrics, checkpoint)

    def _report(self, metrics: dict[str, Any], checkpoint: Any) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint)  # Ray: a barrier; every worker calls it equally often
        if self.tracker is not None:
            tracker, run_id, step = self.tracker, self.job.run_id, self.state.step
            self.sender.submit(lambda: tracker.log_metrics(run_id, metrics, step=step))
            self._print_progress(metrics)

    def _print_progress(self, metrics: dict[str, Any]) -> None:
        if "loss" not in metrics:
            return
        stage, step, total = self.job.stage_name, int(metrics["step"]), self.stage.max_steps
        rate = metrics["samples_per_s"]
        remaining = (total - step) * self.stage.global_batch_size / rate if rate > 0 else math.nan
        compute = (
            f"MFU {metrics['mfu']:.1%}" if "mfu" in metrics else f"{metrics['model_flops_per_s'] / 1e12:.3g} TFLOP/s"
        )
        emit(
            self.job.progress,
            f"[{stage}] step {step}/{total}  loss {metrics['loss']:.4f}  {rate:.1f} samples/s  "
            f"{metrics['tokens_per_s']:.0f} tok/s  {metrics['images_per_s']:.1f} img/s  {compute}  "
            f"ETA {remaining:.0f}s",
        )
