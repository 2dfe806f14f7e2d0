"""``Owl2ForCausalLM``: vision encoder -> visual abstractor -> modality-adaptive LLaMA decoder.

Two switches turn it into the ablations: ``model.projector: mlp`` puts LLaVA-1.5's MLP projector in the
abstractor's place, and ``decoder.modality_adaptive: false`` makes the decoder a plain LLaMA.

Images enter the token sequence through placeholders: every ``-200`` in ``input_ids`` is replaced by
that image's ``tokens_per_image`` tokens (the abstractor's ``num_queries + 1``, or the MLP projector's
one per patch), images being consumed in batch order, then placeholder order. Logits, labels and masks
all refer to this expanded sequence, as in the official model. Unlike the official model, rows without
images need no dummy image, labels are optional, and a left-padded batch gives each row exactly the
result it gets alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ConfigError, ModelConfig, build, to_dict
from owl2.model.abstractor import VisualAbstractor
from owl2.model.checkpoint_io import LoadReport, load_into, read_config, read_state_dict
from owl2.model.decoder import Decoder, Multiway, PackedRows, Partition, llama_config
from owl2.model.foreign_config import model_config_from_official
from owl2.model.keymaps import OFFICIAL, Conversion, convert, match_modality_layout
from owl2.model.layout import RowLayout
from owl2.model.projector import MlpProjector
from owl2.model.vision import VisionEncoder

logger = logging.getLogger(__name__)


class Owl2Config(PretrainedConfig):
    """transformers config wrapping the typed :class:`~owl2.config.ModelConfig` (saved as ``config.json``)."""

    model_type = "owl2"

    vision: dict | None = None
    abstractor: dict | None = None
    decoder: dict | None = None
    projector: str = "abstractor"
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        spec = self.spec  # validates the three sections together
        self.vision, self.abstractor, self.decoder = (
            to_dict(spec.vision),
            to_dict(spec.abstractor),
            to_dict(spec.decoder),
        )
        self.projector = spec.projector

    @classmethod
    def from_spec(cls, spec: ModelConfig, **kwargs: Any) -> Owl2Config:
        return cls(**to_dict(spec), **kwargs)

    @property
    def spec(self) -> ModelConfig:
        sections = {"vision": self.vision, "abstractor": self.abstractor, "decoder": self.decoder}
        return build(ModelConfig, {**sections, "projector": self.projector}, "model")

    @property
    def initializer_range(self) -> float:
        return self.spec.decoder.initializer_range

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> LlamaConfig:
        # Generation and caches read the decoder's shape and special tokens from here.
        return llama_config(self.spec.decoder)


@dataclass
class Owl2Output(CausalLMOutputWithPast):
    """Causal-LM output plus the expanded sequence's bookkeeping, all ``[B, T]`` over the expanded tokens.

    ``attention_mask`` and ``visual_mask`` cover the whole sequence seen so far (cached tokens included);
    ``labels`` are the expanded labels (``-100`` on image and padding positions).
    """

    attention_mask: torch.Tensor | None = None
    visual_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass
class Spliced:
    """The expanded sequence after image tokens replaced their placeholders."""

    inputs_embeds: torch.Tensor  # [B, T, D]
    attention_mask: torch.Tensor  # [B, T], 1 = real token
    visual_mask: torch.Tensor  # [B, T] bool
    labels: torch.Tensor | None  # [B, T]
    visual_tokens: int  # True entries of visual_mask, on the host
    sample_ids: torch.Tensor | None = None  # [B, T] each token's sample within its row (packed rows)


def splice_images(
    input_ids: torch.Tensor,
    embeddings: nn.Embedding,
    image_tokens: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    image_counts: list[int] | None = None,
    row_lengths: list[int] | None = None,
    sample_ids: torch.Tensor | None = None,
) -> Spliced:
    """Replace every ``-200`` placeholder by its image's tokens, vectorised over the batch.

    Args:
        input_ids: ``[B, L]`` token ids with ``-200`` placeholders.
        embeddings: the decoder's token embedding.
        image_tokens: ``[N, K, D]`` abstractor outputs, N = number of placeholders in the batch.
        attention_mask: ``[B, L]`` (None: all ones). labels: ``[B, L]`` or None.
        image_counts: placeholders per row, known on the host (the collate function provides them);
            without them they are read back from the device once.
        row_lengths: real tokens per row of a right-padded batch, on the host (a training batch's
            :class:`~owl2.model.layout.RowLayout`): the padding then goes after every row's tokens, and the
            expanded rows are as long as the longest one needs.
        sample_ids: ``[B, L]`` each token's sample within its row (packed rows), expanded alongside: an image's
            tokens belong to its placeholder's sample, added padding to the row's last sample.

    Rows that expand to different lengths are padded with zero embeddings (mask 0, label -100). Without
    ``row_lengths`` the padding goes where the batch already pads: after the tokens in a right-padded batch;
    before them when every row ends with a real token (left-padded or unpadded, as in generation), so the last
    position stays real. The output length depends on the placeholder counts; given ``image_counts`` nothing is
    read back.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    per_image = 0 if image_tokens is None else image_tokens.shape[1]
    num_images = 0 if image_tokens is None else image_tokens.shape[0]
    is_image = input_ids == IMAGE_TOKEN_INDEX
    counts = list(image_counts) if image_counts is not None else is_image.sum(dim=1).tolist()
    if len(counts) != batch:
        raise ValueError(f"image_counts has {len(counts)} entries for a batch of {batch} rows")
    if sum(counts) != num_images:
        raise ValueError(
            f"input_ids hold {sum(counts)} image placeholders ({IMAGE_TOKEN_INDEX}; per row {counts}) but "
            f"{num_images} images were given: pass exactly one image per placeholder"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    text_embeds = embeddings(input_ids.clamp(min=0))
    if num_images == 0:
        return Spliced(text_embeds, attention_mask, torch.zeros_like(is_image), labels, 0, sample_ids)

    index, target, total = _splice_index(is_image, attention_mask, counts, per_image, row_lengths)

    dim = text_embeds.shape[-1]
    bank = torch.cat(
        [text_embeds.view(-1, dim), image_tokens.reshape(-1, dim).to(text_embeds.dtype), text_embeds.new_zeros(1, dim)]
    )
    mask_bank = torch.cat([attention_mask.flatten(), attention_mask.new_ones(num_images * per_image + 1)])
    mask_bank[-1] = 0
    expanded_labels = None
    if labels is not None:
        label_bank = torch.cat([labels.flatten(), labels.new_full((num_images * per_image + 1,), IGNORE_INDEX)])
        expanded_labels = label_bank[index]
    visual_mask = (index >= batch * length) & (index < bank.shape[0] - 1)
    expanded_ids = None
    if sample_ids is not None:
        # Each slot's position in input_ids; added padding takes the row's last column (its last sample).
        text_rows = torch.arange(batch * length, device=device).view(batch, length)
        origin = text_rows[:, -1:].repeat(1, total + 1)
        origin.scatter_(1, target.view(batch, -1), text_rows[..., None].expand_as(target).reshape(batch, -1))
        expanded_ids = sample_ids.flatten()[origin[:, :total]]
    return Spliced(bank[index], mask_bank[index], visual_mask, expanded_labels, num_images * per_image, expanded_ids)


def _splice_index(
    is_image: torch.Tensor,
    attention_mask: torch.Tensor,
    counts: list[int],
    per_image: int,
    row_lengths: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where :func:`splice_images` gathers each expanded slot from: ``index [B, total]`` into its bank of text
    embeddings (``B*L`` rows), image tokens (``N*K`` rows) and one zero row (padding); ``target [B, L, K]``, the
    slot each input position's ``k``-th token goes to (``total``: dropped); ``total``, the expanded length."""
    batch, length = is_image.shape
    device = is_image.device
    # Each position of input_ids covers 1 slot, or per_image slots for a placeholder.
    widths = torch.where(is_image, per_image, 1)
    starts = widths.cumsum(dim=1) - widths
    if row_lengths is None:
        total = length + (per_image - 1) * max(counts)
        right_align = attention_mask[:, -1].bool().all()
        shift = torch.where(right_align, total - widths.sum(dim=1), 0)
        starts = starts + shift[:, None]
    else:
        total = max(n + (per_image - 1) * count for n, count in zip(row_lengths, counts, strict=True))

    # Gather from one bank: [text embeddings (B*L rows); image tokens (N*K rows); one zero row for padding].
    text_rows = torch.arange(batch * length, device=device).view(batch, length)
    image_ordinal = is_image.flatten().cumsum(dim=0).view(batch, length) - 1
    slot = torch.arange(per_image, device=device)
    source = torch.where(
        is_image[..., None], batch * length + image_ordinal[..., None] * per_image + slot, text_rows[..., None]
    )
    # Unused slots of text positions are written to a scratch column that is dropped afterwards, and so is the
    # padding beyond the longest row given row_lengths.
    target = starts[..., None] + slot
    target = torch.where((is_image[..., None] | (slot == 0)) & (target < total), target, total)
    pad_row = batch * length + sum(counts) * per_image
    index = torch.full((batch, total + 1), pad_row, dtype=torch.long, device=device)
    index.scatter_(1, target.view(batch, -1), source.view(batch, -1))
    return index[:, :total], target, total


def count_labels(input_ids: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor | None = None) -> list[int]:
    """Per row, or per sample of packed rows (given their ``[B, L]`` ``sample_ids``), the labels the expanded
    sequence keeps (not -100, not on an image placeholder): the forward's ``label_counts``. Call it on host
    tensors (the collate's), or it reads the device back."""
    kept = (labels != IGNORE_INDEX) & (input_ids != IMAGE_TOKEN_INDEX)
    if sample_ids is None:
        return kept.sum(dim=1).tolist()
    per_sample = torch.zeros_like(input_ids).scatter_add_(1, sample_ids, kept.long())
    samples = (sample_ids.amax(dim=1) + 1).tolist()
    return [count for row, n in zip(per_sample.tolist(), samples, strict=True) for count in row[:n]]


def _match_decoder_layout(conversion: Conversion, spec: ModelConfig, source: str) -> Conversion:
    """``conversion`` in the decoder layout of ``spec``, with one warning line when it had the other one."""
    matched = match_modality_layout(conversion, spec)
    if matched is conversion:
        return conversion
    if spec.decoder.modality_adaptive:
        logger.warning(
            "%s has one norm pair and K/V per decoder layer: both modality branches of the modality-adaptive "
            "decoder start from them, as from LLaMA-2",
            source,
        )
    else:
        logger.warning(
            "decoder.modality_adaptive is false: %s keeps the text branch of its modality-adaptive norms and K/V "
            "(the one the LLaMA-2 weights started) and drops the %d visual copies",
            source,
            len(matched.dropped) - len(conversion.dropped),
        )
    return matched


class Owl2ForCausalLM(PreTrainedModel, GenerationMixin):
    """mPLUG-Owl2: ``forward(input_ids, attention_mask, images, labels)`` with ``-200`` image placeholders."""

    config_class = Owl2Config
    config: Owl2Config
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer", "Block", "AbstractorLayer"]
    _supports_sdpa = True

    def __init__(self, config: Owl2Config) -> None:
        super().__init__(config)
        spec = config.spec
        self.vision = VisionEncoder(spec.vision)
        # The projector slot keeps the abstractor's name whichever projector fills it: stage parts, LR scales and
        # parameter groups called ``abstractor`` then mean the projector in use.
        self.abstractor: VisualAbstractor | MlpProjector = (
            MlpProjector(spec.vision.hidden_size, spec.decoder.hidden_size)
            if spec.projector == "mlp"
            else VisualAbstractor(spec.abstractor, spec.vision.grid_size, spec.decoder.hidden_size)
        )
        self.decoder = Decoder(spec.decoder)
        self.lm_head = nn.Linear(spec.decoder.hidden_size, spec.decoder.vocab_size, bias=False)
        self.post_init()

    # ---------------------------------------------------------------------------------------- set-up

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, VisualAbstractor):
            init.normal_(module.queries, std=std)
            init.normal_(module.eos, std=std)
            module.reset_position_tables()
        elif isinstance(module, VisionEncoder):
            init.normal_(module.pos_embed, std=std)
            init.normal_(module.cls_token, std=std)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        strict: bool = True,
        overrides: dict[str, Any] | list[str] | None = None,
    ) -> Owl2ForCausalLM:
        """Load a folder in the official mPLUG-Owl2 format or one written by ``save_pretrained``.

        Official folders (``model_type: mplug_owl2``) are converted through ``keymaps.OFFICIAL``;
        safetensors or sharded ``.bin`` files are both read (``.bin`` with ``weights_only=True``).
        ``strict`` raises if any model weight is missing or any checkpoint key is unknown; otherwise
        missing weights keep a fresh initialisation. The report is kept as ``model.load_report``.
        ``overrides`` change the folder's architecture (``["decoder.modality_adaptive=false"]``); the weights
        must still fit it, except for the decoder's layout (see :meth:`from_state_dict`).
        """
        config = read_config(path)
        if config.get("model_type") == "mplug_owl2":
            spec = model_config_from_official(config).with_overrides(overrides)
            owl2_config = Owl2Config.from_spec(spec)
            conversion = convert(read_state_dict(path), OFFICIAL, spec)
        elif config.get("model_type") == Owl2Config.model_type:
            owl2_config = Owl2Config.from_dict(config)
            if overrides:
                owl2_config = Owl2Config.from_dict({**config, **to_dict(owl2_config.spec.with_overrides(overrides))})
            conversion = Conversion(state_dict=read_state_dict(path))
        else:
            raise ConfigError(
                f"{path}/config.json has model_type {config.get('model_type')!r}; "
                "expected 'owl2' or the official 'mplug_owl2'"
            )
        model = cls.from_state_dict(
            owl2_config, conversion, device=device, dtype=dtype, strict=strict, source=str(path)
        )
        return model.eval()

    @classmethod
    def from_state_dict(
        cls,
        config: Owl2Config,
        conversion: Conversion,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        strict: bool = True,
        fresh: tuple[str, ...] = (),
        source: str = "state dict",
    ) -> Owl2ForCausalLM:
        """Build without a throw-away random initialisation: allocate, initialise what is missing, load.

        Args:
            dtype: parameter dtype to allocate (e.g. bfloat16 for a 7B model); buffers stay float32.
            strict: raise if a weight is missing or a checkpoint key is unknown.
            fresh: key prefixes that are new on purpose (e.g. ``("abstractor.",)`` when starting from
                LLaMA-2 and CLIP): they are initialised, may be missing even when strict, and are logged
                as new rather than missing.

        Decoder weights of the other layout are converted with a warning (``keymaps.match_modality_layout``):
        into a decoder without the modality-adaptive module a MAM checkpoint gives its text copies of the norms and
        K/V (the branch the released LLaMA-2 weights started; the visual copies are dropped), and into a MAM decoder
        one copy fills both branches, as LLaMA-2 weights do.
        """
        conversion = _match_decoder_layout(conversion, config.spec, source)
        with torch.device("meta"):
            model = cls(config)
        if dtype is not None:
            model.to(dtype)
        model.to_empty(device=device)
        missing = set(model.state_dict()) - set(conversion.state_dict)
        unplanned = sorted(key for key in missing if not key.startswith(fresh))
        if unplanned and strict:
            raise ValueError(f"{source} lacks {len(unplanned)} model weights, e.g. {unplanned[:10]}")
        owners = {name.rpartition(".")[0] for name in missing}
        with torch.no_grad():
            for name, module in model.named_modules():
                if name in owners:
                    model._init_weights(module)
        report: LoadReport = load_into(model, conversion)
        if report.unexpected and strict:
            raise ValueError(
                f"{source} has {len(report.unexpected)} keys the model does not know, e.g. {report.unexpected[:10]}"
            )
        report.log(source, fresh)
        model.reset_fixed_buffers()
        model.load_report = report
        return model

    def reset_fixed_buffers(self) -> None:
        """Recompute the non-learned tables (RoPE frequencies, sin-cos positions) in float32.

        They are not part of checkpoints and must not be rounded to a low-precision dtype.
        """
        rotary = self.decoder.rotary_emb
        inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config)
        rotary.inv_freq = inv_freq.to(self.device)
        rotary.original_inv_freq = inv_freq.clone().to(self.device)
        if isinstance(self.abstractor, VisualAbstractor):
            self.abstractor.reset_position_tables()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.decoder.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_image_size(self, image_size: int) -> None:
        """Change the input resolution (e.g. 224 -> 448 between stages), resampling position embeddings."""
        self.vision.set_image_size(image_size)
        if isinstance(self.abstractor, VisualAbstractor):
            self.abstractor.set_grid_size(self.vision.patch_embed.grid_size[0])
        self.config.vision = {**self.config.vision, "image_size": image_size}

    # ---------------------------------------------------------------------------------------- forward

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` pixels -> ``[N, tokens_per_image, decoder_width]`` decoder tokens (the abstractor's
        ``num_queries + 1``, or the MLP projector's ``(H // patch_size) ** 2``)."""
        image_features, _ = self.vision(images)
        return self.abstractor(image_features)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_counts: list[int] | None = None,
        label_counts: list[int] | None = None,
        layout: RowLayout | None = None,
        sample_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Owl2Output:
        """Logits (and loss) over the expanded sequence.

        Args:
            input_ids: ``[B, L]``; ``-200`` marks an image.
            attention_mask: ``[B, L]``, 1 = real token (None: all real). With a non-empty cache it covers
                the cached (expanded) tokens plus the new ones, as generation keeps it.
            images: ``[N, 3, H, W]``, one per placeholder, batch order then placeholder order.
            labels: ``[B, L]`` with -100 for ignored tokens; loss = mean cross-entropy of the next token.
                Positions are counted from the mask, so padding never shifts them.
            image_counts: images per row as host integers (from the collate function): the forward
                then never waits for the device.
            label_counts: with ``labels``, per row (or per packed sample) the labels the loss can use, as host
                integers (:func:`count_labels` on the collate's tensors; only their sum matters here). This is the
                training switch: the LM head and the loss then run only on the positions that predict a label,
                and ``logits`` is None. Leave it out wherever logits are needed (generation, evaluation scoring,
                golden tests).
            layout: how a right-padded training batch fills its rows, on the host (``Batch.to`` passes the
                collator's). The expanded rows are then right-aligned and attention needs no padding mask: causal
                SDPA over whole rows (its flash kernel), or, for rows packed with several samples, causal within
                each sample, with positions restarting at every sample. Leave it out for left padding and for
                generation (no cache may precede a layout's tokens).
            sample_ids: ``[B, L]`` with a packed ``layout``: each token's sample within its row (0, 1, ...), the
                row's trailing padding carrying its last sample's number.
            cache: a transformers ``Cache``; created when ``use_cache`` and none is given.
            logits_to_keep: compute logits for the last this-many positions only (0 = all).

        Returns:
            :class:`Owl2Output` with ``logits [B, T, vocab]`` (T = expanded length; None given ``label_counts``),
            ``loss``, ``cache``, the expanded ``attention_mask``/``visual_mask``/``labels``, and ``hidden_states``
            if asked (the decoder input, each layer's input after the first, and the final normed output).
        """
        if kwargs:
            raise TypeError(f"Owl2ForCausalLM.forward got unexpected arguments {sorted(kwargs)}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0

        if layout is not None:
            self._check_layout(layout, input_ids, sample_ids, past_length)
            image_counts = layout.image_counts if image_counts is None else image_counts
        spliced, step_visual_mask, packed = self._embed(
            input_ids, attention_mask, images, labels, image_counts, layout, sample_ids, past_length
        )
        hidden, hidden_states = self.decoder(
            spliced.inputs_embeds,
            # Right-padded rows need no mask: causal attention never lets a real token see the padding after it.
            attention_mask=spliced.attention_mask if layout is None else None,
            visual_mask=step_visual_mask,
            cache=cache,
            output_hidden_states=bool(output_hidden_states),
            visual_tokens=spliced.visual_tokens,
            packed=packed,
        )
        logits, loss = self._head(hidden, spliced.labels, label_counts, logits_to_keep)
        return Owl2Output(
            loss=loss,
            logits=logits,
            cache=cache if use_cache else None,
            hidden_states=hidden_states,
            attention_mask=spliced.attention_mask,
            visual_mask=spliced.visual_mask,
            labels=spliced.labels,
        )

    def _embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        images: torch.Tensor | None,
        labels: torch.Tensor | None,
        image_counts: list[int] | None,
        layout: RowLayout | None,
        sample_ids: torch.Tensor | None,
        past_length: int,
    ) -> tuple[Spliced, torch.Tensor | None, PackedRows | None]:
        """The decoder's input: text embeddings with each image's tokens spliced in (none after a prefill), the
        visual mask of this step's tokens (None: no image among them) and, for packed rows, their samples."""
        if past_length:
            # Decoding after a prefill: new tokens are text, the mask already covers the expanded past.
            if images is not None:
                raise ValueError("images can only be given with the prompt, not with cached decoding steps")
            return Spliced(self.decoder.embed_tokens(input_ids), attention_mask, None, labels, 0), None, None
        image_tokens = self.encode_images(images) if images is not None and images.shape[0] else None
        spliced = splice_images(
            input_ids,
            self.decoder.embed_tokens,
            image_tokens,
            attention_mask,
            labels,
            image_counts,
            row_lengths=layout.row_tokens if layout is not None else None,
            sample_ids=sample_ids if layout is not None and layout.packed else None,
        )
        packed = None
        if layout is not None and spliced.sample_ids is not None:
            per_image = image_tokens.shape[1] if image_tokens is not None else 1
            longest = layout.longest_span(per_image, spliced.sample_ids.shape[1])
            packed = PackedRows(spliced.sample_ids, layout.samples, longest)
        return spliced, spliced.visual_mask if image_tokens is not None else None, packed

    def _head(
        self, hidden: torch.Tensor, labels: torch.Tensor | None, label_counts: list[int] | None, logits_to_keep: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, loss): in training (``label_counts`` given) the loss alone, from the labelled positions."""
        if labels is not None and label_counts is not None:
            return None, self.label_loss(hidden, labels, sum(label_counts))
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        if labels is None:
            return logits, None
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss

    @staticmethod
    def _check_layout(
        layout: RowLayout, input_ids: torch.Tensor, sample_ids: torch.Tensor | None, past_length: int
    ) -> None:
        if len(layout.tokens) != input_ids.shape[0]:
            raise ValueError(f"the layout has {len(layout.tokens)} rows for a batch of {input_ids.shape[0]}")
        if past_length:
            raise ValueError("a row layout describes whole training rows; it cannot follow cached tokens")
        if layout.packed and (sample_ids is None or sample_ids.shape != input_ids.shape):
            raise ValueError("packed rows need sample_ids of input_ids' shape: each token's sample within its row")

    def label_loss(self, hidden: torch.Tensor, labels: torch.Tensor, label_count: int) -> torch.Tensor:
        """Mean next-token cross-entropy, the LM head run only where a label is predicted.

        hidden ``[B, T, D]`` final normed states; labels ``[B, T]`` expanded; ``label_count`` (host) entries of
        ``labels`` are not -100. Label ``j`` is predicted at position ``j - 1`` of its row; a label in a row's
        first column has none and is ignored, which leaves the same terms as cross-entropy over all positions.
        """
        labelled = Partition.of(labels != IGNORE_INDEX, label_count).chosen  # [K] flat indices
        targets = labels.flatten().index_select(0, labelled)
        targets = torch.where(labelled % labels.shape[1] == 0, IGNORE_INDEX, targets)
        inputs = hidden.flatten(0, 1).index_select(0, (labelled - 1).clamp(min=0))
        return F.cross_entropy(self.lm_head(inputs).float(), targets, ignore_index=IGNORE_INDEX)

    # ---------------------------------------------------------------------------------------- generation

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        is_first_iteration: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        inputs = super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)
        # Images are consumed by the prefill; without a cache every step re-reads the whole prompt.
        if is_first_iteration or not kwargs.get("use_cache", True):
            inputs["images"] = images
        return inputs

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.Tensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.Tensor | None, dict[str, Any]]:
        images = model_kwargs.pop("images", None)
        if images is not None and expand_size > 1 and input_ids is not None:
            # Images belong to rows, not batch positions: repeat each row's images as one block, so that
            # beams and multiple return sequences keep consuming them in row order.
            counts = (input_ids == IMAGE_TOKEN_INDEX).sum(dim=1).tolist()
            images = torch.cat([chunk for chunk in images.split(counts) for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs["images"] = images
        return input_ids, model_kwargs

    def _update_model_kwargs_for_generation(
        self, outputs: Owl2Output, model_kwargs: dict[str, Any], **kwargs: Any
    ) -> dict[str, Any]:
        if outputs.cache is not None and outputs.attention_mask is not None:
            # The cache holds the expanded sequence; from now on the mask must describe it.
            model_kwargs["attention_mask"] = outputs.attention_mask
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, **kwargs)

    # ---------------------------------------------------------------------------------------- optimizer policy

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters that AdamW must not decay (timm's hook of the same name).

        Every parameter of a norm (LayerNorm, RMSNorm, both multiway copies) or of an embedding table,
        every bias, and the learned tokens and positions: the vision ``cls_token`` and ``pos_embed``, the
        abstractor ``queries`` and ``eos``. Decaying these pulls scales and offsets towards zero, which
        only hurts (BEiT, MAE and LLaVA all exempt them).
        """
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        exempt_types = (nn.LayerNorm, nn.RMSNorm, LlamaRMSNorm, nn.Embedding)
        names = set()
        for module_name, module in self.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                if isinstance(module, exempt_types) or param_name == "bias":
                    names.add(f"{module_name}.{param_name}" if module_name else param_name)
        vision_params = {name for name, _ in self.vision.named_parameters()}
        # timm's list also names tokens this ViT does not have (reg_token, dist_token).
        names |= {f"vision.{name}" for name in self.vision.no_weight_decay() & vision_params}
        if isinstance(self.abstractor, VisualAbstractor):
            names |= {"abstractor.queries", "abstractor.eos"}
        return names

    def visual_branch_parameter_names(self) -> set[str]:
        """Full names of the decoder's visual-branch parameters: the visual copies of the modality-adaptive
        norms and K/V projections, which a stage trains alone as ``decoder.visual`` (the paper's stage 1). None
        without the modality-adaptive module: ``decoder.visual`` then trains nothing in the decoder."""
        return {
            f"decoder.{module_name}.visual.{name}"
            for module_name, module in self.decoder.named_modules()
            if isinstance(module, Multiway)
            for name, _ in module.visual.named_parameters()
        }

    def param_group_info(self, name: str) -> tuple[str, int, int]:
        """``(module, layer_id, num_layers)`` of a parameter, for layer-wise LR decay.

        ``module`` is ``vision``, ``abstractor`` or ``decoder`` (which includes ``lm_head``). For the
        vision encoder the layer ids follow BEiT/EVA: 0 for the embeddings (``cls_token``, ``pos_embed``,
        ``patch_embed``, ``norm_pre``), ``i + 1`` for block ``i``, ``num_blocks + 1`` for the final
        ``norm``; ``num_layers`` is that largest id, ``num_blocks + 1``, so a parameter's LR scale is
        ``layer_decay ** (num_layers - layer_id)``: 1 for the final norm, ``layer_decay`` for the last
        block. The abstractor and the decoder are not decayed by depth: ``layer_id = num_layers = 0``.

        Raises ``KeyError`` for a name the policy does not know, so a new parameter cannot silently get
        some LR.
        """
        top, _, rest = name.partition(".")
        if top in ("decoder", "lm_head"):
            return "decoder", 0, 0
        if top == "abstractor":
            return "abstractor", 0, 0
        if top != "vision":
            raise KeyError(f"parameter {name!r} belongs to no module of the optimizer policy")
        last = len(self.vision.blocks) + 1
        part, _, below = rest.partition(".")
        if part == "blocks":
            return "vision", int(below.partition(".")[0]) + 1, last
        if part == "norm":
            return "vision", last, last
        if part in ("cls_token", "pos_embed", "patch_embed", "norm_pre"):
            return "vision", 0, last
        raise KeyError(f"vision parameter {name!r} has no layer id (not an embedding, a block or the final norm)")
