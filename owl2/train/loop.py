"""The per-worker training loop of one stage: set up -> (resume) -> fit -> checkpoint, on Ray Train.

Ray-specific lines are marked ``# Ray``. Each worker builds its own shard of the Ray Data pipeline
(``pipeline.encoded(..., rank, world_size, after_key)``): the shard and its order are functions of the
seed and epoch, so a restart continues exactly after the last sample a checkpoint recorded.

A stage may also compute a held-out ``val_loss`` (``validation``: every worker, every ``validation.every``
steps) and, at checkpoint steps, answer a small benchmark suite by generation (``eval``: rank 0 only, see
:mod:`owl2.train.evaluate`); both join that step's report.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from owl2.config import ExperimentConfig, ModelConfig, ModelInitConfig, StageConfig, build
from owl2.data.pipeline import Collator, encoded, iterate
from owl2.data.sample import SkipStats
from owl2.train import checkpoint as ckpt
from owl2.train import parallel
from owl2.train.evaluate import CheckpointEval, log_outcome
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
from owl2.train.validate import HeldOut, should_validate


def initial_model(init: ModelInitConfig, seed: int) -> Any:
    """The first stage's starting weights: a released/owl2 folder, LLaMA-2 + CLIP, or a random preset."""
    from owl2.model import Owl2Config, Owl2ForCausalLM
    from owl2.model.build import build_from_llama_and_clip

    if init.pretrained:
        return Owl2ForCausalLM.from_pretrained(init.pretrained)
    spec = ModelConfig.from_preset(init.preset, init.overrides)
    if init.llama:
        return build_from_llama_and_clip(init.llama, init.clip, spec=spec)
    torch.manual_seed(seed)
    return Owl2ForCausalLM(Owl2Config.from_spec(spec))


def _device() -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device()  # Ray


