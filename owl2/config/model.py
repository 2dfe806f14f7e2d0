"""The architecture: vision encoder, visual abstractor, decoder, and the named presets."""

from __future__ import annotations

import dataclasses
from typing import Any

from owl2.config.core import ConfigError, check, divides, one_of, positive
from owl2.config.loading import build, merge, parse_overrides, to_dict

PROJECTORS = ("abstractor", "mlp")
"""What turns the vision tokens into decoder tokens (``model.projector``)."""


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
            positive(getattr(self, name), f"vision.{name}")
        divides(self.num_heads, self.hidden_size, "vision.num_heads", "vision.hidden_size")
        check(
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
            positive(getattr(self, name), f"abstractor.{name}")
        divides(self.num_heads, self.hidden_size, "abstractor.num_heads", "abstractor.hidden_size")
        check(
            (self.hidden_size // 2) % 2 == 0,
            f"abstractor.hidden_size ({self.hidden_size}) must be a multiple of 4 for the 2-D sin-cos positions",
        )

    @property
    def tokens_per_image(self) -> int:
        """Decoder tokens one image becomes: the queries plus the appended ``vit_eos``."""
        return self.num_queries + 1


@dataclasses.dataclass
class DecoderConfig:
    """LLaMA-2 decoder, by default with the modality-adaptive module (per-modality norms and K/V)."""

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
    modality_adaptive: bool = True
    """True: every layer has a text and a visual copy of its two norms and its K/V projections, each token uses
    its modality's copy (mPLUG-Owl2's MAM). False: one copy for all tokens, a plain LLaMA layer (the ablation).
    Weights of the other layout load with a log line: a MAM checkpoint keeps its text copies (the ones the
    released LLaMA-2 weights started) and drops the visual ones; a checkpoint without the MAM fills both copies,
    as a LLaMA-2 checkpoint does."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            positive(getattr(self, name), f"decoder.{name}")
        divides(self.num_heads, self.hidden_size, "decoder.num_heads", "decoder.hidden_size")
        check(
            (self.hidden_size // self.num_heads) % 2 == 0,
            f"decoder head size ({self.hidden_size // self.num_heads}) must be even for rotary embeddings",
        )
        divides(self.num_kv_heads, self.num_heads, "decoder.num_kv_heads", "decoder.num_heads")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            check(
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
    projector: str = "abstractor"
    """``abstractor``: the visual abstractor (``abstractor.num_queries + 1`` decoder tokens per image). ``mlp``:
    LLaVA-1.5's projector, ``Linear(vision, decoder) -> GELU -> Linear(decoder, decoder)`` on every patch token of
    the ViT output (CLS dropped), one decoder token per patch; the ``abstractor`` section is then unused. Either
    one sits in the model's ``abstractor`` slot: stage parts, LR scales and parameter groups named ``abstractor``
    mean the projector in use."""

    def __post_init__(self) -> None:
        one_of(self.projector, PROJECTORS, "model.projector")
        check(
            self.projector != "abstractor" or self.abstractor.hidden_size == self.vision.hidden_size,
            f"abstractor.hidden_size ({self.abstractor.hidden_size}) must equal vision.hidden_size "
            f"({self.vision.hidden_size}): the abstractor's keys are the vision tokens themselves",
        )

    @property
    def tokens_per_image(self) -> int:
        """Decoder tokens one image becomes at the model's resolution (``vision.image_size``)."""
        return self.tokens_per_image_at(self.vision.image_size)

    def tokens_per_image_at(self, image_size: int) -> int:
        """Decoder tokens one ``image_size`` px image becomes: the abstractor's fixed count at any resolution, or
        with the MLP projector the patch count, ``(image_size // patch_size) ** 2``."""
        if self.projector == "mlp":
            return (image_size // self.vision.patch_size) ** 2
        return self.abstractor.tokens_per_image

    def with_overrides(self, overrides: dict[str, Any] | list[str] | None) -> ModelConfig:
        """This architecture with ``overrides`` applied, validated as a whole (itself when there are none)."""
        if not overrides:
            return self
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        return build(ModelConfig, merge(to_dict(self), overrides), "model")

    @classmethod
    def from_preset(cls, name: str, overrides: dict[str, Any] | list[str] | None = None) -> ModelConfig:
        """A preset with overrides applied, e.g. ``from_preset("tiny-cpu", ["abstractor.num_queries=32"])``."""
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        return build(cls, merge(MODEL_PRESETS[name], overrides or {}), "model")


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
