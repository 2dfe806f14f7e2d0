"""A stage's plan: parameters, memory per GPU with a verdict, FLOPs per sample; for every stage of an experiment.

Memory is in GiB (the keys say ``gb``). A stage fits when its estimate stays under the GPU's memory less a
headroom: 10% for the caching allocator's fragmentation and 1 GiB for the CUDA context, cuBLAS and NCCL.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from owl2.config import ConfigError, ExperimentConfig, ModelConfig, StageConfig, build, to_dict
from owl2.plan.flops import FlopModel, Trainable
from owl2.plan.gpus import UnknownGPU, get_gpu
from owl2.plan.memory import GIB, MemoryEstimate, ParameterLayout, Workload, estimate_memory

HEADROOM_FRACTION = 0.10
CONTEXT_GIB = 1.0


@dataclass(frozen=True)
class Parameters:
    """Parameter counts of one stage's model (at the stage's image size) by tower, and what trains."""

    total: int
    trainable: int
    towers: dict[str, int]
    """``vision``, ``abstractor``, ``decoder_shared`` (embeddings, shared layer weights, final norm, LM head)
    and ``decoder_visual`` (the visual copies of the modality-adaptive norms and K/V)."""
    layout: ParameterLayout


@dataclass(frozen=True)
class StagePlan:
    name: str
    parameters: Parameters
    workload: Workload
    memory: MemoryEstimate
    gpu: str | None
    gpu_memory_gib: float | None
    text_tokens: int
    flops_model: float
    flops_hardware: float

    @property
    def usable_gib(self) -> float | None:
        if self.gpu_memory_gib is None:
            return None
        return self.gpu_memory_gib * (1 - HEADROOM_FRACTION) - CONTEXT_GIB

    @property
    def fits(self) -> bool | None:
        usable = self.usable_gib
        return None if usable is None else self.memory.total / GIB <= usable

    def reason(self) -> str:
        """One line saying why the stage does not fit."""
        return (
            f"stage {self.name} needs {self.memory.total / GIB:.1f} GiB per GPU but {self.gpu or 'the GPU'} "
            f"offers {self.usable_gib:.1f} GiB of {self.gpu_memory_gib:.1f} after headroom "
            f"({self.workload.strategy}, micro-batch {self.workload.micro_batch}, {self.workload.length} tokens, "
            f"activation checkpointing {'on' if self.workload.checkpointing else 'off'})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "params_total": self.parameters.total,
            "params_trainable": self.parameters.trainable,
            "params_by_tower": self.parameters.towers,
            "memory_gb": self.memory.gib(),
            "gpu": self.gpu,
            "gpu_memory_gb": self.gpu_memory_gib,
            "usable_memory_gb": None if self.usable_gib is None else round(self.usable_gib, 2),
            "fits": self.fits,
            "flops_per_sample": self.flops_model,
            "hardware_flops_per_sample": self.flops_hardware,
            "text_tokens": self.text_tokens,
            "images": self.workload.images_per_row,
            "decoder_tokens": self.workload.length,
            "strategy": self.workload.strategy,
            "world_size": self.workload.world_size,
            "precision": "bf16" if self.workload.bf16 else "fp32",
            "micro_batch_size": self.workload.micro_batch,
            "activation_checkpointing": self.workload.checkpointing,
        }


def stage_parameters(spec: ModelConfig, trainable: Sequence[str], image_size: int) -> Parameters:
    """Count parameters on the meta device (no memory), at the stage's image size, with the stage's trainable set."""
    return _stage_parameters(json.dumps(to_dict(spec), sort_keys=True), tuple(trainable), image_size)


@functools.lru_cache(maxsize=16)
def _stage_parameters(spec_json: str, trainable: tuple[str, ...], image_size: int) -> Parameters:
    # cached: the CLI and the training pre-check plan a stage more than once, and an 8B meta model takes seconds
    import torch

    from owl2.model.owl2 import Owl2Config, Owl2ForCausalLM
    from owl2.train.optim import expected_trainable, visual_copies
    from owl2.train.parallel import shard_plan

    with torch.device("meta"):
        model = Owl2ForCausalLM(Owl2Config.from_spec(build(ModelConfig, json.loads(spec_json), "model")))
        model.set_image_size(image_size)
    sizes = {name: param.numel() for name, param in model.named_parameters()}
    trains = expected_trainable(model, trainable)
    visual = visual_copies(model)
    towers = {
        "vision": sum(n for name, n in sizes.items() if name.startswith("vision.")),
        "abstractor": sum(n for name, n in sizes.items() if name.startswith("abstractor.")),
        "decoder_shared": sum(n for name, n in sizes.items() if name.startswith(("decoder.", "lm_head.")))
        - sum(sizes[name] for name in visual),
        "decoder_visual": sum(sizes[name] for name in visual),
    }
    units = [(prefix, unit) for prefix, unit in shard_plan(model) if prefix]
    unit_sizes = [
        (sum(p.numel() for p in unit.parameters()), _trainable_in(unit, prefix, trains)) for prefix, unit in units
    ]
    root = sum(sizes.values()) - sum(size for size, _ in unit_sizes)
    root_trainable = sum(sizes[name] for name in trains) - sum(count for _, count in unit_sizes)
    layout = ParameterLayout(
        total=sum(sizes.values()),
        trainable=sum(sizes[name] for name in trains),
        largest_unit=max(size for size, _ in unit_sizes),
        largest_trainable_unit=max([root_trainable] + [count for _, count in unit_sizes]),
        root=root,
    )
    return Parameters(layout.total, layout.trainable, towers, layout)


def _trainable_in(unit: Any, prefix: str, trains: set[str]) -> int:
    return sum(p.numel() for name, p in unit.named_parameters() if f"{prefix}.{name}" in trains)


def plan_stage(
    experiment: ExperimentConfig,
    name: str,
    gpu: str | None = None,
    gpu_memory_gib: float | None = None,
    text_tokens: int | None = None,
) -> StagePlan:
    """The plan of stage ``name``: a row holds one image and ``text_tokens`` text tokens (default: a full
    ``data.max_length`` row, ``max_length - tokens_per_image`` text tokens), the micro-batch is that many rows."""
    stage = experiment.stages[name]
    spec = ModelConfig.from_preset(experiment.model.preset, experiment.model.overrides)
    per_image = spec.tokens_per_image_at(stage.image_size)
    text = stage.data.max_length - per_image if text_tokens is None else text_tokens
    if text < 0:
        raise ConfigError(f"--text-tokens must be >= 0, got {text}")
    parameters = stage_parameters(spec, stage.trainable, stage.image_size)
    work = _workload(experiment, stage, text + per_image)
    trainable = Trainable.from_parts(stage.trainable, spec.decoder.modality_adaptive)
    memory = estimate_memory(spec, trainable, parameters.layout, work)
    flops = FlopModel(spec, stage.trainable, stage.image_size, stage.activation_checkpointing).sample(text, 1)
    gpu, gpu_memory_gib = _gpu_memory(experiment, gpu, gpu_memory_gib)
    return StagePlan(name, parameters, work, memory, gpu, gpu_memory_gib, text, flops.model, flops.hardware)


def _workload(experiment: ExperimentConfig, stage: StageConfig, length: int) -> Workload:
    # precision auto is bf16 on GPU workers and fp32 on CPU ones, as training decides
    bf16 = stage.precision == "bf16" or (stage.precision == "auto" and experiment.resources.use_gpu)
    return Workload(
        strategy=stage.strategy,
        world_size=experiment.resources.num_workers,
        bf16=bf16,
        micro_batch=stage.micro_batch_size,
        length=length,
        images_per_row=1,
        image_size=stage.image_size,
        checkpointing=stage.activation_checkpointing,
    )


def _gpu_memory(
    experiment: ExperimentConfig, gpu: str | None, gpu_memory_gib: float | None
) -> tuple[str | None, float | None]:
    if gpu_memory_gib is not None:
        if not gpu_memory_gib > 0:
            raise ConfigError(f"--gpu-memory-gb must be positive, got {gpu_memory_gib}")
        return gpu, gpu_memory_gib
    gpu = gpu or experiment.resources.gpu
    if gpu is None:
        return None, None
    try:
        return gpu, get_gpu(gpu).memory_gib
    except UnknownGPU as error:
        raise ConfigError(str(error)) from None


def plan_experiment(
    experiment: ExperimentConfig,
    gpu: str | None = None,
    gpu_memory_gib: float | None = None,
    text_tokens: int | None = None,
) -> dict[str, StagePlan]:
    """Every stage's plan; ``gpu``/``gpu_memory_gib`` override ``resources.gpu``."""
    _gpu_memory(experiment, gpu, gpu_memory_gib)  # a wrong GPU is reported before any model is built
    return {name: plan_stage(experiment, name, gpu, gpu_memory_gib, text_tokens) for name in experiment.stages}


