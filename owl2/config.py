"""Typed configuration: dataclasses, named presets, YAML files and ``key=value`` overrides.

Every config is a (nested) dataclass that validates itself in ``__post_init__`` and raises
:class:`ConfigError` naming the offending field, so a bad value stops a run before any work starts.
This module imports neither torch nor transformers: the CLI and Ray drivers read configs cheaply.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

IMAGE_TOKEN_INDEX = -200
"""Sentinel id that marks an image placeholder in ``input_ids`` (the official convention)."""
IGNORE_INDEX = -100
"""Label value excluded from the loss."""
IMAGE_PLACEHOLDER = "<|image|>"
"""Prompt text that stands for one image (not a vocabulary token)."""


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or inconsistent with another field."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass
class VisionConfig:
    """ViT-L/14-style vision encoder (CLIP layout, pre-norm, quick_gelu, CLS token kept)."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size", "patch_size"):
            _check(getattr(self, name) > 0, f"vision.{name} must be positive, got {getattr(self, name)}")
        _check(
            self.hidden_size % self.num_heads == 0,
            f"vision.num_heads ({self.num_heads}) must divide vision.hidden_size ({self.hidden_size})",
        )
        _check(
            self.image_size % self.patch_size == 0,
            f"vision.image_size ({self.image_size}) must be a multiple of vision.patch_size ({self.patch_size})",
        )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Patch tokens plus the CLS token."""
        return self.grid_size**2 + 1


@dataclasses.dataclass
class AbstractorConfig:
    """Visual abstractor: learnable queries that summarise the image for the decoder."""

    hidden_size: int = 1024
    num_layers: int = 6
    num_heads: int = 16
    intermediate_size: int = 2816
    num_queries: int = 64
    layer_norm_eps: float = 1e-6
    """Epsilon of the LayerNorm inside the SwiGLU; the query/key norms keep PyTorch's 1e-5 as officially."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "num_queries"):
            _check(getattr(self, name) > 0, f"abstractor.{name} must be positive, got {getattr(self, name)}")
        _check(
            self.hidden_size % self.num_heads == 0,
            f"abstractor.num_heads ({self.num_heads}) must divide abstractor.hidden_size ({self.hidden_size})",
        )
        _check(
            (self.hidden_size // 2) % 2 == 0,
            f"abstractor.hidden_size ({self.hidden_size}) must be a multiple of 4 for the 2-D sin-cos positions",
        )

    @property
    def tokens_per_image(self) -> int:
        """Decoder tokens one image becomes: the queries plus the appended ``vit_eos``."""
        return self.num_queries + 1


@dataclasses.dataclass
class DecoderConfig:
    """LLaMA-2 decoder with the modality-adaptive module (per-modality norms and K/V)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            _check(getattr(self, name) > 0, f"decoder.{name} must be positive, got {getattr(self, name)}")
        _check(
            self.hidden_size % self.num_heads == 0,
            f"decoder.num_heads ({self.num_heads}) must divide decoder.hidden_size ({self.hidden_size})",
        )
        _check(
            (self.hidden_size // self.num_heads) % 2 == 0,
            f"decoder head size ({self.hidden_size // self.num_heads}) must be even for rotary embeddings",
        )
        _check(
            self.num_heads % self.num_kv_heads == 0,
            f"decoder.num_kv_heads ({self.num_kv_heads}) must divide decoder.num_heads ({self.num_heads})",
        )
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            _check(
                0 <= value < self.vocab_size,
                f"decoder.{name} ({value}) must lie in [0, decoder.vocab_size={self.vocab_size})",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass
class ModelConfig:
    """The whole mPLUG-Owl2 architecture."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    abstractor: AbstractorConfig = dataclasses.field(default_factory=AbstractorConfig)
    decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        _check(
            self.abstractor.hidden_size == self.vision.hidden_size,
            f"abstractor.hidden_size ({self.abstractor.hidden_size}) must equal vision.hidden_size "
            f"({self.vision.hidden_size}): the abstractor's keys are the vision tokens themselves",
        )

    @property
    def tokens_per_image(self) -> int:
        return self.abstractor.tokens_per_image

    @classmethod
    def from_preset(cls, name: str, overrides: dict[str, Any] | list[str] | None = None) -> ModelConfig:
        """A preset with overrides applied, e.g. ``from_preset("tiny-cpu", ["abstractor.num_queries=32"])``."""
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        return build(cls, merge(MODEL_PRESETS[name], overrides or {}), "model")

    @classmethod
    def from_official(cls, official: dict[str, Any]) -> ModelConfig:
        """Read the released checkpoint's ``config.json`` (model_type ``mplug_owl2``)."""
        if official.get("model_type") != "mplug_owl2":
            raise ConfigError(f"config.json model_type is {official.get('model_type')!r}, expected 'mplug_owl2'")
        if official.get("rope_scaling"):
            raise ConfigError("config.json rope_scaling is set; owl2 supports plain RoPE only (rope_scaling: null)")
        if official.get("tie_word_embeddings"):
            raise ConfigError("config.json tie_word_embeddings is true; mPLUG-Owl2 has an untied lm_head")
        visual = official.get("visual_config") or {}
        vit, abstractor = visual.get("visual_model") or {}, visual.get("visual_abstractor") or {}
        if vit.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ConfigError(f"visual_config.visual_model.hidden_act is {vit['hidden_act']!r}; only quick_gelu")
        if not vit.get("use_cls_token", True) or not abstractor.get("use_cls_token", True):
            raise ConfigError("visual_config use_cls_token=false (the Owl2.1 ViT-G variant) is not supported")
        if abstractor.get("add_v2t_pos_emb"):
            raise ConfigError("visual_config.visual_abstractor.add_v2t_pos_emb=true is not supported")
        vision_cfg = VisionConfig(
            **_pick(
                vit,
                "visual_config.visual_model",
                hidden_size="hidden_size",
                num_layers="num_hidden_layers",
                num_heads="num_attention_heads",
                intermediate_size="intermediate_size",
                image_size="image_size",
                patch_size="patch_size",
                layer_norm_eps="layer_norm_eps",
            )
        )
        grid = abstractor.get("grid_size", vision_cfg.grid_size)
        if grid != vision_cfg.grid_size:
            raise ConfigError(
                f"visual_config.visual_abstractor.grid_size ({grid}) must equal image_size/patch_size "
                f"({vision_cfg.grid_size})"
            )
        encoder_width = abstractor.get("encoder_hidden_size", vision_cfg.hidden_size)
        if encoder_width != vision_cfg.hidden_size:
            raise ConfigError(
                f"visual_config.visual_abstractor.encoder_hidden_size ({encoder_width}) must equal the vision "
                f"hidden_size ({vision_cfg.hidden_size})"
            )
        abstractor_cfg = AbstractorConfig(
            **_pick(
                abstractor,
                "visual_config.visual_abstractor",
                hidden_size="hidden_size",
                num_layers="num_hidden_layers",
                num_heads="num_attention_heads",
                intermediate_size="intermediate_size",
                num_queries="num_learnable_queries",
                layer_norm_eps="layer_norm_eps",
            )
        )
        decoder_fields = _pick(
            official,
            "config.json",
            vocab_size="vocab_size",
            hidden_size="hidden_size",
            intermediate_size="intermediate_size",
            num_layers="num_hidden_layers",
            num_heads="num_attention_heads",
            rms_norm_eps="rms_norm_eps",
            max_position_embeddings="max_position_embeddings",
        )
        decoder_fields["num_kv_heads"] = official.get("num_key_value_heads") or decoder_fields["num_heads"]
        for ours, theirs, default in (
            ("rope_theta", "rope_theta", 10000.0),
            ("pad_token_id", "pad_token_id", 0),
            ("bos_token_id", "bos_token_id", 1),
            ("eos_token_id", "eos_token_id", 2),
        ):
            value = official.get(theirs)
            decoder_fields[ours] = default if value is None else value
        decoder_fields["rope_theta"] = float(decoder_fields["rope_theta"])
        return cls(vision=vision_cfg, abstractor=abstractor_cfg, decoder=DecoderConfig(**decoder_fields))


DATA_FORMATS = ("llava", "captions", "webdataset")
TEMPLATE_NAMES = ("mplug_owl2", "vicuna_v1")
RESIZE_MODES = ("stretch", "pad", "crop")


@dataclasses.dataclass
class SourceConfig:
    """One dataset of a mixture."""

    format: str
    """``llava`` (conversation JSON/JSONL), ``captions`` (JSONL/CSV/parquet) or ``webdataset`` (.tar shards)."""
    path: str | list[str]
    """File(s) or folder(s); local paths or URIs such as ``s3://bucket/prefix``."""
    image_root: str | None = None
    """Folder that relative image paths are under (default: beside the data file)."""
    name: str | None = None
    """Label in metrics (default: the file's stem)."""
    weight: float = 1.0
    """Expected number of times each sample is seen per epoch: 2.0 doubles a source, 0.5 takes a different
    (deterministic) half each epoch."""

    def __post_init__(self) -> None:
        _check(self.format in DATA_FORMATS, f"data source format {self.format!r} must be one of {list(DATA_FORMATS)}")
        _check(bool(self.path), "data source path must not be empty")
        _check(self.weight > 0, f"data source weight must be positive, got {self.weight}")

    @property
    def label(self) -> str:
        first = self.path if isinstance(self.path, str) else self.path[0]
        return self.name or Path(first.rstrip("/").split("://")[-1]).stem


@dataclasses.dataclass
class DataConfig:
    """What to read and how to turn it into model inputs."""

    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    tokenizer: str = ""
    """Folder with the LLaMA ``tokenizer.model`` (e.g. the checkpoint folder)."""
    template: str = "vicuna_v1"
    """Conversation template for chat samples (captions always use the plain image-then-caption form)."""
    max_length: int = 2048
    """Longest sequence in decoder tokens, each image counting as its num_queries + 1 tokens."""
    image_size: int = 448
    resize: str = "stretch"
    """``stretch`` to a square (the official evaluation), ``pad`` to a square with the mean colour (the
    official fine-tuning), or ``crop`` (shortest side, then centre crop)."""
    max_image_pixels: int = 64_000_000
    """Larger images are skipped as possible decompression bombs."""
    max_bad_fraction: float = 0.05
    """Stop when more than this fraction of the records seen so far was skipped (after ``min_records_for_check``)."""
    min_records_for_check: int = 200
    seed: int = 0
    tokenizer_actors: int = 1
    """At least this many ``Encode`` actors (tokenise + decode) per worker's pipeline; by default one per CPU of the
    worker's share of the cluster."""

    def __post_init__(self) -> None:
        _check(
            self.template in TEMPLATE_NAMES, f"data.template {self.template!r} must be one of {list(TEMPLATE_NAMES)}"
        )
        _check(self.resize in RESIZE_MODES, f"data.resize {self.resize!r} must be one of {list(RESIZE_MODES)}")
        _check(self.max_length > 0, f"data.max_length must be positive, got {self.max_length}")
        _check(self.image_size > 0, f"data.image_size must be positive, got {self.image_size}")
        _check(
            0 <= self.max_bad_fraction <= 1, f"data.max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}"
        )
        _check(self.tokenizer_actors >= 1, f"data.tokenizer_actors must be at least 1, got {self.tokenizer_actors}")
        labels = [source.label for source in self.sources]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        _check(not duplicates, f"data.sources have duplicate names {duplicates}: give each a distinct 'name'")


TRAINABLE_PARTS = ("all", "vision", "abstractor", "decoder", "decoder.visual", "lm_head")
PRECISIONS = ("auto", "bf16", "fp32")
STRATEGIES = ("ddp", "fsdp")


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
        _check(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {self.betas}",
        )
        _check(0 < self.layer_decay <= 1, f"optim.layer_decay must lie in (0, 1], got {self.layer_decay}")
        for name in ("vision_lr_scale", "abstractor_lr_scale", "decoder_lr_scale"):
            _check(getattr(self, name) > 0, f"optim.{name} must be positive, got {getattr(self, name)}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")


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
        _check(self.every > 0, f"validation.every must be positive, got {self.every}")
        _check(self.max_batches > 0, f"validation.max_batches must be positive, got {self.max_batches}")
        _check(self.batch_size > 0, f"validation.batch_size must be positive, got {self.batch_size}")
        _check(bool(self.data.sources), "validation.data.sources is empty: name the held-out data")


EVAL_SUITES = ("shapes", "vqa", "mmbench", "mme", "captions")
"""The suites of ``owl2 eval`` (:mod:`owl2.eval.runner`), named here so that configs validate without torch."""


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
        _check(self.suite in EVAL_SUITES, f"eval.suite {self.suite!r} must be one of {list(EVAL_SUITES)}")
        _check(
            self.suite == "shapes" or bool(self.data),
            f"eval.data is empty: the {self.suite} suite needs the benchmark's file or folder",
        )
        _check(self.every is None or self.every > 0, f"eval.every must be positive, got {self.every}")
        _check(self.limit > 0, f"eval.limit must be positive, got {self.limit}")
        _check(self.batch_size > 0, f"eval.batch_size must be positive, got {self.batch_size}")


@dataclasses.dataclass
class StageConfig:
    """One training stage: what trains, on which data, at which resolution, for how long."""

    trainable: list[str] = dataclasses.field(default_factory=lambda: ["all"])
    """Parts that train: ``all``, or any of ``vision``, ``abstractor``, ``decoder`` (embeddings and all
    layers), ``decoder.visual`` (the visual copies of the modality-adaptive norms and K/V), ``lm_head``."""
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
        _check(bool(self.trainable), "stage trainable must name at least one part (or 'all')")
        unknown = [part for part in self.trainable if part not in TRAINABLE_PARTS]
        _check(not unknown, f"stage trainable has unknown part(s) {unknown}; choose from {list(TRAINABLE_PARTS)}")
        _check(self.image_size > 0, f"stage image_size must be positive, got {self.image_size}")
        _check(self.max_steps > 0, f"stage max_steps must be positive, got {self.max_steps}")
        _check(self.micro_batch_size > 0, f"stage micro_batch_size must be positive, got {self.micro_batch_size}")
        _check(self.precision in PRECISIONS, f"stage precision {self.precision!r} must be one of {list(PRECISIONS)}")
        _check(self.strategy in STRATEGIES, f"stage strategy {self.strategy!r} must be one of {list(STRATEGIES)}")
        _check(self.checkpoint_every > 0, f"stage checkpoint_every must be positive, got {self.checkpoint_every}")
        _check(self.log_every > 0, f"stage log_every must be positive, got {self.log_every}")
        _check(self.max_nonfinite_steps >= 0, "stage max_nonfinite_steps must be >= 0")
        _check(
            self.optim.warmup_steps <= self.max_steps,
            f"stage optim.warmup_steps ({self.optim.warmup_steps}) exceeds max_steps ({self.max_steps})",
        )


@dataclasses.dataclass
class ModelInitConfig:
    """Where the first stage's weights come from (exactly one of the three, or a random preset)."""

    preset: str = "tiny-cpu"
    """Architecture preset (ignored when ``pretrained`` names a folder, which carries its own)."""
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Architecture overrides, e.g. ``{abstractor: {num_layers: 3}}`` (what sweeps change)."""
    pretrained: str | None = None
    """An owl2 or official mPLUG-Owl2 folder (fine-tuning the released model)."""
    llama: str | None = None
    """A transformers LLaMA-2 folder, with ``clip``: a fresh model (the paper's stage-1 start)."""
    clip: str | None = None

    def __post_init__(self) -> None:
        _check(self.preset in MODEL_PRESETS, f"model.preset {self.preset!r}: choose one of {sorted(MODEL_PRESETS)}")
        _check(
            (self.llama is None) == (self.clip is None),
            "model.llama and model.clip go together: a fresh model needs both LLaMA-2 and CLIP weights",
        )
        _check(
            not (self.pretrained and self.llama),
            "model.pretrained and model.llama/clip exclude each other: fine-tune a released model or build a fresh one",
        )
        if self.overrides:
            ModelConfig.from_preset(self.preset, self.overrides)


@dataclasses.dataclass
class ResourcesConfig:
    """Ray Train workers."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    gpu: str | None = None
    """The workers' GPU, a name of ``owl2.plan.gpus.GPUS`` (e.g. ``h100-80gb``): ``owl2 train`` then refuses a
    stage whose memory plan does not fit, and MFU uses its peak."""
    peak_tflops: float | None = None
    """Dense bf16 peak per GPU in TFLOP/s, overriding the GPU table's."""
    ignore_memory_plan: bool = False
    """Start stages that the memory plan says do not fit (for experts who know better)."""

    def __post_init__(self) -> None:
        from owl2.plan.gpus import GPUS

        _check(self.num_workers >= 1, f"resources.num_workers must be >= 1, got {self.num_workers}")
        _check(self.cpus_per_worker > 0, f"resources.cpus_per_worker must be positive, got {self.cpus_per_worker}")
        _check(
            self.gpu is None or self.gpu in GPUS,
            f"resources.gpu {self.gpu!r} is not a known GPU; choose one of {', '.join(GPUS)}",
        )
        _check(
            self.peak_tflops is None or self.peak_tflops > 0,
            f"resources.peak_tflops must be positive, got {self.peak_tflops}",
        )


@dataclasses.dataclass
class TrackingConfig:
    """MLflow. The ``MLFLOW_TRACKING_URI`` environment variable wins over ``tracking_uri``."""

    tracking_uri: str = ""
    """Empty: an embedded store on local disk, ``<storage_path>/mlflow.db``."""
    experiment: str = "owl2"


@dataclasses.dataclass
class ExperimentConfig:
    """A training pipeline: a model, stages run in order, resources, storage and tracking."""

    name: str = "owl2"
    """Run name: re-running the same name resumes it (a new experiment needs a new name)."""
    model: ModelInitConfig = dataclasses.field(default_factory=ModelInitConfig)
    stages: dict[str, StageConfig] = dataclasses.field(default_factory=dict)
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    storage_path: str = "~/owl2_runs"
    """Where checkpoints (and the default MLflow store) go: a local folder or a URI shared by all nodes."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before a stage fails."""
    seed: int = 0

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, f"name {self.name!r} must be non-empty without '/'")
        _check(bool(self.stages), "stages is empty: define at least one stage")
        _check(self.max_failures >= 0, f"max_failures must be >= 0, got {self.max_failures}")
        spec = ModelConfig.from_preset(self.model.preset, self.model.overrides)
        workers = self.resources.num_workers
        for name, stage in self.stages.items():
            where = f"stages.{name}"
            per_step = stage.micro_batch_size * workers
            _check(
                stage.global_batch_size % per_step == 0,
                f"{where}.global_batch_size ({stage.global_batch_size}) must be a multiple of micro_batch_size x "
                f"num_workers ({stage.micro_batch_size} x {workers} = {per_step})",
            )
            _check(
                stage.image_size % spec.vision.patch_size == 0,
                f"{where}.image_size ({stage.image_size}) must be a multiple of the patch size "
                f"({spec.vision.patch_size})",
            )
            _check(bool(stage.data.sources), f"{where}.data.sources is empty: name at least one dataset")
            _check(bool(stage.data.tokenizer), f"{where}.data.tokenizer is empty: point it at tokenizer.model's folder")
            _check(
                stage.data.image_size == stage.image_size,
                f"{where}.data.image_size ({stage.data.image_size}) must equal {where}.image_size ({stage.image_size})",
            )
            if stage.validation is not None:
                _check(
                    stage.validation.data.image_size == stage.image_size,
                    f"{where}.validation.data.image_size ({stage.validation.data.image_size}) must equal "
                    f"{where}.image_size ({stage.image_size})",
                )
                _check(bool(stage.validation.data.tokenizer), f"{where}.validation.data.tokenizer is empty")
            _check(
                stage.strategy != "fsdp" or self.resources.use_gpu,
                f"{where}.strategy fsdp needs GPU workers (resources.use_gpu: true)",
            )
            if stage.eval is not None:
                _check(
                    stage.eval.every is None or stage.eval.every % stage.checkpoint_every == 0,
                    f"{where}.eval.every ({stage.eval.every}) must be a multiple of {where}.checkpoint_every "
                    f"({stage.checkpoint_every}): the suite runs at checkpoint steps",
                )
                _check(
                    stage.strategy != "fsdp",
                    f"{where}.eval is not supported with {where}.strategy fsdp yet: generation runs on the rank-0 "
                    "worker alone, while FSDP2 needs every worker in each forward pass; use ddp, or evaluate the "
                    "stage's checkpoints with `owl2 eval`",
                )

    def gradient_accumulation(self, stage: str) -> int:
        config = self.stages[stage]
        return config.global_batch_size // (config.micro_batch_size * self.resources.num_workers)


SEARCH_ALGORITHMS = ("grid", "random", "optuna")
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclasses.dataclass
class SchedulerConfig:
    type: str = "asha"
    """``asha`` stops trials whose metric trails at a rung; ``fifo`` runs every trial to the end."""
    grace_period: int = 2
    """Reports (training iterations) a trial gets before it can be stopped."""
    reduction_factor: int = 2
    max_t: int = 100
    """The longest a trial runs, in reports."""

    def __post_init__(self) -> None:
        _check(self.type in SCHEDULERS, f"scheduler.type {self.type!r} must be one of {list(SCHEDULERS)}")
        _check(self.grace_period >= 1, f"scheduler.grace_period must be >= 1, got {self.grace_period}")
        _check(self.reduction_factor >= 2, f"scheduler.reduction_factor must be >= 2, got {self.reduction_factor}")
        _check(self.max_t >= self.grace_period, "scheduler.max_t must be >= scheduler.grace_period")


@dataclasses.dataclass
class SweepConfig:
    """A Ray Tune sweep over an experiment's keys; each trial is that experiment's Ray Train run."""

    name: str = "sweep"
    """Re-running a sweep under the same name resumes it."""
    experiment: str = ""
    """The base experiment YAML (relative to the sweep file)."""
    overrides: list[str] = dataclasses.field(default_factory=list)
    """``key=value`` changes to the base before sampling (e.g. shorter stages)."""
    space: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Experiment key -> distribution: ``{grid: [..]}``, ``{choice: [..]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}`` or ``{randint: [lo, hi]}``, e.g. ``model.overrides.abstractor.num_queries``."""
    search: str = "grid"
    """``grid``/``random`` (Ray Tune's variant generator) or ``optuna`` (model-based, needs optuna installed)."""
    num_samples: int = 1
    """Samples of the space (grid: repetitions of the whole grid)."""
    metric: str = "val_loss"
    mode: str = "min"
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    max_concurrent_trials: int = 2
    trial_max_failures: int = 1
    """Retries of a crashed trial; the other trials go on either way."""
    storage_path: str = "runs"
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, f"sweep name {self.name!r} must be non-empty without '/'")
        _check(bool(self.experiment), "sweep experiment is empty: name the base experiment YAML")
        _check(bool(self.space), "sweep space is empty: name at least one key to sweep")
        _check(
            self.search in SEARCH_ALGORITHMS, f"sweep search {self.search!r} must be one of {list(SEARCH_ALGORITHMS)}"
        )
        _check(self.mode in ("min", "max"), f"sweep mode {self.mode!r} must be 'min' or 'max'")
        _check(self.num_samples >= 1, f"sweep num_samples must be >= 1, got {self.num_samples}")
        _check(self.max_concurrent_trials >= 1, "sweep max_concurrent_trials must be >= 1")
        for key, spec in self.space.items():
            _check(
                isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS,
                f"space.{key} must be one distribution, e.g. {{grid: [1, 2]}}; choose from {list(DISTRIBUTIONS)}",
            )
            kind, values = next(iter(spec.items()))
            _check(isinstance(values, list) and values, f"space.{key}.{kind} must be a non-empty list")
            if kind in ("uniform", "loguniform", "randint"):
                _check(len(values) == 2 and values[0] < values[1], f"space.{key}.{kind} must be [low, high]")
            _check(
                kind != "grid" or self.search == "grid",
                f"space.{key} uses grid values but search is {self.search!r}: use choice for random/optuna search",
            )


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """An experiment YAML with ``key=value`` overrides, validated before anything runs.

    A stage given as a string is a YAML file (relative to the experiment file) holding that stage.
    """
    path = Path(path)
    data = load_yaml(path)
    stages = data.get("stages") or {}
    if not isinstance(stages, dict):
        raise ConfigError(f"{path}: stages must be a mapping of stage name to stage (or to a stage YAML file)")
    data["stages"] = {
        name: load_yaml(path.parent / stage) if isinstance(stage, str) else stage for name, stage in stages.items()
    }
    data = merge(data, parse_overrides(overrides or []))
    return build(ExperimentConfig, data)


def _pick(source: dict[str, Any], where: str, **names: str) -> dict[str, Any]:
    """Rename the official fields to ours; a missing field is an error naming it."""
    missing = [theirs for theirs in names.values() if theirs not in source]
    if missing:
        raise ConfigError(f"{where} lacks field(s) {missing}")
    return {ours: source[theirs] for ours, theirs in names.items()}


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # The golden-vector configuration (../shared/golden/owl2_tiny): 56 px images, 9 tokens per image.
    "debug": {
        "vision": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "image_size": 56},
        "abstractor": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "num_queries": 8},
        "decoder": {
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 4,
            "max_position_embeddings": 256,
        },
    },
    # Trains on a laptop CPU in minutes; grouped-query attention on, 112 px (8x8 patches) images. Trained from
    # random weights, it needs a larger init than LLaMA's 0.02 (about 1/sqrt(width)): at 0.02 the image signal
    # fades through the abstractor's narrow projections and the decoder learns to ignore the images.
    "tiny-cpu": {
        "vision": {"hidden_size": 64, "num_layers": 4, "num_heads": 4, "intermediate_size": 256, "image_size": 112},
        "abstractor": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 176, "num_queries": 16},
        "decoder": {
            "vocab_size": 1024,
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_layers": 4,
            "num_heads": 4,
            "num_kv_heads": 2,
            "max_position_embeddings": 512,
            "initializer_range": 0.08,
        },
    },
    # The released MAGAer13/mplug-owl2-llama2-7b: 8,197,859,328 parameters.
    "owl2-7b": {},
}


# --------------------------------------------------------------------------------------------------
# Generic construction from dicts, YAML and key=value overrides (shared by every config in owl2).
# --------------------------------------------------------------------------------------------------


def build(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Construct dataclass ``cls`` from a nested dict, checking names and types field by field."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown field(s) {[_join(where, k) for k in unknown]}; valid: {sorted(fields)}")
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise _qualified(error, where) from None


def _qualified(error: ConfigError, where: str) -> ConfigError:
    """A section's own message (``eval.every must ...``) with the section's full key (``stages.s2.eval.every``)."""
    section = where.rsplit(".", 1)[-1]
    message = str(error)
    if "." not in where or not message.startswith(f"{section}."):
        return error
    return ConfigError(where + message[len(section) :])


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {options}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        value_type = (typing.get_args(hint) or (Any, Any))[1]
        return {key: _coerce(value_type, item, f"{where}.{key}") for key, item in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # PyYAML reads "3e-3" (no dot) as a string, YAML 1.1's rule; users mean the number.
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (the inverse of :func:`build`)."""
    return dataclasses.asdict(config)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["decoder.num_layers=4", "vision.image_size=224"]`` -> nested dict with YAML-typed values."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.field=value")
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a field below {part!r}, which is a value")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return result


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data
