"""Vision encoder: a CLIP-layout ViT built with timm, plus position-embedding resampling.

mPLUG-Owl2 feeds the decoder path with the *last* layer's output after the final LayerNorm, applied to
all tokens with the CLS token kept (LLaVA instead takes the penultimate layer and drops CLS).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import QuickGELU
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from owl2.config import VisionConfig


def resample_position_embedding(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample a ``[1, prefix + g*g, D]`` table to a ``new_grid x new_grid`` patch grid.

    The prefix rows (CLS) are kept as they are; the patch rows are interpolated bicubically on their 2-D
    grid, which is what a 224 -> 448 resolution change (16x16 -> 32x32 patches) needs. Asking for the
    current grid returns the input unchanged.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = int(round(patches.shape[1] ** 0.5))
    if old_grid * old_grid != patches.shape[1]:
        raise ValueError(f"position table has {patches.shape[1]} patch rows, which is not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = patches.shape[-1]
    grid = patches.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


class VisionEncoder(VisionTransformer):
    """timm ``VisionTransformer`` in the CLIP ViT-L/14 layout that mPLUG-Owl2 uses.

    Pre-norm (``norm_pre``) after the embeddings, no patch-embedding bias, quick_gelu MLPs, LayerNorm
    eps from the config (1e-6 for Owl2, unlike CLIP's 1e-5), no classifier head.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__(
            img_size=config.image_size,
            patch_size=config.patch_size,
            num_classes=0,
            global_pool="",
            embed_dim=config.hidden_size,
            depth=config.num_layers,
            num_heads=config.num_heads,
            mlp_ratio=config.intermediate_size / config.hidden_size,
            qkv_bias=True,
            class_token=True,
            pre_norm=True,
            final_norm=True,
            act_layer=QuickGELU,
            norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        )

    @property
    def num_tokens(self) -> int:
        return self.pos_embed.shape[1]

    def set_image_size(self, image_size: int) -> None:
        """Switch to another input resolution, resampling the learned position table (e.g. 224 -> 448)."""
        patch = self.patch_embed.patch_size[0]
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        grid = image_size // patch
        with torch.no_grad():
            self.pos_embed = nn.Parameter(resample_position_embedding(self.pos_embed.data, grid))
        self.patch_embed.img_size = (image_size, image_size)
        self.patch_embed.grid_size = (grid, grid)
        self.patch_embed.num_patches = grid * grid

    def forward(
        self, images: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Encode images.

        Args:
            images: ``[N, 3, H, W]`` normalised pixels (H = W = the configured image size).
            output_hidden_states: also return the input of every block and the last block's output.

        Returns:
            ``[N, 1 + g*g, D]`` tokens after the final LayerNorm (CLS first), and, if asked, a tuple of
            ``num_layers + 1`` tensors ``[N, 1 + g*g, D]`` (after ``norm_pre``, then after each block).
        """
        x = self.norm_pre(self._pos_embed(self.patch_embed(images)))
        hidden_states = [x] if output_hidden_states else None
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if hidden_states is not None:
                hidden_states.append(x)
        return self.norm(x), tuple(hidden_states) if hidden_states is not None else None
