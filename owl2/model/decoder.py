"""LLaMA-2 decoder with the modality-adaptive module (MAM), on transformers' LLaMA building blocks.

In every layer the two RMSNorms and the K/V projections exist twice, one copy per modality (text,
visual); queries, output projection, MLP, embeddings and head are shared. Each token goes through
the copy of its modality, and only through it.

Routing by span: a layer gathers its tokens grouped by modality (text rows, then visual rows), runs
every per-token part on the grouped rows (each copy on its own group: one GEMM per branch, no work
on the other modality's tokens) and puts the rows back in sequence order only where the sequence
matters (attention, the residual stream). The gathers use index tensors of a size known on the host
(the number of visual tokens, from the images per row), so the host never waits for the device (the
official code gathers with ``nonzero()``, a sync per module per forward). A batch known to be all
text on the host (no images, or cached decoding where every new token is text) runs the text copy
alone, without any gather.

With ``decoder.modality_adaptive: false`` (the ablation) each layer has one copy of each norm and of K/V for all
tokens, under LLaMA's own names (``input_layernorm.weight``, ``self_attn.k_proj.weight``): the layer is a plain
LLaMA layer and the decoder routes nothing.

Attention takes one of three forms (:class:`Attention`, chosen once per forward): an explicit mask where
padding may sit before real tokens or a cache precedes the new ones (generation, evaluation); plain causal
attention without a mask for whole rows and right-padded training rows, which lets SDPA use its flash kernels
and skip the blocks above the diagonal; and block-diagonal causal attention for rows packed with several
samples, each sample's tokens attending only within it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from owl2.config import DecoderConfig


def llama_config(config: DecoderConfig) -> LlamaConfig:
    """The transformers ``LlamaConfig`` describing the shared (text) part of the decoder."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        initializer_range=config.initializer_range,
        tie_word_embeddings=False,
        attention_bias=False,
    )


