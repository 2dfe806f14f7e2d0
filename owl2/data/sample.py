"""The sample format every reader produces and every operator consumes, and the bad-record accounting.

A *sample* (one row of a reader's ``ray.data.Dataset``) is format-neutral:

============  ==============  ==========================================================================
column        type            meaning
============  ==============  ==========================================================================
id            str             identifier from the record, else ``<file>:<row>``
origin        str             ``<file>:<row>``, unique: the deterministic order is derived from it
source        str             the dataset it came from (a mixture keeps several)
task          str             ``chat`` (conversation, loss on assistant replies) or ``caption``
                              (image then caption, loss on the caption: stage-1 pre-training)
messages      str             JSON list of ``{"role": "user"|"assistant", "content": str}``; every image
                              placeholder is already ``<|image|>``
images        list[str]       image paths or URIs, in placeholder order (may be empty)
image_bytes   list[binary]    encoded images carried inline (webdataset, parquet), in placeholder order
error         str             ``""``, or the skip reason the reader already found (e.g. malformed row)
detail        str             a human-readable note on the error (file, row, what was wrong)
============  ==============  ==========================================================================

Bad records never raise one by one: they travel as rows with ``error`` set and are counted by reason.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from owl2.errors import Unrecoverable

SAMPLE_COLUMNS = ("id", "origin", "source", "task", "messages", "images", "image_bytes", "error", "detail")

TASKS = ("chat", "caption")
# Image URIs never read: a run that depends on web servers cannot be repeated (skip reason ``web_url``).
WEB_SCHEMES = ("http://", "https://")

# Why a record was skipped. Stable names: they become metric names in MLflow.
SKIP_REASONS = {
    "malformed_record": "the row is not valid JSON or lacks/mistypes a required field",
    "not_utf8": "a line of a JSONL file (or a webdataset text member) is not valid UTF-8",
    "outside_image_root": "the image path leads out of the source's image root (allow_paths_outside_root is off)",
    "web_url": "the image is an http(s) URL: owl2 never downloads images at training time",
    "bad_path": "the image path cannot name a file (e.g. it holds a NUL byte)",
    "missing_file": "an image file does not exist or cannot be read",
    "not_a_file": "the image path is a directory, FIFO, device or other non-regular file",
    "too_many_bytes": "an image file, inline image or tar member exceeds data.max_image_bytes / data.max_text_bytes",
    "empty_file": "an image file has zero bytes",
    "not_an_image": "the bytes are not an image PIL can identify",
    "truncated_image": "the image data ends early or is corrupt",
    "too_many_pixels": "the image exceeds the pixel limit (decompression-bomb guard)",
    "image_error": "EXIF rotation, colour conversion or resizing failed (an unexpected error, named in the detail)",
    "out_of_memory": "decoding or resizing the image ran out of memory",
    "tokenize_error": "tokenising the conversation failed (an unexpected error, named in the detail)",
    "no_assistant_turn": "the conversation has no non-empty assistant reply to learn from",
    "image_count_mismatch": "the number of image placeholders differs from the number of images",
    "too_long": "the text does not fit the length limit even after image-aware truncation",
}


def encode_messages(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages, ensure_ascii=False)


def decode_messages(messages: str) -> list[dict[str, str]]:
    return json.loads(messages)


def make_sample(
    id: str,
    origin: str,
    source: str,
    task: str = "chat",
    messages: list[dict[str, str]] | None = None,
    images: list[str] | None = None,
    image_bytes: list[bytes] | None = None,
    error: str = "",
    detail: str = "",
) -> dict[str, Any]:
    """One row in the sample format (see the module docstring)."""
    if error and error not in SKIP_REASONS:
        raise ValueError(f"unknown skip reason {error!r}; add it to SKIP_REASONS")
    return {
        "id": id,
        "origin": origin,
        "source": source,
        "task": task,
        "messages": encode_messages(messages or []),
        "images": list(images or []),
        "image_bytes": list(image_bytes or []),
        "error": error,
        "detail": detail,
    }


class TooManyBadRecords(Unrecoverable):
    """The fraction of skipped records passed the configured limit."""


@dataclass
class SkipStats:
    """Counts of good and skipped records by reason, with a few examples of each, mergeable across workers.

    ``check()`` raises :class:`TooManyBadRecords` once at least ``min_records`` were seen and the skipped
    fraction exceeds ``max_fraction``, naming examples so the user can find the broken files.
    """

    max_fraction: float = 0.05
    min_records: int = 100
    examples_per_reason: int = 3
    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return self.seen - sum(self.skipped.values())

    @property
    def skipped_fraction(self) -> float:
        return sum(self.skipped.values()) / self.seen if self.seen else 0.0

    def add(self, error: str = "", example: str = "") -> None:
        self.seen += 1
        if error:
            self.skipped[error] += 1
            kept = self.examples.setdefault(error, [])
            if len(kept) < self.examples_per_reason:
                kept.append(example)

    @classmethod
    def total(cls, parts: Iterable[SkipStats]) -> SkipStats:
        """Every rank's counts (and examples) together."""
        total = cls()
        for part in parts:
            total.merge(part)
        return total

    def carry(self, seen: int, skipped: Mapping[str, int]) -> None:
        """Start from the counts of an earlier run of the stage (its checkpoint's), so totals span restarts."""
        self.seen += seen
        self.skipped.update(skipped)

    def merge(self, other: SkipStats) -> None:
        self.seen += other.seen
        self.skipped.update(other.skipped)
        for reason, examples in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(examples[: self.examples_per_reason - len(kept)])

    def check(self) -> None:
        if self.seen >= self.min_records and self.skipped_fraction > self.max_fraction:
            raise TooManyBadRecords(
                f"{sum(self.skipped.values())} of {self.seen} records were bad ({self.skipped_fraction:.1%}, limit "
                f"{self.max_fraction:.1%}): "
                + "; ".join(
                    f"{reason} x{count} (e.g. {', '.join(self.examples.get(reason, []))})"
                    for reason, count in self.skipped.most_common()
                )
            )

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.seen, "ok": self.ok, "skipped": dict(sorted(self.skipped.items()))}
