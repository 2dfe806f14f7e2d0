"""The Ray Data pipeline: samples -> deterministic order -> tokens and pixels (tasks) -> model-ready rows.

::

    list files -> read this worker's files (per source) -> repeat by weight, keep its share, resume filter
        -> sort by order key
        -> blocks of ~32 MB of pixels -> encode = Tokenize + load_images (tasks, one per CPU at a time)
        -> (``batch.iterate``: iter_torch_batches(Collator) in the training process)

This module runs in Ray Data's worker processes and imports no torch (``batch.py`` holds the consumer side):
a fresh worker process starts seconds sooner without it.

Speed (``benchmarks/ingest.py``): one fused ``encode`` step, tasks rather than an actor pool: an actor pool
starts fresh processes (importing owl2, loading the tokenizer) at every pass, while tasks run in the worker
processes Ray keeps between passes, with the tokenizer cached in each; blocks of ~32 MB of pixels, big enough
that a call costs little next to its decoding, small enough to spread over the tasks and bring the first
batch early; pixels travel as a uint8 tensor column, which the consumer reads without a copy; the collate function
copies each image once.

Order: every sample copy gets a 63-bit key hashed from ``(seed, epoch, origin, copy)``; a worker's epoch is
its share of the samples sorted by that key, so the order depends on nothing but the seed, the epoch, the
world size and the data. The position in an epoch is the last key consumed: a restarted run filters
``key > last_key`` and so neither repeats nor skips a sample.

Shares: a worker reads only its own files (every worker lists the files, which reads none of them). Each
epoch, each source's files are put in an order hashed from ``(seed, epoch, path)`` and dealt to the ranks in
turn: a worker reads the floor or the ceiling of ``files / world_size`` of each source, and a file changes
hands from epoch to epoch. The deal goes on from one source to the next and from one epoch to the next, so
the ranks that get one file more take turns. A source with fewer files than workers is dealt in parts
instead: each of its ``n`` files is read by ``world_size / gcd(n, world_size)`` workers, each keeping the
copies whose ``key % parts`` is its part, so every worker gets the same share and reads
``n / gcd(n, world_size)`` of the files (a source of one file is read whole by every worker). That costs
repeated reads of a small source rather than an idle or an overloaded worker. Either way, every sample copy
of an epoch lands in exactly one share.

Balance: files are dealt, not rows, so shares differ by up to a file per source (more where files differ in
length). Workers still take the same number of optimizer steps: the training loop's stream never runs dry
(``loop.batches()`` sizes each pass from the rows its first pass counted, and starts another pass when a
pass falls short), so a smaller share only ends that worker's epochs sooner and brings its files round
more often; as files change hands every epoch, no file stays favoured through a stage. Workers' epoch
numbers may drift apart; each worker's position (epoch, last key) is its own in the checkpoint.

Passes: one execution of the pipeline can stream several epochs back to back (sorted by epoch, then key:
the same sequence as one execution per epoch). Each execution pays a start-up (read, sort, first blocks)
during which training waits: 0.4 s here when Ray still holds warm worker processes, 10-15 s on 2 CPUs when
it must start them; so the training loop asks for every epoch it still needs at once.

Bad records flow through as rows with ``error`` set (never raised one by one) and are counted by the
collate function, which drops them from the batch.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback

from owl2.config import DataConfig
from owl2.config.data import DEFAULT_MAX_IMAGE_BYTES
from owl2.data import images as image_ops
from owl2.data.readers import ReadLimits, list_files, read
from owl2.data.sample import decode_messages

ORDER_KEY = "order_key"
EPOCH = "epoch"
# A scheduling step of Ray Data's executor shorter than this did not wait on its tasks (it waits up to 0.1 s):
# it found nothing to do. The pause bounds such idle steps to 50 a second.
IDLE_STEP_S = 0.02
IDLE_SLEEP_S = 0.02
# Blocks from the sort on hold about this many bytes of pixels (one image a row): 55 rows at 448 px, 222 at
# 224 px. One encode call takes one block: smaller blocks cost more per image (each is a task, an Arrow
# conversion, an object-store put); bigger ones spread over fewer tasks and delay the first batch.
BLOCK_BYTES = 32 * 1024 * 1024
# Columns every stage passes on as they are (``origin``: a skip's detail names the record's ``file:row``).
_KEPT = ("id", "origin", "source", EPOCH, ORDER_KEY)
# Columns that leave the pipeline for the training loop; ``pixels`` holds uint8 [num_images, 3, S, S] per row.
ENCODED_COLUMNS = (
    "id",
    "origin",
    "source",
    EPOCH,
    ORDER_KEY,
    "input_ids",
    "labels",
    "pixels",
    "num_images",
    "error",
    "detail",
)


def order_key(seed: int, epoch: int, origin: str, copy: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{copy}:{origin}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # non-negative int64


def repeats(weight: float, seed: int, epoch: int, origin: str) -> int:
    """How many copies of a sample an epoch holds: the whole part of its source's ``weight``, plus one more
    if a deterministic, epoch-dependent coin falls under the fractional part."""
    count, fraction = int(math.floor(weight)), weight % 1.0
    if fraction and order_key(seed, epoch, origin, -1) / 2**63 < fraction:
        count += 1
    return count


@dataclass(frozen=True)
class Share:
    """What one worker takes of one file in one epoch: the sample copies with ``key % parts == part``."""

    epoch: int
    part: int = 0
    parts: int = 1


def deal(files: list[str], seed: int, epoch: int, world_size: int, first_rank: int = 0) -> list[dict[str, Share]]:
    """Per rank, the files it reads in ``epoch`` and its share of each (see the module docstring); the
    dealing starts at ``first_rank``."""
    parts = _parts(len(files), world_size)
    # -2: a hash of its own, apart from the samples' copies (>= 0) and weight coins (-1).
    order = sorted(files, key=lambda path: (order_key(seed, epoch, path, -2), path))
    hands: list[dict[str, Share]] = [{} for _ in range(world_size)]
    for unit in range(len(order) * parts):  # parts <= world_size: a file's parts go to different ranks
        hands[(first_rank + unit) % world_size][order[unit // parts]] = Share(epoch, unit % parts, parts)
    return hands


def _parts(num_files: int, world_size: int) -> int:
    """In how many parts each file of a source is dealt: the fewest that give every worker the same share,
    or 1 when there are files enough for every worker."""
    return 1 if num_files >= world_size else world_size // math.gcd(num_files, world_size)


def worker_files(
    listings: list[list[str]], seed: int, epochs: range, rank: int, world_size: int
) -> list[dict[str, list[Share]]]:
    """Per source (``listings``: each source's files), the files ``rank`` reads over ``epochs``, each with
    its shares: ``{path: [Share, ...]}``, one share per epoch it is read in."""
    plans: list[dict[str, list[Share]]] = [{} for _ in listings]
    units = [len(files) * _parts(len(files), world_size) for files in listings]
    for epoch in epochs:
        first_rank = epoch * sum(units) % world_size  # where the deal of all earlier epochs stopped
        for plan, files, dealt in zip(plans, listings, units, strict=True):
            for path, share in deal(files, seed, epoch, world_size, first_rank)[rank].items():
                plan.setdefault(path, []).append(share)
            first_rank = (first_rank + dealt) % world_size
    return plans


@dataclass(frozen=True)
class Copies:
    """``flat_map``: one sample -> the copies of it in this worker's share, past the resume position.

    ``shares`` maps each file this worker reads to its shares (:func:`worker_files`); a copy of an epoch
    after ``first_epoch`` is always kept, one of ``first_epoch`` only when its key is above ``after_key``.
    """

    weight: float
    seed: int
    shares: dict[str, list[Share]]
    first_epoch: int = 0
    after_key: int = -1

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        origin = row["origin"]
        out = []
        for share in self.shares[origin.rsplit(":", 1)[0]]:  # origin: "<file>:<row>"
            for copy in range(repeats(self.weight, self.seed, share.epoch, origin)):
                key = order_key(self.seed, share.epoch, origin, copy)
                if key % share.parts == share.part and (share.epoch > self.first_epoch or key > self.after_key):
                    out.append({**row, EPOCH: share.epoch, ORDER_KEY: key})
        return out


def samples(
    config: DataConfig,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    after_key: int = -1,
    epochs: int = 1,
) -> ray.data.Dataset:
    """The raw samples one worker sees in epochs ``epoch`` to ``epoch + epochs - 1``, in order, starting after
    ``after_key`` in the first. Reads only this worker's files."""
    if not config.sources:
        raise ValueError("data.sources is empty: name at least one dataset")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} workers")
    listings = [list_files(source) for source in config.sources]
    plans = worker_files(listings, config.seed, range(epoch, epoch + epochs), rank, world_size)
    limits = ReadLimits(config.max_image_bytes, config.max_text_bytes)
    parts = [
        read(source, sorted(plan), limits).flat_map(Copies(source.weight, config.seed, plan, epoch, after_key))
        for source, plan in zip(config.sources, plans, strict=True)
    ]
    dataset = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return dataset.sort([EPOCH, ORDER_KEY])


