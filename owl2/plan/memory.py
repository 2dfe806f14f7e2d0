"""Bytes per GPU of one training stage: weights, gradients, optimizer state, communication buffers, activations.

Precision policy (what training does):

- bf16: frozen parameters are stored in bf16 (2 B), with no fp32 copy and no per-forward cast. Trainable
  parameters keep fp32 masters (4 B), fp32 gradients (4 B) and AdamW's two fp32 moments (8 B). Under DDP the
  autocast forward keeps a bf16 cast of each trainable weight (2 B) alive until the backward has used it (counted
  with the weights); ``gradient_as_bucket_view=True`` makes DDP's buckets the gradients themselves (no buffer).
  FSDP2 (bf16 mixed precision) divides the stored parameters, gradients and optimizer state by the world size and
  all-gathers bf16 unit parameters: the root unit (embeddings, head and stems, kept gathered through the step)
  and two layer units in flight (the one computing, the one prefetched); its reduce-scatter holds a unit's
  unsharded gradients in bf16 plus their fp32 copy for the reduction, for two units at once.
- fp32: every stored number is 4 B, FSDP2 gathers fp32 units.

Activations are the tensors autograd saves for the backward pass, per layer, from the layers' code (see the
``_decoder_layer``, ``_vision_block`` and ``_abstractor_layer`` docstrings). A linear layer saves its input only
when its weight trains (PyTorch saves only what the gradients it must compute need); attention kernels save
Q, K, V, the output and the log-sum-exp, and the boolean padding mask turns into an additive bias per layer
(``[B, 1, T, T]`` in the compute dtype). Norms save their fp32 input. Activation checkpointing keeps each layer's
input plus one layer's internals (the one being recomputed). The backward pass adds a working set: the
gradients flowing through one layer's MLP (three ``[tokens, intermediate]`` and two ``[tokens, width]`` tensors in
the compute dtype) for the widest tower. The logits cost 12 B each at the loss: the fp32
log-softmax the loss saves, its gradient and the gradient of its input. Training computes them at the label
positions only; the estimate takes every token as labelled (the upper bound, as the labels depend on the data).

Gradient accumulation keeps the gradients between micro-batches, so the peak is the sum of all parts.

tests/test_plan.py checks every part against a measured fp32 training step at true widths (stage 1's trainable
set, with and without checkpointing); the bf16 sizes follow the same formulas and are not measured yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from owl2.config import ModelConfig
from owl2.plan.flops import Trainable

GIB = 1024**3
LOGIT_BYTES = 12


@dataclass(frozen=True)
class ParameterLayout:
    """Parameter counts the memory estimate needs (from the meta-device model)."""

    total: int
    trainable: int
    largest_unit: int
    """Parameters of the largest FSDP2 layer unit (a decoder layer at 7B)."""
    largest_trainable_unit: int
    """Trainable parameters of the unit (root included) with the most of them."""
    root: int
    """Parameters outside every layer unit: embeddings, LM head, final norms, the vision stem, the abstractor's
    queries and projection."""


@dataclass(frozen=True)
class Workload:
    """What one GPU runs: the stage's strategy and shapes."""

    strategy: str  # ddp or fsdp
    world_size: int
    bf16: bool
    micro_batch: int
    length: int
    """Decoder tokens per row (text plus images x tokens_per_image)."""
    images_per_row: int
    image_size: int
    checkpointing: bool


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU."""

    weights: float
    gradients: float
    optimizer: float
    buffers: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buffers + self.activations

    def gib(self) -> dict[str, float]:
        parts = ("weights", "gradients", "optimizer", "buffers", "activations", "total")
        return {name: round(getattr(self, name) / GIB, 2) for name in parts}


def estimate_memory(spec: ModelConfig, trainable: Trainable, params: ParameterLayout, work: Workload) -> MemoryEstimate:
    """Bytes per GPU of ``work`` on the model ``spec`` with ``trainable`` parts (see the module docstring)."""
    frozen = params.total - params.trainable
    frozen_bytes = 2 if work.bf16 else 4
    shards = work.world_size if work.strategy == "fsdp" else 1
    weights = (frozen * frozen_bytes + params.trainable * 4) / shards
    buffers = 0.0
    if work.strategy == "fsdp":
        gathered = params.root + 2 * params.largest_unit
        buffers = gathered * frozen_bytes + 2 * params.largest_trainable_unit * (frozen_bytes + 4)
    elif work.bf16:
        weights += params.trainable * 2  # autocast's bf16 casts of the trainable weights, kept for the backward
    return MemoryEstimate(
        weights=weights,
        gradients=params.trainable * 4 / shards,
        optimizer=params.trainable * 8 / shards,
        buffers=buffers,
        activations=activation_bytes(spec, trainable, work),
    )


@dataclass(frozen=True)
class _Stack:
    """One tower's repeated layers for the whole micro-batch: saved bytes of a layer and of its input."""

    layers: int
    internals: float
    layer_input: float
    working: float = 0.0
    """Gradients alive while the backward pass goes through one layer."""


