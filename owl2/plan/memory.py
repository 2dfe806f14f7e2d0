"""Bytes per GPU of one training stage: weights, gradients, optimizer state, communication buffers, activations.

Precision policy (what training does):

- bf16: frozen parameters are stored in bf16 (2 B), with no fp32 copy and no per-forward cast. Trainable
  parameters keep fp32 masters (4 B), fp32 gradients (4 B) and AdamW's two fp32 moments (8 B). Under DDP the
  autocast forward keeps a bf16 cast (2 B) of each trainable weight except the embeddings alive until the
  backward has used it (counted with the weights); ``gradient_as_bucket_view=True`` makes DDP's buckets the gradients
  themselves (no buffer). FSDP2 (bf16 mixed precision) divides the stored parameters, gradients and optimizer
  state by the world size and all-gathers bf16 unit parameters: the root unit (embeddings, head and stems, kept
  gathered through the step) and two layer units in flight (the one computing, the one prefetched); its
  reduce-scatter holds a unit's unsharded gradients in bf16 plus their fp32 copy for the reduction, for two units
  at once.
- fp32: every stored number is 4 B, FSDP2 gathers fp32 units.

Activations are the tensors autograd saves for the backward pass, per layer, from the layers' code (see the
``_decoder_layer`` and ``_abstractor_layer`` docstrings), plus the backward's working set. A linear layer saves its
input only when its weight trains (PyTorch saves only what the gradients it must compute need); attention kernels
save Q, K, V, the output and the log-sum-exp, and the boolean padding mask turns into an additive bias per layer
(``[B, 1, T, T]`` in the compute dtype). Norms save their fp32 input. Activation checkpointing keeps each layer's
input plus the internals of the layer being recomputed. The loss keeps the fp32 log-probabilities (4 B per logit);
training computes the logits at the label positions only, the estimate takes every token as labelled (the upper
bound, as the labels depend on the data).

The backward frees each part's saved tensors once it is through it (loss, decoder, projector, vision: the forward
in reverse), so the peak is its largest moment: the saved tensors still alive plus the working set there
(:func:`activation_bytes`). The working sets: at the loss, the gradients of the log-probabilities and of the
logits (8 B per logit); at a trainable LM head, its weight's gradient; in a layer, the gradients flowing through
its MLP, or the whole gradient of a trainable weight, which the backward builds before adding it to ``.grad`` or
to DDP's bucket (``[4096, 11008]`` in fp32, 172 MiB, for a 7B MLP matrix; for a stage that trains the decoder this
term, not the per-token ones, dominates short rows). Under FSDP2 those weight gradients are the unit's unsharded
gradients, counted with the buffers.

Gradient accumulation keeps the gradients between micro-batches, so the peak is the sum of all parts.

tests/test_plan.py checks every part against a measured fp32 training step at true widths (stage 1 and
decoder-training sets, with and without checkpointing) and at a 32k vocabulary (the loss's and the head's
moments). The bf16 sizes follow the same formulas. Measured once on a CPU under autocast (DDP's layout, a narrow
decoder with a 32k vocabulary; not a test, CPU kernels), weights and activations together came out 2-8% high
without checkpointing and 2-18% high with it, where the casts of checkpointed layers do not outlive the forward.
FSDP2's buffers are not measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from owl2.config import ModelConfig
from owl2.plan.flops import Trainable

GIB = 1024**3


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
        # autocast's bf16 casts of the trainable weights, kept for the backward (embeddings are looked up in fp32)
        embeddings = spec.decoder.vocab_size * spec.decoder.hidden_size if trainable.decoder else 0
        weights += (params.trainable - embeddings) * 2
    return MemoryEstimate(
        weights=weights,
        gradients=params.trainable * 4 / shards,
        optimizer=params.trainable * 8 / shards,
        buffers=buffers,
        activations=activation_bytes(spec, trainable, work),
    )


@dataclass(frozen=True)
class _Stack:
    """One tower's repeated layers for the whole micro-batch; all zero when no gradient passes through them."""

    layers: int
    attention: float = 0.0
    """Saved bytes of one layer's first half: its input norm and attention (the mask bias included)."""
    mlp: float = 0.0
    """Saved bytes of its second half: the second norm and the MLP (the abstractor's FFN)."""
    layer_input: float = 0.0
    """The checkpoint of one layer: its input."""
    working: float = 0.0
    """Largest working set above the saved tensors in one layer's backward (:func:`_layer_working`)."""

    def saved(self, checkpointing: bool) -> float:
        """Bytes saved through the forward: every layer's tensors, or with checkpointing every layer's input."""
        return self.layers * (self.layer_input if checkpointing else self.attention + self.mlp)

    def peak(self, checkpointing: bool) -> float:
        """Bytes above :meth:`saved` while the backward goes through the tower's last layer (the first it meets):
        the working set, plus with checkpointing the layer's recomputed tensors."""
        return self.working + (self.attention + self.mlp if checkpointing else 0.0)