class Tokenize:
    """Conversation -> ``input_ids`` with ``-200`` per image and masked ``labels`` (a block at a time).

    Loads the tokenizer once (:func:`encode` keeps one per worker process). Also validates what tokenising
    reveals: no assistant turn, placeholder/image count mismatch, too long even after image-aware truncation.
    """

    def __init__(self, tokenizer_dir: str, template: str, max_length: int, tokens_per_image: int) -> None:
        from owl2.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.template = template
        self.max_length = max_length
        self.tokens_per_image = tokens_per_image

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = len(batch["id"])
        input_ids, labels, num_images = [], [], np.zeros(size, dtype=np.int64)
        errors, details = list(batch["error"]), list(batch["detail"])
        for i in range(size):
            ids, targets = np.zeros(0, np.int64), np.zeros(0, np.int64)
            if not errors[i]:
                try:
                    ids, targets, num_images[i], errors[i], details[i] = self._row(batch, i)
                except Exception as error:  # one record's failure is its skip, never the job's
                    errors[i], details[i] = "tokenize_error", f"{_where(batch, i)}: {error.__class__.__name__}: {error}"
            input_ids.append(ids)
            labels.append(targets)
        return {
            **{name: batch[name] for name in _KEPT if name in batch},
            # Plain lists: Arrow cannot type a mix of empty float arrays and string arrays.
            "images": _ragged([list(paths) for paths in batch["images"]]),
            "image_bytes": _ragged([list(data) for data in batch["image_bytes"]]),
            "input_ids": _ragged(input_ids),
            "labels": _ragged(labels),
            "num_images": num_images,
            "error": np.asarray(errors, dtype=object),
            "detail": np.asarray(details, dtype=object),
        }

    def _row(self, batch: dict[str, np.ndarray], i: int) -> tuple[np.ndarray, np.ndarray, int, str, str]:
        """``(input_ids, labels, num_images, error, detail)`` of row ``i``; a skip has empty arrays."""
        from owl2.config import IMAGE_PLACEHOLDER
        from owl2.data.templates import Skip, encode_conversation

        empty = np.zeros(0, np.int64)
        messages = decode_messages(batch["messages"][i])
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        available = len(batch["images"][i]) + len(batch["image_bytes"][i])
        if placeholders != available:
            detail = f"{_where(batch, i)}: {placeholders} placeholders but {available} images"
            return empty, empty, 0, "image_count_mismatch", detail
        template = "plain" if batch["task"][i] == "caption" else self.template
        encoded = encode_conversation(
            messages, template, self.tokenizer, max_length=self.max_length, tokens_per_image=self.tokens_per_image
        )
        if isinstance(encoded, Skip):
            return empty, empty, 0, encoded.reason, f"{_where(batch, i)}: {encoded.detail}"
        ids, targets = np.asarray(encoded.input_ids, dtype=np.int64), np.asarray(encoded.labels, dtype=np.int64)
        return ids, targets, encoded.num_images, "", ""