def _all_gather(value: Any) -> list[Any]:
    if not dist.is_available() or not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def train_stage(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the stage ``loop_config["stage"]`` (see ``trainer.run_stage``)."""
    import ray.train
    import ray.train.torch

    experiment = build(ExperimentConfig, loop_config["experiment"])
    stage_name: str = loop_config["stage"]
    stage: StageConfig = experiment.stages[stage_name]
    context = ray.train.get_context()  # Ray
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = _device()
    accumulation = experiment.gradient_accumulation(stage_name)

    # ------------------------------------------------------------------ model: resume, previous stage or init
    resume = ray.train.get_checkpoint()  # Ray: set when restarting after a failure or re-running the run name
    start_from = resume or loop_config.get("init_from")
    if start_from is not None:
        from owl2.model import Owl2ForCausalLM

        with start_from.as_directory() as folder:
            model = Owl2ForCausalLM.from_pretrained(folder)
    else:
        model = initial_model(experiment.model, experiment.seed)
    # From stage 1's 224 px to stage 2's 448 px: the learned position table is resampled.
    model.set_image_size(stage.image_size)
    apply_trainable(model, stage.trainable)
    model.train()
    # DDP or FSDP2 (with activation checkpointing if asked). FSDP2 replaces the parameters by shards, so the
    # optimizer is built from the wrapped model, and a resumed optimizer state is loaded into it afterwards.
    wrapped = parallel.wrap(model, stage, device)

    optimizer, groups = build_optimizer(wrapped, stage.optim)
    scheduler = warmup_cosine(optimizer, stage.optim.warmup_steps, stage.max_steps, stage.optim.min_lr_ratio)
    state = ckpt.TrainState(stage=stage_name)
    if resume is not None:
        with resume.as_directory() as folder:
            state = ckpt.load_training_state(folder, optimizer, scheduler, model=wrapped)
        state.resumed_at.append(state.step)
    verify_optimizer_setup(wrapped, optimizer, stage.trainable)

    tracker = _tracker(loop_config) if rank == 0 else None
    if tracker is not None and state.step == 0:
        emit(loop_config.get("progress"), f"[{stage_name}] parameter groups\n{format_group_table(groups)}")
        tracker.log_dict(loop_config["run_id"], {"groups": group_table_rows(groups)}, "param_groups.json")
        tracker.log_text(loop_config["run_id"], format_group_table(groups), "param_groups.txt")

    # ------------------------------------------------------------------ data: this worker's shard, in order
    epoch, last_key, current = state.position(rank, world_size)  # current: [first epoch, end epoch, rows]
    spec = model.config.spec
    collator = Collator(pad_token_id=spec.decoder.pad_token_id, image_size=stage.image_size)
    stats = SkipStats(max_fraction=stage.data.max_bad_fraction, min_records=stage.data.min_records_for_check)
    dtype = torch.bfloat16 if _use_bf16(stage, device) else torch.float32

    def batches():
        nonlocal epoch, last_key
        # Each pass over the data pays the pipeline's start-up while training waits (10-15 s on 2 CPUs). The first
        # pass streams one epoch and counts its rows; the next one streams every epoch the stage still needs, so
        # a stage of many short epochs waits twice, not once an epoch. Batches run across the epochs of a pass.
        while True:
            fresh = last_key < 0
            dataset = encoded(stage.data, spec.tokens_per_image, epoch, rank, world_size, last_key, current[1] - epoch)
            for batch in iterate(dataset, collator, stage.micro_batch_size, stats):
                current[2] += len(batch.ids)
                yield batch
            first, end, rows = current
            if not rows and fresh:
                raise RuntimeError(f"stage {stage_name}: worker {rank} got no usable sample from its data shard")
            needed = (stage.max_steps - state.step) * accumulation * stage.micro_batch_size
            epochs = max(1, math.ceil(needed * (end - first) / rows)) if rows else 1
            epoch, last_key = end, -1
            current[:] = [end, end + epochs, 0]

    # ------------------------------------------------------------------ fit
    window = {"loss": 0.0, "micro": 0, "samples": 0, "tokens": 0, "images": 0, "start": time.perf_counter()}
    stream = batches()
    stage_index = list(experiment.stages).index(stage_name)
    val_loss: float | None = None
    held_out = (
        HeldOut(stage.validation, spec.tokens_per_image, spec.decoder.pad_token_id, rank, world_size)
        if stage.validation is not None
        else None
    )
    # Generation-based scores (stage.eval) on rank 0 only: the config refuses them under FSDP2.
    evaluator = CheckpointEval(stage) if stage.eval is not None and rank == 0 else None
    while state.step < stage.max_steps:
        optimizer.zero_grad(set_to_none=True)
        finite = True
        for micro in range(accumulation):
            batch = next(stream)
            epoch, last_key = batch.epoch, batch.last_key
            inputs = batch.to(device, dtype)
            with parallel.gradient_sync(wrapped, sync=micro == accumulation - 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    loss = wrapped(**inputs, use_cache=False).loss
                finite = finite and bool(torch.isfinite(loss.detach()))
                (loss / accumulation).backward()
            window["loss"] += float(loss.detach())
            window["micro"] += 1
            window["samples"] += len(batch.ids)
            window["tokens"] += int(batch.attention_mask.sum())
            window["images"] += len(batch.images)
        # Every rank must take the same decision, or DDP's collectives would hang.
        finite = all(_all_gather(finite))
        grad_norm = float("nan")
        if finite:
            if stage.optim.grad_clip > 0:
                grad_norm = parallel.clip_grad_norm(wrapped, stage.optim.grad_clip)
            optimizer.step()
        else:
            state.nonfinite_steps += 1
            if state.nonfinite_steps > stage.max_nonfinite_steps:
                raise FloatingPointError(
                    f"stage {stage_name}: {state.nonfinite_steps} steps had a NaN/inf loss (limit "
                    f"{stage.max_nonfinite_steps}); lower the learning rate or check the data"
                )
        learning_rates = [group["lr"] for group in optimizer.param_groups]  # the rates this step used
        scheduler.step()
        state.step += 1

        if state.step % stage.log_every == 0 or state.step == stage.max_steps:
            metrics = _window_metrics(window, learning_rates, groups, grad_norm, state, stats)
            peak = parallel.peak_memory_gb(device)
            if peak is not None:
                metrics["peak_memory_gb"] = max(_all_gather(peak))  # the fullest worker
            window.update(loss=0.0, micro=0, samples=0, tokens=0, images=0, start=time.perf_counter())
        else:
            metrics = None
        checkpointing = state.step % stage.checkpoint_every == 0 or state.step == stage.max_steps
        if held_out is not None and (metrics is not None or checkpointing):
            # Every report carries val_loss (the last value between evaluations): Tune's schedulers need it.
            if should_validate(state.step, stage.max_steps, stage.validation) or val_loss is None:
                val_loss = held_out.loss(wrapped, device, dtype)
            metrics = {**(metrics or {"step": state.step}), "val_loss": val_loss}
        if checkpointing and evaluator is not None and evaluator.due(state.step):
            # The other ranks go on to the checkpoint and wait in its first collective meanwhile.
            outcome = evaluator.run(unwrap(wrapped), state.step, dtype)
            metrics = {**(metrics or {"step": state.step}), **outcome.metrics}
            if tracker is not None:
                log_outcome(tracker, loop_config["run_id"], outcome, stage.eval.suite)
            emit(loop_config.get("progress"), f"[{stage_name}] {outcome.headline}")
        if metrics is not None:
            metrics["stage_index"] = stage_index
        if checkpointing:
            position = (epoch, last_key, current)
            _checkpoint(loop_config, wrapped, optimizer, scheduler, state, position, metrics, tracker, rank)
            _crash_for_tests(loop_config, state.step)
        elif metrics is not None:
            _report(loop_config, metrics, None, tracker, state.step)


def _window_metrics(window, learning_rates, groups, grad_norm, state, stats) -> dict[str, float]:
    elapsed = max(time.perf_counter() - window["start"], 1e-9)
    totals = [
        sum(values)
        for values in zip(
            *_all_gather((window["loss"], window["micro"], window["samples"], window["tokens"], window["images"])),
            strict=True,
        )
    ]
    loss, micro, samples, tokens, images = totals
    merged = SkipStats()
    for part in _all_gather(stats):
        merged.merge(part)
    state.samples += int(samples)
    state.tokens += int(tokens)
    state.images += int(images)
    state.skipped = dict(merged.skipped)
    state.records_seen = merged.seen
    metrics = {
        "step": state.step,
        "loss": loss / max(micro, 1),
        "grad_norm": grad_norm,
        "samples_per_s": samples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "images_per_s": images / elapsed,
        "samples": state.samples,
        "nonfinite_steps": state.nonfinite_steps,
        "records_seen": merged.seen,
        "records_skipped": sum(merged.skipped.values()),
    }
    metrics.update({f"skipped/{reason}": count for reason, count in merged.skipped.items()})
    for group, rate in zip(groups, learning_rates, strict=True):
        metrics[f"lr/{group['name']}"] = rate
    return metrics


def _checkpoint(loop_config, wrapped, optimizer, scheduler, state, position, metrics, tracker, rank) -> None:
    import ray.train

    positions = _all_gather(position)
    state.epochs = [p[0] for p in positions]
    state.last_keys = [p[1] for p in positions]
    state.passes = [list(p[2]) for p in positions]
    metrics = metrics or {"step": state.step}
    # Every rank takes part: under FSDP2 these gather the full states to rank 0.
    model_state = parallel.model_state_for_checkpoint(wrapped)
    optimizer_state = parallel.optimizer_state_for_checkpoint(wrapped, optimizer)
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = None
        if rank == 0:
            folder = ckpt.save(
                Path(scratch) / "checkpoint",
                unwrap(wrapped),
                optimizer_state,
                scheduler,
                state,
                loop_config["experiment_yaml"],
                model_state=model_state,
            )
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))
        _report(loop_config, metrics, checkpoint, tracker, state.step)


def _report(loop_config, metrics, checkpoint, tracker, step) -> None:
    import ray.train

    ray.train.report(metrics, checkpoint=checkpoint)  # Ray: a barrier; every worker calls it equally often
    if tracker is not None:
        tracker.log_metrics(loop_config["run_id"], metrics, step=step)
        _print_progress(loop_config, metrics)


def _print_progress(loop_config, metrics) -> None:
    stage, total = loop_config["stage"], loop_config["max_steps"]
    step = int(metrics["step"])
    if "loss" not in metrics:
        return
    rate = metrics["samples_per_s"]
    remaining = (total - step) * loop_config["global_batch_size"] / rate if rate > 0 else math.nan
    emit(
        loop_config.get("progress"),
        f"[{stage}] step {step}/{total}  loss {metrics['loss']:.4f}  {rate:.1f} samples/s  "
        f"{metrics['tokens_per_s']:.0f} tok/s  {metrics['images_per_s']:.1f} img/s  ETA {remaining:.0f}s",
    )


def _tracker(loop_config):
    from owl2.tracking import Tracker

    return Tracker(loop_config["tracking_uri"]) if loop_config.get("run_id") else None


def _use_bf16(stage: StageConfig, device: torch.device) -> bool:
    return parallel.use_bf16(stage, device)


def _crash_for_tests(loop_config: dict[str, Any], step: int) -> None:
    """Fault injection for tests: after the checkpoint of ``step``, the process dies once (a marker file
    remembers it), as a worker killed by the OS would."""
    crash = loop_config.get("_crash_once")
    if crash and step == crash["step"] and not os.path.exists(crash["marker"]):
        Path(crash["marker"]).touch()
        time.sleep(crash.get("delay_s", 2.0))  # let the controller register the checkpoint first
        os._exit(1)
