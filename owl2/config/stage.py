"""One training stage: what trains, on which data, with which optimizer, and what it measures on the way."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from owl2.config.core import at_least, check, in_range, one_of, positive
from owl2.config.data import DataConfig

TRAINABLE_PARTS = ("all", "vision", "abstractor", "decoder", "decoder.visual", "lm_head")
PRECISIONS = ("auto", "bf16", "fp32")
STRATEGIES = ("ddp", "fsdp")
COMPILE_MODES = (True, False, "auto")
EVAL_SUITES = ("shapes", "vqa", "mmbench", "mme", "captions")
"""The suites of ``owl2 eval`` (:mod:`owl2.eval.runner`), named here so that configs validate without torch."""


@dataclasses.dataclass
class OptimConfig:
    """AdamW with warm-up then cosine decay; layer-wise LR decay over the vision encoder."""

    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    """The cosine ends at ``lr * min_lr_ratio``."""
    warmup_steps: int = 1000
    weight_decay: float = 0.05
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    layer_decay: float = 0.9
    """Vision block i of n gets ``lr * layer_decay ** (n + 1 - layer_id)``; 1.0 turns the decay off."""
    vision_lr_scale: float = 1.0
    abstractor_lr_scale: float = 1.0
    decoder_lr_scale: float = 1.0
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 = no clipping)."""

    def __post_init__(self) -> None:
        positive(self.lr, "optim.lr")
        in_range(self.min_lr_ratio, 0, 1, "optim.min_lr_ratio")
        at_least(self.warmup_steps, 0, "optim.warmup_steps")
        at_least(self.weight_decay, 0, "optim.weight_decay")
        check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {self.betas}",
        )
        in_range(self.layer_decay, 0, 1, "optim.layer_decay", low_open=True)
        for name in ("vision_lr_scale", "abstractor_lr_scale", "decoder_lr_scale"):
            positive(getattr(self, name), f"optim.{name}")
        at_least(self.grad_clip, 0, "optim.grad_clip")


@dataclasses.dataclass
class ValidationConfig:
    """Held-out loss during a stage: what sweeps rank and stop trials on."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    every: int = 50
    """Evaluate every this many optimizer steps (and at the end of the stage)."""
    max_batches: int = 20
    """Batches per worker per evaluation (the same held-out samples every time)."""
    batch_size: int = 8

    def __post_init__(self) -> None:
        positive(self.every, "validation.every")
        positive(self.max_batches, "validation.max_batches")
        positive(self.batch_size, "validation.batch_size")
        check(bool(self.data.sources), "validation.data.sources is empty: name the held-out data")


@dataclasses.dataclass
class EvalConfig:
    """Benchmark scores of generated answers during a stage: an ``owl2 eval`` suite on its first few items, run
    by the rank-0 worker at checkpoint steps and logged as ``eval/<metric>`` (e.g. ``eval/shapes/vqa/accuracy``)
    on the stage's MLflow run, with the predictions and a table as artifacts. DDP only (not FSDP2 yet)."""

    suite: str = "shapes"
    """``shapes`` (the synthetic world's held-out VQA against chance, captions, text), ``vqa``, ``mmbench``,
    ``mme`` or ``captions``."""
    data: str | None = None
    """The benchmark's file or folder (for ``shapes`` the world folder; None: the world whose ``tokenizer``
    folder the stage's data uses)."""
    image_root: str | None = None
    """Folder that relative image paths are under (``vqa``, ``captions``; default: beside the file)."""
    every: int | None = None
    """Evaluate at the checkpoint steps that are multiples of this (a multiple of ``checkpoint_every``) and at
    the end of the stage; None: at every checkpoint."""
    limit: int = 32
    """Items per split (the first ones: the same items every time)."""
    batch_size: int = 8
    """Prompts generated together."""

    def __post_init__(self) -> None:
        one_of(self.suite, EVAL_SUITES, "eval.suite")
        check(
            self.suite == "shapes" or bool(self.data),
            f"eval.data is empty: the {self.suite} suite needs the benchmark's file or folder",
        )
        if self.every is not None:
            positive(self.every, "eval.every")
        positive(self.limit, "eval.limit")
        positive(self.batch_size, "eval.batch_size")


@dataclasses.dataclass
class StageConfig:
    """One training stage: what trains, on which data, at which resolution, for how long."""

    section: ClassVar[str] = "stage"
    """The key this config's messages start with; ``build`` puts the stage's own (``stages.stage2``) in its place."""

    trainable: list[str] = dataclasses.field(default_factory=lambda: ["all"])
    """Parts that train: ``all``, or any of ``vision``, ``abstractor`` (the projector in use, see
    ``model.projector``), ``decoder`` (embeddings and all layers, not the head), ``decoder.visual`` (the visual
    copies of the modality-adaptive norms and K/V; none without the module), ``lm_head``. A frozen vision
    encoder: ``[abstractor, decoder, lm_head]``."""
    image_size: int = 448
    """Resolution of this stage; the position embeddings are resampled when it differs from the model's."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    max_steps: int = 1000
    """Optimizer steps of this stage."""
    global_batch_size: int = 256
    """Samples per optimizer step over all workers, reached by gradient accumulation."""
    micro_batch_size: int = 8
    """Samples per forward pass on one worker."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    precision: str = "auto"
    """``auto``: bf16 autocast on GPU, fp32 on CPU."""
    strategy: str = "ddp"
    """``ddp`` or ``fsdp`` (FSDP2, GPU only: for the 7B stage 2)."""
    activation_checkpointing: bool = False
    compile: bool | str = "auto"
    """``torch.compile`` every decoder layer, vision block and abstractor layer (not the whole model): ``true``,
    ``false``, or ``auto``: on when the workers train on GPUs, off on CPUs (there a decoder layer ran about 1.1x
    as fast compiled, after half a minute of compiling: README)."""
    checkpoint_every: int = 500
    """Write (and report) a checkpoint every this many optimizer steps, and at the end."""
    log_every: int = 10
    max_nonfinite_steps: int = 10
    """Steps whose loss is NaN/inf are skipped and counted; this many stop the run."""
    init_from: str | None = None
    """Checkpoint folder to start from; by default the previous stage's last checkpoint, or the model
    section's initial weights for the first stage."""
    validation: ValidationConfig | None = None
    """Held-out loss (``val_loss``) every ``validation.every`` steps; None: no validation."""
    eval: EvalConfig | None = None
    """A small benchmark suite answered by generation at checkpoint steps (``eval/...`` metrics); None: none."""

    def __post_init__(self) -> None:
        check(bool(self.trainable), "stage.trainable must name at least one part (or 'all')")
        unknown = [part for part in self.trainable if part not in TRAINABLE_PARTS]
        check(not unknown, f"stage.trainable has unknown part(s) {unknown}; choose from {list(TRAINABLE_PARTS)}")
        for name in (
            "image_size",
            "max_steps",
            "global_batch_size",
            "micro_batch_size",
            "checkpoint_every",
            "log_every",
        ):
            positive(getattr(self, name), f"stage.{name}")
        one_of(self.precision, PRECISIONS, "stage.precision")
        one_of(self.strategy, STRATEGIES, "stage.strategy")
        check(
            self.compile in COMPILE_MODES,
            f"stage.compile {self.compile!r} must be true, false or auto (torch.compile of every layer; auto: on GPUs)",
        )
        at_least(self.max_nonfinite_steps, 0, "stage.max_nonfinite_steps")
        check(
            self.optim.warmup_steps <= self.max_steps,
            f"stage.optim.warmup_steps ({self.optim.warmup_steps}) exceeds the stage's max_steps ({self.max_steps})",
        )
