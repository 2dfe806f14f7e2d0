"""The FLOP rule: matmul FLOPs of one training sample or batch, from the architecture alone (host arithmetic).

Counted: every matrix multiply (linear layers, the patch-embedding convolution, attention's ``Q K^T`` and
``P V``), 2 FLOPs per multiply-add; norms, activations, softmax, RoPE and the loss are left out (a few percent).

Backward cost per matmul: the input gradient costs one forward when anything before it trains, the weight
gradient one forward when its weight trains. So a trainable module costs 3x its forward, a frozen one that
gradients pass through (stage 1's decoder) 2x, a frozen one with nothing trainable before it 1x. Attention
(no weights) costs 3x when gradients pass through it. Granularity is the tower: within a tower, gradients are
taken to flow from its first layer on when anything in or before the tower trains.

Two totals:

- ``model``: the work the mathematics needs. Each decoder token goes through its own modality's K/V copy;
  causal attention counts the lower triangle (query ``i`` sees ``i + 1`` keys). This is the MFU numerator.
- ``hardware``: what the implementation executes. Each token runs through its own modality's K/V copy only (the
  decoder routes by span), as in ``model``; attention with the explicit padding mask computes the full square;
  in training (the forward given ``label_counts``) the LM head runs on the label positions only; activation
  checkpointing re-runs the forward of every checkpointed layer that gradients pass through (decoder layers,
  vision blocks, abstractor layers), up to the layer's last projection: PyTorch's non-reentrant checkpoint stops
  recomputing once the last saved tensor is back, and the final matmul (the MLP's down projection) saves nothing
  its own backward lacks. A modality-adaptive decoder layer given image tokens is the exception: the gather that
  puts the MLP's rows back in sequence order saves its index, so the down projection is recomputed too.

Padding is not counted: a batch's figures are the sums over its rows' real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from owl2.config import ModelConfig


@dataclass(frozen=True)
class Flops:
    """FLOPs of some work: ``model`` (the MFU numerator) and ``hardware`` (executed, recomputation included)."""

    model: float = 0.0
    hardware: float = 0.0

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.model + other.model, self.hardware + other.hardware)

    def scaled(self, factor: float) -> Flops:
        return Flops(self.model * factor, self.hardware * factor)


@dataclass(frozen=True)
class Trainable:
    """Which parts of the model train, from a stage's ``trainable`` list (see ``StageConfig.trainable``)."""

    vision: bool
    abstractor: bool
    decoder: bool
    """The decoder's shared weights: embeddings, Q/O, the text K/V and norms, the MLPs, the final norm."""
    visual: bool
    """The weights the image tokens' norms and K/V use: the decoder's visual copies (modality-adaptive norms and
    K/V), or without the modality-adaptive module the shared ones."""
    lm_head: bool

    @classmethod
    def from_parts(cls, parts: Sequence[str], modality_adaptive: bool = True) -> Trainable:
        """``parts`` of a stage (``decoder.visual`` selects nothing in a decoder without the modality-adaptive
        module: it has no visual copies)."""
        every = "all" in parts
        decoder = every or "decoder" in parts
        return cls(
            vision=every or "vision" in parts,
            abstractor=every or "abstractor" in parts,
            decoder=decoder,
            visual=decoder or ("decoder.visual" in parts and modality_adaptive),
            lm_head=every or "lm_head" in parts,
        )

    def decoder_grads(self, images: bool) -> bool:
        """Whether gradients pass through the decoder: something in it or before it (with images) trains."""
        return self.decoder or ((self.vision or self.abstractor or self.visual) and images)


def _weighted(forward: float, input_grad: bool, weight_grad: bool) -> float:
    """Forward plus backward of a matmul with a weight."""
    return forward * (1 + input_grad + weight_grad)


def _attention(forward: float, grads: bool) -> float:
    """Forward plus backward of an activation-activation matmul (both operands get gradients)."""
    return forward * (1 + 2 * grads)