def load_images(
    batch: dict[str, np.ndarray],
    image_size: int,
    resize: str,
    max_pixels: int,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> dict[str, Any]:
    """Ray Data task: decode the kept images of each sample into ``pixels`` (``uint8 [n, 3, S, S]`` bytes).

    Any failure of one record's image is a named skip (``images.load``): a raise here would fail the job,
    and every restart would replay the same record.
    """
    size = len(batch["id"])
    pixels, errors, details = [], list(batch["error"]), list(batch["detail"])
    for i in range(size):
        arrays = []
        if not errors[i]:
            sources = [*batch["image_bytes"][i], *batch["images"][i]][: int(batch["num_images"][i])]
            try:
                for index, item in enumerate(sources):
                    name = item if isinstance(item, str) else f"{batch['id'][i]} image {index}"
                    arrays.append(image_ops.load(item, name, image_size, resize, max_pixels, max_bytes))
            except image_ops.BadImage as error:
                errors[i], details[i], arrays = error.reason, f"{_where(batch, i)}: {error}", []
        pixels.append(b"".join(arrays))  # = np.stack(arrays).tobytes(), without its two fresh copies
    return {
        **{name: batch[name] for name in (*_KEPT, "input_ids", "labels", "num_images") if name in batch},
        "pixels": np.asarray(pixels, dtype=object),
        "error": np.asarray(errors, dtype=object),
        "detail": np.asarray(details, dtype=object),
    }


def _where(batch: dict[str, np.ndarray], i: int) -> str:
    """The record's ``file:row`` in a skip's detail (its id where a caller's batch has no origin)."""
    return str(batch["origin"][i] if "origin" in batch else batch["id"][i])


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def encoded(
    config: DataConfig,
    tokens_per_image: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    after_key: int = -1,
    epochs: int = 1,
) -> ray.data.Dataset:
    """Model-ready rows for one worker: tokens, labels and decoded pixels, in the order of :func:`samples`."""
    if not config.tokenizer:
        raise ValueError("data.tokenizer is empty: point it at a folder holding tokenizer.model")
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    if YieldWhenIdle not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(YieldWhenIdle)
    dataset = samples(config, epoch, rank, world_size, after_key, epochs)
    # The sort leaves one block per input file: smaller blocks spread the work over the tasks and stream (a
    # streaming repartition: no shuffle, the order is kept).
    dataset = dataset.repartition(target_num_rows_per_block=rows_per_block(config.image_size))
    return dataset.map_batches(
        encode,
        fn_args=(config, tokens_per_image),
        batch_size=None,  # one block per call
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=encode_tasks(config, world_size)),
        # No CPU reservation (the cap above bounds the CPUs used): the training workers hold theirs for the
        # whole run, and a reservation here could leave a pipeline no CPU to run on (ray_notes.md).
        num_cpus=0,
    )


