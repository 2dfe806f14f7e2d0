"""``RowLayout``: how a training batch fills its rows, known on the host before the forward.

A training batch is right-padded, and each row holds one sample or, packed, several whole samples one after
another. Knowing that on the host lets the forward attend without a padding mask (one sample a row: causal
attention already keeps trailing padding unseen, so SDPA may take its flash kernel) or within each packed
sample, and size the expanded rows, all without reading anything back from the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RowLayout:
    """Per row, its samples' tokens and images in ``input_ids`` order (an image placeholder counts one token)."""

    tokens: tuple[tuple[int, ...], ...]
    images: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        shapes = [len(row) for row in self.tokens], [len(row) for row in self.images]
        if shapes[0] != shapes[1] or 0 in shapes[0]:
            raise ValueError(f"a row layout needs one image count per sample and a sample per row, got {self}")

    @classmethod
    def unpacked(cls, tokens: Sequence[int], images: Sequence[int]) -> RowLayout:
        """One sample a row: ``tokens[i]`` real tokens (placeholders included) and ``images[i]`` images."""
        return cls(tuple((n,) for n in tokens), tuple((c,) for c in images))

    @property
    def packed(self) -> bool:
        """Whether some row holds more than one sample."""
        return any(len(row) > 1 for row in self.tokens)

    @property
    def samples(self) -> int:
        return sum(len(row) for row in self.tokens)

    @property
    def row_tokens(self) -> list[int]:
        """Real tokens of each row in ``input_ids``."""
        return [sum(row) for row in self.tokens]

    @property
    def image_counts(self) -> list[int]:
        """Images of each row (the forward's ``image_counts``)."""
        return [sum(row) for row in self.images]

    def expanded(self, tokens_per_image: int) -> list[list[int]]:
        """Per row, each sample's length in decoder tokens (each image as ``tokens_per_image``)."""
        return [
            [n + (tokens_per_image - 1) * c for n, c in zip(tokens, images, strict=True)]
            for tokens, images in zip(self.tokens, self.images, strict=True)
        ]

    def longest_span(self, tokens_per_image: int, width: int) -> int:
        """The longest run of decoder tokens one sample's attention covers in rows ``width`` tokens wide: a row's
        trailing padding runs with its last sample."""
        longest = 0
        for lengths in self.expanded(tokens_per_image):
            longest = max(longest, *lengths[:-1], width - sum(lengths[:-1]))
        return longest