def activation_bytes(spec: ModelConfig, trainable: Trainable, work: Workload) -> float:
    """Saved activations and backward working set of one micro-batch at the backward's peak, in bytes.

    The forward runs vision, projector, decoder, loss; the backward meets them in reverse order and frees each
    one's saved tensors as it leaves it. While it is in one of them, what is live is the saved tensors of those
    before it in the forward, its own and its working set; the estimate is the largest of these moments.
    """
    images = work.micro_batch * work.images_per_row
    vision_tokens = (work.image_size // spec.vision.patch_size) ** 2 + 1
    ckpt = work.checkpointing
    moments = []  # (saved, peak above the saved) of each part, in forward order
    if images:
        vision = _vision_stack(spec, trainable, work, vision_tokens)
        moments.append((vision.saved(ckpt) + images * _vision_tail(spec, trainable, work), vision.peak(ckpt)))
        moments.append(_projector(spec, trainable, work, vision_tokens))
    decoder = _decoder_stack(spec, trainable, work)
    if trainable.decoder and work.strategy != "fsdp":
        # the embedding's dense gradient [vocab, width], fp32 (embeddings run outside autocast), built once the
        # decoder's backward is done (under FSDP2 it is the root unit's gradient, counted with the buffers)
        moments.append((0.0, 4.0 * spec.decoder.vocab_size * spec.decoder.hidden_size))
    moments.append((decoder.saved(ckpt), decoder.peak(ckpt)))
    moments.append(_loss(spec, trainable, work))
    best, before = 0.0, 0.0
    for saved, peak in moments:
        best = max(best, before + saved + peak)
        before += saved
    return best


def _compute_bytes(work: Workload) -> int:
    return 2 if work.bf16 else 4


def _weight_grad_bytes(work: Workload) -> int:
    """Bytes per element of a trainable linear weight's gradient while it is built: the backward computes it
    whole before adding it to ``.grad`` (or copying it into DDP's bucket). Under autocast it is the bf16 gradient
    of the weight's bf16 cast plus its fp32 copy. Under FSDP2 the gradients of a unit are the unsharded ones
    counted with the buffers: 0 here."""
    if work.strategy == "fsdp":
        return 0
    return 2 + 4 if work.bf16 else 4


def _layer_working(
    tokens: int, width: int, inner: int, work: Workload, mlp_weight: int, attention_weight: int, mlp_saved: float
) -> float:
    """Working set above the saved tensors in the backward of one layer (``tokens`` rows), the largest of:

    - the MLP's activation gradients: three ``[tokens, inner]`` and two ``[tokens, width]`` in the compute dtype;
    - its output projection with a trainable weight (``mlp_weight`` elements of its largest matrix): the incoming
      gradient, the gradient of its input and the weight's whole gradient;
    - the attention's largest trainable weight (``attention_weight`` elements): its whole gradient with the
      gradients of the attention output and of the layer input; the layer's MLP half (``mlp_saved``) has been
      freed by then.
    """
    compute, grad = _compute_bytes(work), _weight_grad_bytes(work)
    moments = [tokens * (3 * inner + 2 * width) * compute]
    if mlp_weight:
        moments.append(tokens * (inner + width) * compute + grad * mlp_weight)
    if attention_weight:
        moments.append(grad * attention_weight + 2 * tokens * width * compute - mlp_saved)
    return max(moments)


def _loss(spec: ModelConfig, trainable: Trainable, work: Workload) -> tuple[float, float]:
    """(saved, peak above it) of the decoder's tail and the loss, per micro-batch.

    Saved per token: the final norm's fp32 input, its normalised input when its weight trains, the LM head's input
    (compute dtype) when the head trains, and the fp32 log-probabilities the cross-entropy keeps (4 B per logit).
    The peak is the larger of the loss's backward (the gradients of the log-probabilities and of the fp32 logits,
    8 B per logit) and, with a trainable head, the head's (the log-probabilities freed: the logits' gradient in
    the compute dtype, the head weight's whole gradient and the gradient of the head's input). Training computes
    the logits at the label positions only; the estimate takes every token as labelled (the upper bound, as the
    labels depend on the data).
    """
    width, vocab = spec.decoder.hidden_size, spec.decoder.vocab_size
    tokens, compute = work.micro_batch * work.length, _compute_bytes(work)
    head_input = compute * width if trainable.lm_head else 0
    saved = tokens * (4 * width + (4 * width if trainable.decoder else 0) + head_input + 4 * vocab)
    peak = 8.0 * tokens * vocab
    if trainable.lm_head:
        logits = tokens * vocab  # the log-probabilities (4 B each, in ``saved``) are freed by then
        head = (compute - 4) * logits + _weight_grad_bytes(work) * vocab * width + compute * tokens * width
        peak = max(peak, head)
    return saved, peak


def _decoder_stack(spec: ModelConfig, trainable: Trainable, work: Workload) -> _Stack:
    config = spec.decoder
    images = work.images_per_row > 0
    tokens = work.micro_batch * work.length
    if not trainable.decoder_grads(images):
        return _Stack(config.num_layers)
    residual32 = not work.bf16 or trainable.decoder  # fp32 embeddings (masters) make the residual stream fp32
    visual_share = min(1.0, work.images_per_row * spec.tokens_per_image_at(work.image_size) / work.length)
    attention, mlp = _decoder_layer(spec, trainable, visual_share, _compute_bytes(work), residual32)
    mask_bias = work.micro_batch * work.length**2 * _compute_bytes(work)
    width, inner = config.hidden_size, config.intermediate_size
    if trainable.decoder:  # Q and O, and the text K/V, at least as large as the visual copies
        attention_weight = width * max(config.num_heads, config.num_kv_heads) * config.head_dim
    else:
        attention_weight = width * config.num_kv_heads * config.head_dim if trainable.visual else 0
    mlp_weight = width * inner if trainable.decoder else 0
    working = _layer_working(tokens, width, inner, work, mlp_weight, attention_weight, tokens * mlp)
    return _Stack(
        config.num_layers,
        tokens * attention + mask_bias,
        tokens * mlp,
        tokens * width * (4 if residual32 else 2),
        working,
    )


def _decoder_layer(
    spec: ModelConfig, trainable: Trainable, visual_share: float, compute: int, residual32: bool
) -> tuple[float, float]:
    """Saved bytes per token of one decoder layer (gradients pass through it), its attention half and its MLP
    half; ``visual_share``: the fraction of the tokens that are image tokens.

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
    norm = 4 * width + residual_bytes * width * (shared * (1 - visual_share) + trainable.visual * visual_share)
    attention = compute * (2 * width + 2 * kv_width) + 4 * config.num_heads
    linear_inputs = compute * width * ((shared or visual) + shared)  # QKV input, O input
    mlp = compute * width * shared + compute * inner * (3 + shared)  # the MLP's input when it trains
    return norm + linear_inputs + attention, norm + mlp


def _vision_stack(spec: ModelConfig, trainable: Trainable, work: Workload, tokens: int) -> _Stack:
    config = spec.vision
    if not trainable.vision:
        return _Stack(config.num_layers)
    rows = work.micro_batch * work.images_per_row * tokens
    width, inner, compute = config.hidden_size, config.intermediate_size, _compute_bytes(work)
    # Per token of a block: the fp32 inputs of both LayerNorms; in the compute dtype the QKV input, Q/K/V, the
    # attention output and its reshaped copy (attention half), the MLP input and the quick-GELU's input, sigmoid
    # and product (MLP half).
    attention, mlp = rows * (4 * width + compute * 6 * width), rows * (4 * width + compute * (width + 3 * inner))
    working = _layer_working(rows, width, inner, work, width * inner, 3 * width * width, mlp)  # fused QKV
    return _Stack(config.num_layers, attention, mlp, rows * 4 * width, working)


def _vision_tail(spec: ModelConfig, trainable: Trainable, work: Workload) -> float:
    """Saved bytes per image outside the ViT's blocks when it trains: the pixels (the patch convolution's
    input), the pre-norm's and the final norm's fp32 inputs."""
    if not trainable.vision:
        return 0.0
    tokens = (work.image_size // spec.vision.patch_size) ** 2 + 1
    return _compute_bytes(work) * 3 * work.image_size**2 + 2 * 4 * tokens * spec.vision.hidden_size


def _projector(spec: ModelConfig, trainable: Trainable, work: Workload, tokens: int) -> tuple[float, float]:
    """(saved, peak above it) of the projector when gradients pass through it: the abstractor's layers and the
    vision output every one of them reads (fp32), or the MLP projector's tensors; the peak is the whole gradient
    of its largest trainable matrix, or the abstractor's layer working set where larger."""
    images = work.micro_batch * work.images_per_row
    if not (trainable.abstractor or trainable.vision):
        return 0.0, 0.0
    decoder_width, grad = spec.decoder.hidden_size, _weight_grad_bytes(work)
    if spec.projector == "mlp":
        largest = max(spec.vision.hidden_size, decoder_width) * decoder_width if trainable.abstractor else 0
        return images * _mlp_projector(spec, trainable, work), grad * largest
    stack = _abstractor_stack(spec, trainable, work)
    output = grad * spec.abstractor.hidden_size * decoder_width if trainable.abstractor else 0
    saved = stack.saved(work.checkpointing) + images * 4 * tokens * spec.vision.hidden_size
    return saved, max(stack.peak(work.checkpointing), output)