class YieldWhenIdle(ExecutionCallback):
    """Pause Ray Data's scheduling loop briefly when a step found nothing to do.

    The executor runs in the training worker's process. When the pipeline waits on its consumer (training is
    the bottleneck, as it should be) no task is active, its loop does not block, and it spins: it held the GIL
    and a core and slowed training 2-4x here (2 CPUs). A 20 ms pause costs the pipeline nothing then.
    """

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def on_execution_step(self, executor: Any) -> None:
        if time.perf_counter() - self._last < IDLE_STEP_S:
            time.sleep(IDLE_SLEEP_S)
        self._last = time.perf_counter()


def rows_per_block(image_size: int) -> int:
    """Rows of the blocks that :func:`encode` takes one at a time: about ``BLOCK_BYTES`` of pixels."""
    return max(16, min(1024, BLOCK_BYTES // (3 * image_size * image_size)))


def encode_tasks(config: DataConfig, world_size: int = 1) -> int:
    """How many :func:`encode` tasks one worker's pipeline runs at once: one per CPU of its share of the cluster.

    ``world_size`` pipelines share the cluster's CPUs, less those the Ray Train workers hold; at least
    ``data.encode_tasks``. On 2 CPUs: 2 tasks, or 1 for each of two training workers.
    """
    context = ray.get_runtime_context()
    held = context.get_assigned_resources().get("CPU", 0.0) if context.get_actor_id() else 0.0
    share = ray.cluster_resources().get("CPU", 1.0) / max(world_size, 1) - held
    return max(config.encode_tasks, int(share), 1)


@lru_cache(maxsize=8)
def _tokenize(tokenizer_dir: str, template: str, max_length: int, tokens_per_image: int) -> Tokenize:
    """A :class:`Tokenize` per worker process and setting: the tokenizer loads once, not once a block."""
    return Tokenize(tokenizer_dir, template, max_length, tokens_per_image)


def encode(batch: dict[str, np.ndarray], config: DataConfig, tokens_per_image: int) -> dict[str, Any]:
    """Ray Data task: :class:`Tokenize` then :func:`load_images` of one block, fused.

    One step, so a block crosses the object store once, after its pixels exist. Tasks, not actors: Ray keeps
    its idle worker processes and hands them the next pass's tasks with owl2 already imported and the
    tokenizer loaded, where an actor pool starts fresh processes for every pass (seconds each).
    """
    tokenize = _tokenize(config.tokenizer, config.template, config.max_length, tokens_per_image)
    images = (config.image_size, config.resize, config.max_image_pixels, config.max_image_bytes)
    out = load_images(tokenize(batch), *images)
    # The pixels as uint8 arrays [n, 3, S, S] (views of the bytes): Arrow keeps them in a tensor column,
    # which the consumer reads without a copy; a binary column is copied into Python bytes there.
    side = config.image_size
    out["pixels"] = _ragged([np.frombuffer(data, np.uint8).reshape(-1, 3, side, side) for data in out["pixels"]])
    return out
