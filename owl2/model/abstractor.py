"""Visual abstractor: a few learnable queries summarise hundreds of vision tokens for the decoder.

Each layer lets the queries attend jointly to themselves and to the image: keys and values are
``[normed queries; normed image tokens]`` (queries first), with fixed sin-cos positions added to the
keys and queries (never to the values). The same vision output feeds every layer. The residual of the
attention starts from the *normalised* queries, and the SwiGLU has a LayerNorm on its hidden units:
both are details of the official code that the paper does not mention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from owl2.config import AbstractorConfig

# The official query/key norms use nn.LayerNorm's default eps while the config's eps (1e-6) only
# reaches the SwiGLU's inner norm; keep both to match the released weights.
_TORCH_LAYER_NORM_EPS = 1e-5


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``[len(positions), dim]``: ``[sin(p*w_k) | cos(p*w_k)]`` with ``w_k = 10000^(-k/(dim/2))``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d_with_cls(grid_size: int, dim: int) -> torch.Tensor:
    """``[1 + g*g, dim]`` MAE-style table, row-major patches, a zero row first for the CLS token.

    Channels ``[0, dim/2)`` encode the column, ``[dim/2, dim)`` the row.
    """
    coords = torch.arange(grid_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    table = torch.cat([sincos_1d(cols.flatten(), dim // 2), sincos_1d(rows.flatten(), dim // 2)], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0)


class SwiGLU(nn.Module):
    """``w2(norm(silu(w1 x) * w3 x))`` with biases everywhere, as in the abstractor."""

    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.norm(F.silu(self.w1(x)) * self.w3(x)))


class AbstractorLayer(nn.Module):
    def __init__(self, config: AbstractorConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_heads
        self.norm_queries = nn.LayerNorm(dim, eps=_TORCH_LAYER_NORM_EPS)
        self.norm_image = nn.LayerNorm(dim, eps=_TORCH_LAYER_NORM_EPS)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim, eps=_TORCH_LAYER_NORM_EPS)
        self.ffn = SwiGLU(dim, config.intermediate_size, config.layer_norm_eps)

    def forward(
        self, queries: torch.Tensor, image: torch.Tensor, query_pos: torch.Tensor, image_pos: torch.Tensor
    ) -> torch.Tensor:
        """queries ``[B, Q, D]``, image ``[B, N, D]``, query_pos ``[Q, D]``, image_pos ``[N, D]`` -> ``[B, Q, D]``."""
        batch, num_queries, dim = queries.shape
        queries = self.norm_queries(queries)
        context = torch.cat([queries, self.norm_image(image)], dim=1)
        context_pos = torch.cat([query_pos, image_pos], dim=0)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], self.num_heads, dim // self.num_heads).transpose(1, 2)

        q = heads(self.q_proj(queries + query_pos))
        k = heads(self.k_proj(context + context_pos))
        v = heads(self.v_proj(context))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, num_queries, dim)
        queries = queries + self.out_proj(attended)
        return queries + self.ffn(self.norm_ffn(queries))


class VisualAbstractor(nn.Module):
    """Vision tokens ``[B, 1 + g*g, D]`` -> decoder tokens ``[B, num_queries + 1, decoder_width]``."""

    def __init__(self, config: AbstractorConfig, grid_size: int, decoder_width: int) -> None:
        super().__init__()
        dim = config.hidden_size
        self.queries = nn.Parameter(torch.zeros(1, config.num_queries, dim))
        self.layers = nn.ModuleList(AbstractorLayer(config) for _ in range(config.num_layers))
        self.proj = nn.Linear(dim, decoder_width)
        # Appended after the projection: each image ends with a learned end-of-image token.
        self.eos = nn.Parameter(torch.zeros(1, 1, decoder_width))
        # Fixed tables, recomputed rather than stored in checkpoints.
        self.grid_size = grid_size
        self.register_buffer("query_pos", torch.empty(config.num_queries, dim), persistent=False)
        self.register_buffer("image_pos", torch.empty(grid_size * grid_size + 1, dim), persistent=False)
        self.reset_position_tables()

    def set_grid_size(self, grid_size: int) -> None:
        """Switch to a ``grid_size x grid_size`` patch grid (another image size): rebuilds the image table once,
        so forwards at the new size reuse it instead of building one on the host every time."""
        self.grid_size = grid_size
        self.reset_position_tables()

    def reset_position_tables(self) -> None:
        """(Re)compute the sin-cos tables in float32, e.g. after allocation on the meta device."""
        num_queries, dim = self.query_pos.shape
        device = self.query_pos.device
        if device.type == "meta":
            self.image_pos = torch.empty(self.grid_size * self.grid_size + 1, dim, device=device)
            return
        self.query_pos = sincos_1d(torch.arange(num_queries), dim).to(device)
        self.image_pos = sincos_2d_with_cls(self.grid_size, dim).to(device)

    def _image_positions(self, num_tokens: int) -> torch.Tensor:
        if num_tokens == self.image_pos.shape[0]:
            return self.image_pos
        # Another resolution than set_grid_size's (a host-built table copied to the device in every forward):
        # the official code crashes here, we build the right grid.
        grid = int(round((num_tokens - 1) ** 0.5))
        if grid * grid + 1 != num_tokens:
            raise ValueError(f"abstractor expects 1 + g*g vision tokens (CLS + square grid), got {num_tokens}")
        return sincos_2d_with_cls(grid, self.image_pos.shape[1]).to(self.image_pos)

    def forward(self, image: torch.Tensor, return_queries: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Summarise vision tokens.

        Args:
            image: ``[B, N, D]`` vision encoder output (CLS first).
            return_queries: also return the last layer's queries ``[B, Q, D]`` (before the projection).

        Returns:
            ``[B, Q + 1, decoder_width]``: Q projected queries then the end-of-image token.
        """
        image_pos = self._image_positions(image.shape[1]).to(image.dtype)
        query_pos = self.query_pos.to(image.dtype)
        # A tensor of its own, as every later layer gets: a compiled layer then serves all layers with one graph (an
        # expanded, stride-0 view of the parameter would need a graph of its own).
        queries = self.queries.repeat(image.shape[0], 1, 1)
        for layer in self.layers:
            queries = layer(queries, image, query_pos, image_pos)
        tokens = torch.cat([self.proj(queries), self.eos.expand(image.shape[0], -1, -1)], dim=1)
        return (tokens, queries) if return_queries else tokens