class FlopModel:
    """The FLOP rule for one stage, built once: ``sample`` and ``batch`` are host arithmetic only.

    Both ablation switches are followed: the MLP projector (``model.projector: mlp``, one decoder token per patch)
    and a decoder without the modality-adaptive module (every token through the one K/V, trained with the rest).

    Args:
        spec: the architecture.
        trainable: the stage's ``trainable`` parts.
        image_size: the stage's input resolution (sets the vision tokens per image).
        activation_checkpointing: the stage recomputes its layers' forwards in the backward pass.
    """

    def __init__(
        self, spec: ModelConfig, trainable: Sequence[str], image_size: int, activation_checkpointing: bool = False
    ) -> None:
        self.spec = spec
        self.trainable = Trainable.from_parts(trainable, spec.decoder.modality_adaptive)
        self.image_size = image_size
        self.checkpointing = activation_checkpointing
        self.tokens_per_image = spec.tokens_per_image_at(image_size)
        self._image = self._vision() + (self._mlp_projector() if spec.projector == "mlp" else self._abstractor())

    def sample(self, text_tokens: int, images: int) -> Flops:
        """One training row: ``text_tokens`` real non-image tokens and ``images`` images (each one becomes
        ``tokens_per_image`` decoder tokens)."""
        return self.batch([text_tokens], [images])

    def batch(self, text_tokens: Sequence[int], images: Sequence[int], labels: Sequence[int] | None = None) -> Flops:
        """A padded batch, per row: its real non-image tokens and its images (padding is not counted), and the
        labels the LM head runs on (the forward's ``label_counts``; None: the head runs on every token)."""
        labels = [None] * len(text_tokens) if labels is None else labels
        if not len(text_tokens) == len(images) == len(labels):
            raise ValueError(
                f"text_tokens, images and labels have {len(text_tokens)}, {len(images)} and {len(labels)} rows"
            )
        any_images = sum(images) > 0
        total = self._image.scaled(sum(images))
        for text, count, labelled in zip(text_tokens, images, labels, strict=True):
            total = total + self._decoder(text, count, any_images, labelled)
        return total

    def decoder(self, text_tokens: int, images: int) -> Flops:
        """One row through the decoder layers and the LM head alone (the image towers left out). With nothing
        trainable (``trainable=()``) that is the forward pass: what the decoder costs a sample at inference."""
        return self._decoder(text_tokens, images, images > 0, None)

    # ------------------------------------------------------------------------------------------ towers

    def _vision(self) -> Flops:
        """One image through the ViT: patch embedding, then blocks of full (bidirectional) attention."""
        config, trains = self.spec.vision, self.trainable.vision
        grid = self.image_size // config.patch_size
        tokens, width = grid * grid + 1, config.hidden_size
        patch = _weighted(2 * grid * grid * 3 * config.patch_size**2 * width, False, trains)
        linear_forward = 2 * tokens * width * (4 * width + 2 * config.intermediate_size)
        attention_forward = 4 * tokens * tokens * width
        block = _weighted(linear_forward, trains, trains) + _attention(attention_forward, trains)
        last = 2 * tokens * config.intermediate_size * width  # fc2, not recomputed
        recompute = (linear_forward + attention_forward - last) if self.checkpointing and trains else 0.0
        total = patch + config.num_layers * block
        return Flops(total, total + config.num_layers * recompute)

    def _abstractor(self) -> Flops:
        """One image through the abstractor: queries attend to ``[queries; vision tokens]``, then the projection."""
        config = self.spec.abstractor
        trains = self.trainable.abstractor
        grads = trains or self.trainable.vision
        grid = self.image_size // self.spec.vision.patch_size
        queries, width = config.num_queries, config.hidden_size
        context = queries + grid * grid + 1
        linear_forward = (
            2 * width * width * (2 * queries + 2 * context) + 6 * queries * width * config.intermediate_size
        )
        attention_forward = 4 * queries * context * width
        layer = _weighted(linear_forward, grads, trains) + _attention(attention_forward, grads)
        projection = _weighted(2 * queries * width * self.spec.decoder.hidden_size, grads, trains)
        last = 2 * queries * config.intermediate_size * width  # w2, not recomputed
        recompute = (linear_forward + attention_forward - last) if self.checkpointing and grads else 0.0
        total = config.num_layers * layer + projection
        return Flops(total, total + config.num_layers * recompute)

    def _mlp_projector(self) -> Flops:
        """One image through the MLP projector: two linears on each patch token (not checkpointed). Its first
        linear's input gradient is needed only when the ViT trains; the second's when anything before it does."""
        trains, vision = self.trainable.abstractor, self.trainable.vision
        patches, width = self.tokens_per_image, self.spec.decoder.hidden_size
        first = _weighted(2 * patches * self.spec.vision.hidden_size * width, vision, trains)
        second = _weighted(2 * patches * width * width, trains or vision, trains)
        return Flops(first + second, first + second)

    def _decoder(self, text: int, images: int, any_images: bool, labelled: int | None) -> Flops:
        """One row through the decoder layers and the LM head; ``any_images``: the batch holds images (then
        gradients may flow through the decoder to the image towers); ``labelled``: the LM head's rows as run
        (None: every token)."""
        config, trains = self.spec.decoder, self.trainable
        image_tokens = images * self.tokens_per_image
        length = text + image_tokens
        width, kv_width = config.hidden_size, config.num_kv_heads * config.head_dim
        grads = trains.decoder_grads(any_images)
        shared_forward = 2 * length * width * (2 * width + 3 * config.intermediate_size)
        shared = _weighted(shared_forward, grads, trains.decoder)
        kv_forward = 4 * width * kv_width  # K and V for one token
        text_kv = _weighted(kv_forward, grads, trains.decoder)
        visual_kv = _weighted(kv_forward, grads, trains.visual)
        causal_forward = 2 * width * length * (length + 1)
        square_forward = 4 * width * length * length
        kv = text * text_kv + image_tokens * visual_kv
        model_layer = shared + kv + _attention(causal_forward, grads)
        hardware_layer = shared + kv + _attention(square_forward, grads)
        recompute = 0.0
        if self.checkpointing and grads:
            # The down projection is not recomputed, unless its output must be put back in sequence order (a
            # routed batch): that gather saves its index, so the recomputation runs through the projection.
            routed = config.modality_adaptive and any_images
            down = 0 if routed else 2 * length * config.intermediate_size * width
            recompute = shared_forward + square_forward + length * kv_forward - down
        head = _weighted(2 * width * config.vocab_size, grads, trains.lm_head)
        executed_head = head * (length if labelled is None else labelled)
        layers = config.num_layers
        return Flops(layers * model_layer + head * length, layers * (hardware_layer + recompute) + executed_head)
