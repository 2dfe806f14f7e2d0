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
    """Actors that tokenise (each loads the tokenizer once)."""

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
    # Trains on a laptop CPU in minutes; grouped-query attention on, 112 px (8x8 patches) images.
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
    return cls(**kwargs)


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
    if origin is dict or hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
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