def activation_bytes(spec: ModelConfig, trainable: Trainable, work: Workload) -> float:
    """Saved activations of one micro-batch at the start of its backward pass, in bytes."""
    images = work.micro_batch * work.images_per_row
    vision_tokens = (work.image_size // spec.vision.patch_size) ** 2 + 1
    stacks = [_decoder_stack(spec, trainable, work)]
    per_token = LOGIT_BYTES * spec.decoder.vocab_size + _decoder_tail(spec, trainable, work)
    other = work.micro_batch * work.length * per_token
    if images:
        stacks.append(_vision_stack(spec, trainable, work, vision_tokens))
        if spec.projector == "abstractor":
            stacks.append(_abstractor_stack(spec, trainable, work))
        other += images * _image_tail(spec, trainable, work, vision_tokens)
    working = max(stack.working for stack in stacks)
    if not work.checkpointing:
        return other + working + sum(stack.layers * stack.internals for stack in stacks)
    inputs = sum(stack.layers * stack.layer_input for stack in stacks if stack.internals)
    return other + working + inputs + max(stack.internals for stack in stacks)


def _decoder_stack(spec: ModelConfig, trainable: Trainable, work: Workload) -> _Stack:
    config = spec.decoder
    images = work.images_per_row > 0
    tokens = work.micro_batch * work.length
    if not trainable.decoder_grads(images):
        return _Stack(config.num_layers, 0.0, 0.0)
    residual32 = not work.bf16 or trainable.decoder  # fp32 embeddings (masters) make the residual stream fp32
    visual_share = min(1.0, work.images_per_row * spec.tokens_per_image_at(work.image_size) / work.length)
    per_token = _decoder_layer(spec, trainable, visual_share, 2 if work.bf16 else 4, residual32)
    mask_bias = work.micro_batch * work.length**2 * (2 if work.bf16 else 4)
    residual = tokens * config.hidden_size * (4 if residual32 else 2)
    working = _working(tokens, config.hidden_size, config.intermediate_size, work)
    return _Stack(config.num_layers, tokens * per_token + mask_bias, residual, working)


def _working(tokens: int, width: int, inner: int, work: Workload) -> float:
    return tokens * (3 * inner + 2 * width) * (2 if work.bf16 else 4)


def _decoder_layer(
    spec: ModelConfig, trainable: Trainable, visual_share: float, compute: int, residual32: bool
) -> float:
    """Saved bytes per token of one decoder layer (gradients pass through it); ``visual_share``: the fraction of
    the tokens that are image tokens.

    Each token goes through its own modality's norm copies (routing by span): both RMSNorms save their input in
    fp32 and, where the copy's weight trains, the normalised input. Q, K, V, the attention output and the
    log-sum-exp are saved by the attention kernel; the inputs of trainable linears (the norms' outputs, the
    attention output reshaped for O) are saved in the compute dtype; the SwiGLU saves its gate, its activation
    and its up projection, and the down projection's input when the MLP trains.
    """
    config = spec.decoder
    width, kv_width, inner = config.hidden_size, config.num_kv_heads * config.head_dim, config.intermediate_size
    shared, visual = trainable.decoder, trainable.visual and visual_share > 0
    residual_bytes = 4 if residual32 else 2
    norm_inputs = 2 * 4 * width
    normed = 2 * residual_bytes * width * (shared * (1 - visual_share) + trainable.visual * visual_share)
    linear_inputs = compute * width * ((shared or visual) + shared + shared)  # QKV input, MLP input, O input
    attention = compute * (2 * width + 2 * kv_width) + 4 * config.num_heads
    mlp = compute * inner * (3 + shared)
    return norm_inputs + normed + linear_inputs + attention + mlp


def _decoder_tail(spec: ModelConfig, trainable: Trainable, work: Workload) -> float:
    """Per token after the layers: the final norm's fp32 input, its normalised input when its weight trains, and
    the LM head's input (compute dtype) when the head trains."""
    width = spec.decoder.hidden_size
    head_input = (2 if work.bf16 else 4) * width if trainable.lm_head else 0
    return 4 * width + (4 * width if trainable.decoder else 0) + head_input


def _vision_stack(spec: ModelConfig, trainable: Trainable, work: Workload, tokens: int) -> _Stack:
    config = spec.vision
    images = work.micro_batch * work.images_per_row
    if not trainable.vision:
        return _Stack(config.num_layers, 0.0, 0.0)
    internals = images * tokens * _vision_block(spec, 2 if work.bf16 else 4)
    working = _working(images * tokens, config.hidden_size, config.intermediate_size, work)
    return _Stack(config.num_layers, internals, images * tokens * 4 * config.hidden_size, working)


def _vision_block(spec: ModelConfig, compute: int) -> float:
    """Saved bytes per token of one ViT block (trainable): the fp32 inputs of both LayerNorms; in the compute
    dtype the QKV input, Q/K/V, the attention output and its reshaped copy, the MLP input, and the quick-GELU's
    input, sigmoid and product."""
    width, inner = spec.vision.hidden_size, spec.vision.intermediate_size
    return 4 * 2 * width + compute * (7 * width + 3 * inner)


def _abstractor_stack(spec: ModelConfig, trainable: Trainable, work: Workload) -> _Stack:
    config = spec.abstractor
    images = work.micro_batch * work.images_per_row
    if not (trainable.abstractor or trainable.vision):
        return _Stack(config.num_layers, 0.0, 0.0)
    per_image = _abstractor_layer(spec, trainable, work)
    return _Stack(config.num_layers, images * per_image, images * 4 * config.num_queries * config.hidden_size)


def _abstractor_layer(spec: ModelConfig, trainable: Trainable, work: Workload) -> float:
    """Saved bytes per image of one abstractor layer (gradients pass through it).

    fp32: the query norm's input, the FFN norm's input and the SwiGLU's inner-norm input. Compute dtype: Q, K, V
    and the attention output; the SwiGLU's two projections and its activation; when the abstractor trains, the
    inputs of its linears (the keys' and values' ``[queries; image]`` context, the queries, the reshaped attention
    output, the FFN input and the inner norm's output).
    """
    config = spec.abstractor
    compute = 2 if work.bf16 else 4
    queries, width, inner = config.num_queries, config.hidden_size, config.intermediate_size
    context = queries + (work.image_size // spec.vision.patch_size) ** 2 + 1
    always = 4 * (2 * queries * width + queries * inner) + compute * (
        (2 * queries + 2 * context) * width + 3 * queries * inner
    )
    own = compute * (2 * context * width + 3 * queries * width + queries * inner) if trainable.abstractor else 0.0
    return always + own


def _image_tail(spec: ModelConfig, trainable: Trainable, work: Workload, tokens: int) -> float:
    """Per image outside the layer stacks: the vision output that every abstractor layer's norm reads (fp32) or
    the MLP projector's saved tensors, and with a trainable ViT the pixels (the patch convolution's input), the
    pre-norm's and final norm's inputs."""
    width = spec.vision.hidden_size
    grads = trainable.abstractor or trainable.vision
    if spec.projector == "mlp":
        tail = _mlp_projector(spec, trainable, work) if grads else 0.0
    else:
        tail = 4 * tokens * width if grads else 0.0
    if trainable.vision:
        tail += (2 if work.bf16 else 4) * 3 * work.image_size**2 + 2 * 4 * tokens * width
    return tail


def _mlp_projector(spec: ModelConfig, trainable: Trainable, work: Workload) -> float:
    """Saved bytes per image of the MLP projector (gradients pass through it), in the compute dtype: the GELU's
    input, and when the projector trains the inputs of both linears (the patch tokens, the GELU's output)."""
    patches = spec.tokens_per_image_at(work.image_size)
    vision_width, width = spec.vision.hidden_size, spec.decoder.hidden_size
    saved = width + (vision_width + width if trainable.abstractor else 0)
    return (2 if work.bf16 else 4) * patches * saved