def _abstractor_stack(spec: ModelConfig, trainable: Trainable, work: Workload) -> _Stack:
    config = spec.abstractor
    images = work.micro_batch * work.images_per_row
    attention, mlp = _abstractor_layer(spec, trainable, work)
    queries, width, inner = images * config.num_queries, config.hidden_size, config.intermediate_size
    trains = trainable.abstractor
    working = _layer_working(queries, width, inner, work, width * inner * trains, width * width * trains, images * mlp)
    return _Stack(config.num_layers, images * attention, images * mlp, queries * 4 * width, working)


def _abstractor_layer(spec: ModelConfig, trainable: Trainable, work: Workload) -> tuple[float, float]:
    """Saved bytes per image of one abstractor layer (gradients pass through it), its attention half and its FFN
    half.

    fp32: the query norm's input; the FFN norm's input and the SwiGLU's inner-norm input. Compute dtype: Q, K, V
    and the attention output; the SwiGLU's two projections and its activation; when the abstractor trains, the
    inputs of its linears (the keys' and values' ``[queries; image]`` context, the queries and the reshaped
    attention output; the FFN input and the inner norm's output).
    """
    config = spec.abstractor
    compute = _compute_bytes(work)
    queries, width, inner = config.num_queries, config.hidden_size, config.intermediate_size
    context = queries + (work.image_size // spec.vision.patch_size) ** 2 + 1
    trains = trainable.abstractor
    attention = 4 * queries * width + compute * ((2 * queries + 2 * context) * width)
    attention += compute * (2 * context * width + 2 * queries * width) * trains
    ffn = 4 * (queries * width + queries * inner) + compute * 3 * queries * inner
    ffn += compute * (queries * width + queries * inner) * trains
    return attention, ffn


def _mlp_projector(spec: ModelConfig, trainable: Trainable, work: Workload) -> float:
    """Saved bytes per image of the MLP projector (gradients pass through it), in the compute dtype: the GELU's
    input, and when the projector trains the inputs of both linears (the patch tokens, the GELU's output)."""
    patches = spec.tokens_per_image_at(work.image_size)
    vision_width, width = spec.vision.hidden_size, spec.decoder.hidden_size
    saved = width + (vision_width + width if trainable.abstractor else 0)
    return _compute_bytes(work) * patches * saved
