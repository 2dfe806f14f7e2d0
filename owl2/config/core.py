"""The error every config raises, the shared constants, and the checks the configs' ``__post_init__`` use.

Each check names the offending value by its key (``data.max_length``); :func:`~owl2.config.loading.build`
turns a section's own key into the full one (``stages.stage2.data.max_length``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

IMAGE_TOKEN_INDEX = -200
"""Sentinel id that marks an image placeholder in ``input_ids`` (the official convention)."""
IGNORE_INDEX = -100
"""Label value excluded from the loss."""
IMAGE_PLACEHOLDER = "<|image|>"
"""Prompt text that stands for one image (not a vocabulary token)."""


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or inconsistent with another field."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds (for rules the helpers below lack)."""
    if not condition:
        raise ConfigError(message)


def positive(value: float, key: str) -> None:
    check(value > 0, f"{key} must be positive, got {value}")


def at_least(value: float, minimum: float, key: str) -> None:
    check(value >= minimum, f"{key} must be >= {minimum}, got {value}")


def in_range(value: float, low: float, high: float, key: str, *, low_open: bool = False) -> None:
    """``low <= value <= high``, or ``low < value <= high`` when ``low_open``."""
    inside = low < value <= high if low_open else low <= value <= high
    check(inside, f"{key} must lie in {'(' if low_open else '['}{low}, {high}], got {value}")


def one_of(value: Any, choices: Collection[Any], key: str) -> None:
    check(value in choices, f"{key} {value!r} must be one of {list(choices)}")


def divides(divisor: int, total: int, divisor_key: str, total_key: str) -> None:
    check(total % divisor == 0, f"{divisor_key} ({divisor}) must divide {total_key} ({total})")
