"""What to read and how it becomes model inputs: dataset sources and the data pipeline's settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from owl2.config.core import at_least, check, in_range, one_of, positive

DATA_FORMATS = ("llava", "captions", "webdataset")
TEMPLATE_NAMES = ("mplug_owl2", "vicuna_v1")
RESIZE_MODES = ("stretch", "pad", "crop")
MIB = 1024 * 1024
DEFAULT_MAX_IMAGE_BYTES = 64 * MIB
DEFAULT_MAX_TEXT_BYTES = 16 * MIB


@dataclasses.dataclass
class SourceConfig:
    """One dataset of a mixture."""

    section: ClassVar[str] = "source"
    """The key this config's messages start with; a list item has no name of its own (``build`` supplies it)."""

    format: str
    """``llava`` (conversation JSON/JSONL), ``captions`` (JSONL/CSV/parquet) or ``webdataset`` (.tar shards)."""
    path: str | list[str]
    """File(s) or folder(s); local paths or URIs such as ``s3://bucket/prefix``."""
    image_root: str | None = None
    """Folder that relative image paths are under (default: beside the data file)."""
    allow_paths_outside_root: bool = False
    """Follow image paths that lead out of the root (``image_root``, else the data file's folder): absolute
    paths elsewhere, ``..`` above the root, URIs of another bucket. Off: such a record is skipped as
    ``outside_image_root``, so a data file cannot make a worker read (or hang on) any file it can reach.
    Symbolic links inside the root are followed either way: whoever placed them owns the root. Web URLs
    (``http://``, ``https://``) are never read, this key or not: a training run depending on web servers is
    not reproducible; download the images first (skip reason ``web_url``)."""
    name: str | None = None
    """Label in metrics (default: the file's stem)."""
    weight: float = 1.0
    """Expected number of times each sample is seen per epoch: 2.0 doubles a source, 0.5 takes a different
    (deterministic) half each epoch."""

    def __post_init__(self) -> None:
        one_of(self.format, DATA_FORMATS, "source.format")
        check(bool(self.path), "source.path must not be empty")
        check(
            isinstance(self.allow_paths_outside_root, bool),
            f"source.allow_paths_outside_root must be true or false, got {self.allow_paths_outside_root!r}",
        )
        positive(self.weight, "source.weight")

    @property
    def label(self) -> str:
        first = self.path if isinstance(self.path, str) else self.path[0]
        return self.name or Path(first.rstrip("/").split("://")[-1]).stem


@dataclasses.dataclass
class DataConfig:
    """What to read and how to turn it into model inputs."""

    sources: list[SourceConfig] = dataclasses.field(default_factory=list)
    tokenizer: str = ""
    """Folder with the LLaMA ``tokenizer.model`` (e.g. the checkpoint folder)."""
    template: str = "vicuna_v1"
    """Conversation template for chat samples (captions always use the plain image-then-caption form)."""
    max_length: int = 2048
    """Longest sequence in decoder tokens, each image counting as its num_queries + 1 tokens."""
    packing: bool = False
    """Pack each micro-batch's samples into rows of up to ``max_length`` decoder tokens, in their order, each
    sample attending only to itself with its own positions: less padding, the same losses and gradients.
    Off: one sample a row, padded to the batch's longest."""
    image_size: int = 448
    resize: str = "stretch"
    """``stretch`` to a square (the official evaluation), ``pad`` to a square with the mean colour (the
    official fine-tuning), or ``crop`` (shortest side, then centre crop)."""
    max_image_pixels: int = 64_000_000
    """Larger images are skipped as possible decompression bombs."""
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    """Larger image files (or inline images, or tar members) are skipped as ``too_many_bytes``: checked from the
    size before reading, and again while reading a remote file."""
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    """Larger text members of a webdataset shard (``.json``, ``.txt``) are skipped as ``too_many_bytes``."""
    max_bad_fraction: float = 0.05
    """Stop when more than this fraction of the records seen so far was skipped (after ``min_records_for_check``)."""
    min_records_for_check: int = 200
    seed: int = 0
    encode_tasks: int = 1
    """At least this many ``encode`` tasks (tokenise + decode) at once per worker's pipeline; by default one per CPU
    of the worker's share of the cluster."""

    def __post_init__(self) -> None:
        one_of(self.template, TEMPLATE_NAMES, "data.template")
        one_of(self.resize, RESIZE_MODES, "data.resize")
        positive(self.max_length, "data.max_length")
        check(isinstance(self.packing, bool), f"data.packing must be true or false, got {self.packing!r}")
        positive(self.image_size, "data.image_size")
        positive(self.max_image_pixels, "data.max_image_pixels")
        positive(self.max_image_bytes, "data.max_image_bytes")
        positive(self.max_text_bytes, "data.max_text_bytes")
        in_range(self.max_bad_fraction, 0, 1, "data.max_bad_fraction")
        at_least(self.encode_tasks, 1, "data.encode_tasks")
        labels = [source.label for source in self.sources]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        check(not duplicates, f"data.sources have duplicate names {duplicates}: give each a distinct 'name'")