def format_plan(plan: StagePlan) -> str:
    """A readable table of one stage's plan."""
    work, params, mem = plan.workload, plan.parameters, plan.memory.gib()
    rows = [
        ("parameters total", f"{params.total:,}"),
        ("parameters trainable", f"{params.trainable:,}"),
        *((f"  {tower}", f"{count:,}") for tower, count in params.towers.items()),
        (
            "setup",
            f"{work.strategy} x{work.world_size}, {'bf16' if work.bf16 else 'fp32'}, micro-batch "
            f"{work.micro_batch}, {work.length} tokens/row, checkpointing {'on' if work.checkpointing else 'off'}",
        ),
        *((f"memory {part} GiB", f"{value:.2f}") for part, value in mem.items()),
    ]
    if plan.gpu_memory_gib is not None:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        rows.append(
            (
                f"GPU {plan.gpu} GiB" if plan.gpu else "GPU GiB",
                f"{plan.gpu_memory_gib:.1f} (usable {plan.usable_gib:.1f}): {verdict}",
            )
        )
    rows += [
        (f"model FLOPs/sample (1 image + {plan.text_tokens} text)", f"{plan.flops_model:.3e}"),
        ("hardware FLOPs/sample", f"{plan.flops_hardware:.3e}"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join([f"stage {plan.name}"] + [f"  {label:<{width}}  {value}" for label, value in rows])
