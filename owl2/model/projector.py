"""LLaVA-1.5's projector (``model.projector: mlp``): the ablation of the visual abstractor.

Where the abstractor condenses an image into a few learned queries, this projector maps every patch token of the
ViT output into the decoder, one decoder token per patch: 1024 tokens for a 448 px image instead of 65. It reads
the same ViT output as the abstractor (the last layer after the final norm; LLaVA takes the penultimate layer
without it), so that only the projector differs between the two models, and drops the CLS token, as LLaVA's
default feature selection does.
"""

from __future__ import annotations

import torch
from torch import nn


class MlpProjector(nn.Module):
    """``Linear(vision_width, decoder_width) -> GELU -> Linear(decoder_width, decoder_width)`` on each patch token.

    The names are those of transformers' ``LlavaMultiModalProjector`` (``linear_1``, ``act``, ``linear_2``).
    """

    def __init__(self, vision_width: int, decoder_width: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, decoder_width)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(decoder_width, decoder_width)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image ``[B, 1 + g*g, vision_width]`` ViT output (CLS first) -> ``[B, g*g, decoder_width]``."""
        return self.linear_2(self.act(self.linear_1(image[:, 1:])))
