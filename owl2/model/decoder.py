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


class ModalityAdaptiveAttention(nn.Module):
    """Causal self-attention with shared Q/O and per-modality K/V (one K/V for all tokens without the
    modality-adaptive module); grouped-query attention allowed."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        kv_width = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k_proj = per_modality(config, lambda: nn.Linear(config.hidden_size, kv_width, bias=False))
        self.v_proj = per_modality(config, lambda: nn.Linear(config.hidden_size, kv_width, bias=False))
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        normed: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        routing: Partition | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """normed: the input norm's output, ``[B, Q, D]`` when ``routing`` is None, else its rows ``[N, D]`` grouped
        by ``routing``; attention_mask ``[B, 1, Q, S]`` bool (True = may attend) -> ``[B, Q, D]``.

        The projections run on the rows as given (each K/V copy on its own modality's rows); attention needs the
        sequence, so Q, K and V go back to sequence order.
        """
        q = ungroup(self.q_proj(normed), routing).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = ungroup(run_per_modality(self.k_proj, normed, routing), routing)
        v = ungroup(run_per_modality(self.v_proj, normed, routing), routing)
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            # Cached after the modality-specific projection: image keys keep their visual branch.
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).flatten(2))


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
        attention_mask: torch.Tensor,
        routing: Partition | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """hidden_states ``[B, Q, D]`` -> ``[B, Q, D]``; ``routing``: the tokens grouped by modality (a
        :class:`Partition` over the visual mask), None when every token is text.

        The per-token parts (both norms, the projections, the MLP) run on the grouped rows; the residual stream
        stays in sequence order.
        """
        normed = run_per_modality(self.input_layernorm, group(hidden_states, routing), routing)
        hidden_states = hidden_states + self.self_attn(normed, position_embeddings, attention_mask, routing, cache)
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
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run the decoder over new tokens, attending to the cached ones.

        Args:
            inputs_embeds: ``[B, Q, D]`` embeddings of the new tokens.
            attention_mask: ``[B, S]`` with S = cached + Q tokens, 1 = real, 0 = padding (None: all real).
            visual_mask: ``[B, Q]`` bool, True for image tokens (None: all text); without the modality-adaptive
                module every token takes the same path and the mask is not used.
            position_ids: ``[B, Q]`` (None: counted from the mask, pads excluded).
            cache: a transformers ``Cache`` updated in place.
            output_hidden_states: return the input of every layer and the final normed output.
            visual_tokens: True entries of ``visual_mask``, known on the host (images x tokens per image): routing
                then never waits for the device. None with a mask: the count is read back once.

        Returns:
            ``[B, Q, D]`` normed hidden states, and optionally ``num_layers + 1`` tensors ``[B, Q, D]``.
        """
        batch, length, _ = inputs_embeds.shape
        if attention_mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, length)
        mask = causal_padding_mask(attention_mask, length)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        routing = None
        if visual_mask is not None and self.modality_adaptive:
            routing = Partition.of(visual_mask, visual_tokens)

        hidden_states = inputs_embeds
        collected = []
        for layer in self.layers:
            if output_hidden_states:
                collected.append(hidden_states)
            hidden_states = layer(hidden_states, position_embeddings, mask, routing, cache=cache)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            collected.append(hidden_states)
        return hidden_states, tuple(collected) if output_hidden_states else None