class _Permute(torch.autograd.Function):
    """``x.index_select(0, order)`` for a permutation ``order``, whose gradient is the inverse gather: autograd's
    own backward of ``index_select`` would scatter-add into a zero-filled tensor, several times slower."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@dataclass(frozen=True)
class Partition:
    """The tokens of a batch in two groups by a boolean mask whose number of True entries is known on the host.

    ``group`` gathers a tensor's tokens into rows ``[N, ...]``: the False group first, then the True group, each
    in sequence order; ``ungroup`` puts rows back in sequence order. Both are gathers by index tensors of fixed
    size, built without reading anything back from the device.
    """

    order: torch.Tensor
    """``[N]`` long: the flat token index of each grouped row."""
    position: torch.Tensor
    """``[N]`` long: the grouped row of each flat token (the inverse permutation of ``order``)."""
    sizes: tuple[int, int]
    """Rows of the False group and of the True group."""
    shape: torch.Size
    """The mask's shape: the leading dimensions of the tensors grouped."""

    @classmethod
    def of(cls, mask: torch.Tensor, count: int | None = None) -> Partition:
        """Partition by ``mask`` (bool, any shape) with ``count`` True entries (None: read back, one host sync).

        A wrong ``count`` cannot be detected without a sync: the caller vouches for it.
        """
        flat = mask.flatten()
        if count is None:
            count = int(flat.sum())
        if not 0 <= count <= flat.numel():
            raise ValueError(f"a partition of {flat.numel()} tokens cannot have {count} in its True group")
        true_up_to = flat.cumsum(0)  # True entries at or before each token
        index = torch.arange(flat.numel(), device=flat.device)
        false_count = flat.numel() - count
        position = torch.where(flat, false_count + true_up_to - 1, index - true_up_to)
        order = torch.empty_like(position).scatter_(0, position, index)
        return cls(order, position, (false_count, count), mask.shape)

    @property
    def chosen(self) -> torch.Tensor:
        """``[count]`` flat indices of the True tokens, in sequence order."""
        return self.order[self.sizes[0] :]

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """``[*shape, ...]`` -> ``[N, ...]`` rows, the False group first."""
        return _Permute.apply(x.reshape(-1, *x.shape[len(self.shape) :]), self.order, self.position)

    def ungroup(self, rows: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` grouped rows -> ``[*shape, ...]`` in sequence order."""
        return _Permute.apply(rows, self.position, self.order).view(*self.shape, *rows.shape[1:])

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grouped rows -> (False group, True group), views."""
        return rows.split(self.sizes)


def group(x: torch.Tensor, routing: Partition | None) -> torch.Tensor:
    """Tokens grouped by modality, or ``x`` itself when every token is text."""
    return x if routing is None else routing.group(x)


def ungroup(rows: torch.Tensor, routing: Partition | None) -> torch.Tensor:
    """The inverse of :func:`group`."""
    return rows if routing is None else routing.ungroup(rows)


class Multiway(nn.Module):
    """Two copies of a module, ``text`` and ``visual``; each token uses the copy of its modality."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.text = make()
        self.visual = make()

    def forward(self, x: torch.Tensor, routing: Partition | None = None) -> torch.Tensor:
        """x ``[..., D]`` all text when ``routing`` is None, else ``[N, D]`` rows grouped by it (text rows first,
        see :class:`Partition` over the visual mask) -> the same rows through their own copies ``[..., D']``."""
        if routing is None:
            return self.text(x)
        text, visual = routing.split(x)
        return torch.cat([self.text(text), self.visual(visual)])


def per_modality(config: DecoderConfig, make: Callable[[], nn.Module]) -> nn.Module:
    """A :class:`Multiway` of ``make()`` with the modality-adaptive module, else one ``make()`` for every token."""
    return Multiway(make) if config.modality_adaptive else make()


def run_per_modality(module: nn.Module, rows: torch.Tensor, routing: Partition | None) -> torch.Tensor:
    """Run a :func:`per_modality` part on rows grouped by ``routing``. Without a routing (all text, or no
    modality-adaptive module: the decoder then builds none) every row takes the one path: the text copy of a
    Multiway, or the shared module."""
    return module(rows) if routing is None else module(rows, routing)


@dataclass(frozen=True)
class Attention:
    """Which keys each query attends to, in the form its kernel takes; built once per forward for every layer.

    * ``mask`` ``[B, 1, Q, S]`` bool (True = may attend): SDPA with that mask. For padding before real tokens
      (left-padded prompts, splices of unequal rows) and cached decoding; packed rows off CUDA (the tests' CPU).
    * ``cu_seqlens`` ``[n + 1]`` int32: the flat ``B * T`` tokens as ``n`` causal sequences of at most ``longest``
      tokens for ``torch.nn.attention.varlen.varlen_attn``: packed rows on CUDA in half precision.
    * neither: causal over whole rows, SDPA with ``is_causal`` and no mask, so that it may take its flash kernel
      (any mask rules that out and computes the full ``T x T``).

    Packed rows on CUDA take ``varlen_attn`` rather than FlexAttention with a ``BlockMask``: varlen calls the flash
    kernel SDPA uses (or cuDNN's) directly, runs only each sample's causal blocks, and needs neither
    ``torch.compile`` (FlexAttention without it materialises the scores; owl2 compiles layer by layer at most,
    ``stage.compile``, and packed shapes change every batch) nor a block mask built per batch. Off CUDA
    FlexAttention has no backward (torch 2.14), so the boolean block-diagonal mask through SDPA is the CPU path;
    both start from the same sample boundaries (:func:`sample_starts`, :func:`packed_attention`).
    """

    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    longest: int = 0
    dtype: torch.dtype | None = None
    """For ``cu_seqlens``: the half-precision dtype the kernel runs in (autocast does not reach ``varlen_attn``)."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grouped: bool) -> torch.Tensor:
        """q ``[B, H, Q, Dh]``, k and v ``[B, H_kv, S, Dh]`` (views of any strides) -> ``[B, Q, H * Dh]``;
        ``grouped``: ``H_kv < H``. The layer's own bool, not ``H != H_kv`` from the shapes: a compiler with dynamic
        shapes sees the head counts of a layer under FSDP2 as symbolic, and the kernels take no symbolic bool."""
        if self.cu_seqlens is None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self.mask, is_causal=self.mask is None, enable_gqa=grouped
            )
            return out.transpose(1, 2).flatten(2)
        from torch.nn.attention.varlen import varlen_attn

        batch, heads, length, head_dim = q.shape

        def tokens(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, Dh] -> [B * T, H, Dh]
            return x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim).to(self.dtype)

        cu, longest = self.cu_seqlens, self.longest
        out = varlen_attn(
            tokens(q), tokens(k), tokens(v), cu, cu, longest, longest, window_size=(-1, 0), enable_gqa=grouped
        )
        return out.view(batch, length, heads * head_dim)


class ModalityAdaptiveAttention(nn.Module):
    """Causal self-attention with shared Q/O and per-modality K/V (one K/V for all tokens without the
    modality-adaptive module); grouped-query attention allowed."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.grouped = config.num_kv_heads != config.num_heads
        kv_width = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k_proj = per_modality(config, lambda: nn.Linear(config.hidden_size, kv_width, bias=False))
        self.v_proj = per_modality(config, lambda: nn.Linear(config.hidden_size, kv_width, bias=False))
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        normed: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention: Attention,
        routing: Partition | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """normed: the input norm's output, ``[B, Q, D]`` when ``routing`` is None, else its rows ``[N, D]`` grouped
        by ``routing``; ``attention``: which keys each query sees -> ``[B, Q, D]``.

        The projections run on the rows as given (each K/V copy on its own modality's rows); attention needs the
        sequence, so Q, K and V go back to sequence order. They stay sequence-major (``[B, Q, heads, head_dim]``,
        viewed head-major for SDPA), the layout the varlen kernel reads without a copy.
        """
        q = ungroup(self.q_proj(normed), routing).unflatten(-1, (self.num_heads, self.head_dim))
        k = ungroup(run_per_modality(self.k_proj, normed, routing), routing)
        v = ungroup(run_per_modality(self.v_proj, normed, routing), routing)
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            # Cached after the modality-specific projection: image keys keep their visual branch.
            k, v = cache.update(k, v, self.layer_idx)
        return self.o_proj(attention(q, k, v, self.grouped))


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DecoderConfig, llama: LlamaConfig, layer_idx: int) -> None:
        super().__init__()

        def norm() -> LlamaRMSNorm:
            return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

        self.input_layernorm = per_modality(config, norm)
        self.self_attn = ModalityAdaptiveAttention(config, layer_idx)
        self.post_attention_layernorm = per_modality(config, norm)
        self.mlp = LlamaMLP(llama)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention: Attention,
        routing: Partition | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """hidden_states ``[B, Q, D]`` -> ``[B, Q, D]``; ``attention``: which keys each query sees; ``routing``: the
        tokens grouped by modality (a :class:`Partition` over the visual mask), None when every token is text.

        The per-token parts (both norms, the projections, the MLP) run on the grouped rows; the residual stream
        stays in sequence order.
        """
        normed = run_per_modality(self.input_layernorm, group(hidden_states, routing), routing)
        hidden_states = hidden_states + self.self_attn(normed, position_embeddings, attention, routing, cache)
        normed = run_per_modality(self.post_attention_layernorm, group(hidden_states, routing), routing)
        return hidden_states + ungroup(self.mlp(normed), routing)


def causal_padding_mask(padding_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """``[B, S]`` key mask (1 = real token) -> ``[B, 1, Q, S]`` bool mask for the last Q positions.

    A query that may see no key at all (a leading pad) makes SDPA return NaN; such a row may see
    itself instead, which keeps the ignored output finite and changes nothing else.
    """
    key_length = padding_mask.shape[1]
    query_index = torch.arange(key_length - query_length, key_length, device=padding_mask.device)[:, None]
    key_index = torch.arange(key_length, device=padding_mask.device)[None, :]
    allowed = (key_index <= query_index) & padding_mask.bool()[:, None, None, :]
    blind = ~allowed.any(dim=-1, keepdim=True)
    return allowed | (blind & (key_index == query_index))


def positions_from_mask(padding_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Positions of the last Q tokens, counted from each row's first real token.

    A left-padded row thus sees the positions it has alone (the official code counts the pads and
    gives different results in a batch); trailing pads keep counting, as officially.
    """
    leading_pads = (padding_mask.long().cumsum(dim=1) == 0).sum(dim=1, keepdim=True)
    positions = torch.arange(padding_mask.shape[1], device=padding_mask.device)[None, :] - leading_pads
    return positions[:, -query_length:].clamp(min=0)


@dataclass(frozen=True)
class PackedRows:
    """Rows of a right-padded batch that each hold whole samples one after another (``data.packing``)."""

    ids: torch.Tensor
    """``[B, T]`` long: each token's sample within its row, 0, 1, ... in order; a row's trailing padding carries
    its last sample's number (so every token, padding too, attends to something and stays finite)."""
    count: int
    """Samples in the batch, on the host."""
    longest: int
    """Tokens of the longest sample, its row's trailing padding included, on the host."""


def sample_starts(sample_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` sample numbers -> ``[B, T]`` bool, True at the first token of each sample."""
    return F.pad(sample_ids[:, 1:] != sample_ids[:, :-1], (1, 0), value=True)


def positions_in_samples(sample_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` sample numbers -> ``[B, T]`` positions counted from each sample's first token."""
    index = torch.arange(sample_ids.shape[1], device=sample_ids.device)
    first = torch.where(sample_starts(sample_ids), index, 0).cummax(dim=1).values
    return index - first


def packed_attention(packed: PackedRows, varlen_dtype: torch.dtype | None) -> Attention:
    """Causal attention within each sample: varlen sequences in ``varlen_dtype`` (None: a block-diagonal mask)."""
    if varlen_dtype is not None:
        # The flat index of each sample's first token, gathered by a partition of known size: no host sync.
        first = Partition.of(sample_starts(packed.ids), packed.count).chosen
        cu_seqlens = torch.cat([first, first.new_full((1,), packed.ids.numel())]).int()
        return Attention(cu_seqlens=cu_seqlens, longest=packed.longest, dtype=varlen_dtype)
    index = torch.arange(packed.ids.shape[1], device=packed.ids.device)
    same_sample = packed.ids[:, None, :, None] == packed.ids[:, None, None, :]
    return Attention(mask=same_sample & (index[None, :] <= index[:, None]))


def varlen_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype attention runs in (autocast's, else ``x``'s) where ``varlen_attn``'s flash kernel takes it: half
    precision on CUDA. None elsewhere."""
    if x.device.type != "cuda":
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


class Decoder(nn.Module):
    """Embeddings, MAM decoder layers (or plain LLaMA ones) and the final norm (the LM head lives on the causal LM)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.modality_adaptive = config.modality_adaptive
        llama = llama_config(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, llama, i) for i in range(config.num_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(llama)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_hidden_states: bool = False,
        visual_tokens: int | None = None,
        packed: PackedRows | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run the decoder over new tokens, attending to the cached ones.

        Args:
            inputs_embeds: ``[B, Q, D]`` embeddings of the new tokens.
            attention_mask: ``[B, S]`` with S = cached + Q tokens, 1 = real, 0 = padding. None: no padding, or only
                after every row's real tokens (right-padded training rows), which causal attention never lets a
                real token see; attention then needs no mask (the flash path).
            visual_mask: ``[B, Q]`` bool, True for image tokens (None: all text); without the modality-adaptive
                module every token takes the same path and the mask is not used.
            position_ids: ``[B, Q]`` (None: counted from the mask, pads excluded).
            cache: a transformers ``Cache`` updated in place.
            output_hidden_states: return the input of every layer and the final normed output.
            visual_tokens: True entries of ``visual_mask``, known on the host (images x tokens per image): routing
                then never waits for the device. None with a mask: the count is read back once.
            packed: rows of several samples each (no cache, mask or positions then): positions restart at every
                sample and attention stays within it.

        Returns:
            ``[B, Q, D]`` normed hidden states, and optionally ``num_layers + 1`` tensors ``[B, Q, D]``.
        """
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        past = cache.get_seq_length() if cache is not None else 0
        if packed is not None:
            if past or attention_mask is not None or position_ids is not None:
                raise ValueError("packed rows take no cached tokens, attention_mask or position_ids")
            position_ids = positions_in_samples(packed.ids)
            attention = packed_attention(packed, varlen_dtype(inputs_embeds))
        elif attention_mask is None and not past:
            if position_ids is None:
                position_ids = torch.arange(length, device=device)[None].expand(batch, -1)
            attention = Attention()
        else:
            if attention_mask is None:
                attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=device)
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask, length)
            attention = Attention(mask=causal_padding_mask(attention_mask, length))
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        routing = None
        if visual_mask is not None and self.modality_adaptive:
            routing = Partition.of(visual_mask, visual_tokens)

        hidden_states = inputs_embeds
        collected = []
        for layer in self.layers:
            if output_hidden_states:
                collected.append(hidden_states)
            hidden_states = layer(hidden_states, position_embeddings, attention, routing, cache=cache)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            collected.append(hidden_states)
        return hidden_states, tuple(collected) if output_hidden_states else None
