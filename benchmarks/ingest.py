"""Ingest throughput: the owl2 Ray Data pipeline against a plain PyTorch ``DataLoader`` doing the same work.

    python benchmarks/ingest.py [--num-train 1500] [--png-size 224] [--image-size 448] [--workers 2]
                                [--batch-size 16] [--repeats 3] [--world DIR] [--only ray|torch] [--stats]

Data: a generated shapes world (``world.generate_world``, ``--num-train`` images; 1500 give 4562 LLaVA
records, 4189 of them with an image), read from its ``llava/train.json`` with ``image_root`` = the world.
Its PNGs are rendered at ``--png-size`` (224 px) and resized to ``--image-size`` (448 px: mPLUG-Owl2's input
and ``DataConfig.image_size``), so every image costs a PNG decode and a bicubic upscale, about 2.3 ms on one
core here, and leaves as 602 KB of uint8 pixels.

Both engines run the same code on the same files: the reader's JSON parsing (``readers._parse_llava_file``),
the epoch order (sorted by ``pipeline.order_key``), ``Tokenize`` (``encode_conversation``, ``mplug_owl2``
template, the world's tokenizer), ``load_images`` (``images.decode`` + ``images.resize``) and ``Collator``
(padding). Only the engine differs:

* ``owl2 Ray Data``: ``pipeline.encoded`` consumed with ``pipeline.iterate`` (``iter_torch_batches`` with the
  ``Collator``), on a local Ray started with ``num_cpus=--workers``.
* ``torch DataLoader``: ``num_workers=--workers`` persistent worker processes, each making whole batches
  (``__getitems__``: tokenise, decode, collate), like Ray's reused worker processes.

Ray's workers run at nice 0 (``--ray-worker-niceness``; Ray's default is 15), the DataLoader's priority: at
15 anything else running on the machine takes their CPUs.

Timing: images/s and samples/s are measured between the batches that arrive after 20% and after 80% of the
samples (``--window``): start-up (Ray's, the actors', the workers'), the first batch and the end of the epoch
are excluded, and as much work is in flight at both ends of the window (at the start of an epoch up to 4
blocks for Ray, 4 batches for the DataLoader are being made, and they drain at its end: a window that
included either would credit work done outside it). The time to the first batch is shown for the first
(cold) run and as the median of the warm ones; "epoch img/s" is start to end. The engines alternate (a cold
run each, then ``--repeats`` warm rounds), so that load from elsewhere on the machine hits both alike; the
table shows medians of the warm runs. "CPU ms/img" is the CPU time of every process involved (consumer,
workers or actors, Ray's daemons; sampled from ``/proc``) per image in the window: the cost of an image,
whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch

from owl2.config import DataConfig, SourceConfig
from owl2.data.batch import Batch, Collator, iterate
from owl2.data.pipeline import EPOCH, ORDER_KEY, Tokenize, encoded, load_images, order_key
from owl2.data.readers import _parse_llava_file
from owl2.data.sample import SkipStats
from owl2.data.world import generate_world


@dataclass
class Run:
    images: int  # in the measured window (``--window``)
    samples: int
    seconds: float  # the window
    first_batch: float  # start -> first batch
    total_images: int
    total_seconds: float  # start -> last batch
    cpu: dict[str, float]  # in the window: CPU seconds of this process and its descendants, by name

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * sum(self.cpu.values()) / self.images

    @property
    def epoch_images_per_s(self) -> float:
        """Start to last batch, first batch included."""
        return self.total_images / self.total_seconds


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """Name and CPU seconds (user + system) of this process and each of its live descendants (Linux ``/proc``)."""
    tick, parents, spent = os.sysconf("SC_CLK_TCK"), {}, {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as file:
                    command, fields = file.read().split("(", 1)[1].rsplit(")", 1)
            except OSError:
                continue  # exited meanwhile
            fields = fields.split()
            parents[int(name)] = int(fields[1])
            spent[int(name)] = (command, (int(fields[11]) + int(fields[12])) / tick)
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    tree, stack = {}, [os.getpid()]
    while stack:
        pid = stack.pop()
        if pid in spent:
            tree[pid] = spent[pid]
        stack.extend(children.get(pid, []))
    return tree


class CpuMeter:
    """CPU seconds the benchmark's processes use from ``start()`` to ``stop()``, sampled every 0.2 s so that a
    process that exits meanwhile (Ray ends idle workers) counts up to its last sample. ``only`` restricts the
    count to those processes, ``exclude`` leaves those out (the other engine's workers)."""

    def __init__(self, only: set[int] | None = None, exclude: frozenset[int] = frozenset()) -> None:
        self.only, self.exclude = only, exclude
        self.done = threading.Event()

    def _sample(self) -> None:
        for pid, (name, seconds) in cpu_by_process().items():
            if pid not in self.exclude and (self.only is None or pid in self.only):
                self.last[pid] = seconds
                self.names[pid] = "consumer (main process)" if pid == os.getpid() else name

    def _run(self) -> None:
        while not self.done.wait(0.2):
            self._sample()

    def start(self) -> None:
        self.last: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self._sample()
        self.baseline = dict(self.last)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop(self) -> dict[str, float]:
        """CPU seconds by process name."""
        self.done.set()
        self.thread.join()
        self._sample()
        spent: dict[str, float] = {}
        for pid, seconds in self.last.items():
            spent[self.names[pid]] = spent.get(self.names[pid], 0.0) + seconds - self.baseline.get(pid, 0.0)
        return spent


def settle(timeout: float = 15.0) -> None:
    """Wait until the benchmark's processes are idle: after a Ray Data run, its actors exit and Ray ends idle
    workers for a few seconds, which would slow whatever runs next (measured: the DataLoader by half)."""
    deadline = time.perf_counter() + timeout
    before = sum(seconds for _, seconds in cpu_by_process().values())
    while time.perf_counter() < deadline:
        time.sleep(0.5)
        now = sum(seconds for _, seconds in cpu_by_process().values())
        if now - before < 0.05:  # under 10% of a core
            return
        before = now


def consume(batches: Iterator[Batch], start: float, meter: CpuMeter, window: tuple[int, int]) -> Run:
    """Drain ``batches``; measure between the batches that follow ``window[0]`` and ``window[1]`` samples."""
    first = opened = closed = None
    seen = images = samples = total_images = 0
    for batch in batches:
        now = time.perf_counter()
        first = first or now
        total_images += len(batch.images)
        if opened is None and seen >= max(window[0], 1):  # never the first batch
            opened = now
            meter.start()
        elif opened is not None and closed is None:
            images += len(batch.images)
            samples += len(batch.ids)
            if seen + len(batch.ids) >= window[1]:
                closed = now
                cpu = meter.stop()
        seen += len(batch.ids)
    end = time.perf_counter()
    if opened is None:
        raise SystemExit(f"only {seen} samples: too few for the window; generate more (--num-train)")
    if closed is None:  # a window that ends with the data
        closed, cpu = end, meter.stop()
    return Run(images, samples, closed - opened, first - start, total_images, end - start, cpu)


# ------------------------------------------------------------------------------------------------ DataLoader


class LlavaDataset(torch.utils.data.Dataset):
    """The samples of one LLaVA file, in the pipeline's order; ``__getitems__`` makes one padded batch."""

    def __init__(self, config: DataConfig, tokens_per_image: int) -> None:
        source = config.sources[0]
        path = source.path
        with open(path, "rb") as file:
            self.samples = list(_parse_llava_file(file.read(), path, source))
        for sample in self.samples:
            sample[EPOCH], sample[ORDER_KEY] = 0, order_key(config.seed, 0, sample["origin"], 0)
        self.samples.sort(key=lambda sample: sample[ORDER_KEY])
        self.config, self.tokens_per_image = config, tokens_per_image
        self.tokenize: Tokenize | None = None  # one per worker process, made on first use

    def __len__(self) -> int:
        return len(self.samples)

    def __getitems__(self, indices: list[int]) -> dict[str, np.ndarray]:
        config = self.config
        if self.tokenize is None:
            self.tokenize = Tokenize(config.tokenizer, config.template, config.max_length, self.tokens_per_image)
        rows = [self.samples[i] for i in indices]
        batch = {name: _column([row[name] for row in rows]) for name in rows[0]}
        batch = self.tokenize(batch)
        return load_images(batch, config.image_size, config.resize, config.max_image_pixels)


def _column(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def make_loader(config: DataConfig, args: argparse.Namespace) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        LlavaDataset(config, args.tokens_per_image),
        batch_size=args.batch_size,
        shuffle=False,  # the dataset is already in the pipeline's order
        num_workers=args.workers,
        collate_fn=Collator(pad_token_id=0, image_size=config.image_size),
        prefetch_factor=2,
        persistent_workers=True,
    )


class TorchEngine:
    """One epoch through the DataLoader per call; the loader and its workers persist across calls."""

    def __init__(self, config: DataConfig, args: argparse.Namespace) -> None:
        self.config, self.args = config, args
        self.loader: torch.utils.data.DataLoader | None = None
        self.workers: frozenset[int] = frozenset()

    def __call__(self) -> Run:
        start = time.perf_counter()
        if self.loader is None:  # the first run: parsing the file and starting the workers count
            self.loader = make_loader(self.config, self.args)
            batches = iter(self.loader)
            self.workers = frozenset(cpu_by_process()) - {os.getpid()}  # Ray is not started yet
        else:
            batches = iter(self.loader)
        return consume(batches, start, CpuMeter(only={os.getpid(), *self.workers}), self.args.window_samples)


class RayEngine:
    """One epoch through ``pipeline.encoded`` + ``pipeline.iterate`` per call (a new Ray Data execution)."""

    def __init__(self, config: DataConfig, args: argparse.Namespace, exclude: frozenset[int]) -> None:
        self.config, self.args, self.exclude = config, args, exclude
        self.stats = ""

    def __call__(self) -> Run:
        start = time.perf_counter()
        dataset = encoded(self.config, self.args.tokens_per_image)
        collator = Collator(pad_token_id=0, image_size=self.config.image_size)
        batches = iterate(dataset, collator, self.args.batch_size, SkipStats(max_fraction=1.0))
        run = consume(batches, start, CpuMeter(exclude=self.exclude), self.args.window_samples)
        self.stats = dataset.stats() if self.args.stats else ""
        return run


def start_ray(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    ray.init(
        num_cpus=args.workers,
        object_store_memory=args.object_store_mib * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _system_config={"worker_niceness": args.ray_worker_niceness},
    )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    print(f"ray.init: {time.perf_counter() - started:.1f} s (not counted)")


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", help="an existing shapes world (default: generate one in a temporary folder)")
    parser.add_argument("--num-train", type=int, default=1500, help="images of the generated world")
    parser.add_argument("--png-size", type=int, default=224, help="side of the generated PNGs")
    parser.add_argument("--image-size", type=int, default=448, help="side the pipeline resizes to")
    parser.add_argument("--resize", default="stretch", choices=["stretch", "pad", "crop"])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = Ray CPUs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens-per-image", type=int, default=65)
    parser.add_argument("--repeats", type=int, default=3, help="warm runs per engine, after a cold one")
    parser.add_argument("--object-store-mib", type=int, default=1024)
    parser.add_argument(
        "--ray-worker-niceness", type=int, default=0, help="nice value of Ray's workers (Ray's default: 15)"
    )
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=(0.2, 0.8),
        metavar=("START", "END"),
        help="measure between these fractions of the samples (steady state: as much work in flight at both ends)",
    )
    parser.add_argument("--only", choices=["ray", "torch"], help="run one engine")
    parser.add_argument("--stats", action="store_true", help="print Ray Data's stats of the last run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="owl2-ingest-") as scratch:
        world = Path(args.world) if args.world else Path(scratch) / "world"
        if not args.world:
            started = time.perf_counter()
            generate_world(world, num_train=args.num_train, num_heldout=20, image_size=args.png_size)
            print(f"generated {args.num_train} {args.png_size} px images in {time.perf_counter() - started:.1f} s")
        with open(world / "llava" / "train.json") as file:
            records = len(json.load(file))
        args.window_samples = (int(args.window[0] * records), int(args.window[1] * records))
        config = DataConfig(
            sources=[SourceConfig(format="llava", path=str(world / "llava" / "train.json"), image_root=str(world))],
            tokenizer=str(world / "tokenizer"),
            template="mplug_owl2",
            image_size=args.image_size,
            resize=args.resize,
        )
        engines: dict[str, Callable[[], Run]] = {}
        runs: dict[str, list[Run]] = {}
        if args.only != "ray":
            torch_engine = engines["torch DataLoader"] = TorchEngine(config, args)
            runs["torch DataLoader"] = [torch_engine()]  # cold; forks its workers before Ray starts threads
        if args.only != "torch":
            start_ray(args)
            exclude = engines["torch DataLoader"].workers if "torch DataLoader" in engines else frozenset()
            ray_engine = engines["owl2 Ray Data"] = RayEngine(config, args, exclude)
            runs["owl2 Ray Data"] = [ray_engine()]
        for _ in range(args.repeats):
            for name, engine in engines.items():
                settle()
                runs[name].append(engine())
        if args.only != "torch":
            if args.stats:
                print(ray_engine.stats)
            ray.shutdown()
    report(runs, args)


def report(results: dict[str, list[Run]], args: argparse.Namespace) -> None:
    base = results.get("torch DataLoader")
    base_rate = statistics.median(run.images_per_s for run in base[1:]) if base and len(base) > 1 else None
    print()
    print(f"command: {' '.join(['python', *sys.argv])}")
    print(
        f"{os.cpu_count()} cpus; {args.workers} workers; {args.png_size} px PNGs resized to {args.image_size} px; "
        f"batch size {args.batch_size}; median of {args.repeats} warm runs"
    )
    header = (
        f"{'pipeline':<17} {'images/s':>8} {'samples/s':>9} {'1st batch cold':>14} {'1st batch warm':>14} "
        f"{'epoch img/s':>11} {'CPU ms/img':>10} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        timed = runs[1:] or runs
        rate = statistics.median(run.images_per_s for run in timed)
        ratio = f"{rate / base_rate:.2f}x" if base_rate else "-"
        print(
            f"{name:<17} {rate:>8.0f} {statistics.median(run.samples_per_s for run in timed):>9.0f} "
            f"{runs[0].first_batch:>13.2f}s {statistics.median(run.first_batch for run in timed):>13.2f}s "
            f"{statistics.median(run.epoch_images_per_s for run in timed):>11.0f} "
            f"{statistics.median(run.cpu_ms_per_image for run in timed):>10.2f} {ratio:>6}"
        )
    print(
        f"images/s, samples/s: from {args.window[0]:.0%} to {args.window[1]:.0%} of the samples; "
        "epoch img/s: start to end;\n"
        "CPU ms/img: CPU time of all processes (consumer, workers, Ray's daemons) per image, same window."
    )
    for name, runs in results.items():
        print(
            f"{name} runs (images/s, the first cold): {', '.join(f'{run.images_per_s:.0f}' for run in runs)}; "
            f"CPU ms/img: {', '.join(f'{run.cpu_ms_per_image:.2f}' for run in runs)}"
        )
    print("CPU ms/img by process (warm runs together):")
    for name, runs in results.items():
        timed = runs[1:] or runs
        images = sum(run.images for run in timed)
        spent: dict[str, float] = {}
        for run in timed:
            for process, seconds in run.cpu.items():
                spent[process] = spent.get(process, 0.0) + seconds
        shares = sorted(spent.items(), key=lambda item: -item[1])
        print(f"  {name}: " + ", ".join(f"{process} {1000 * seconds / images:.2f}" for process, seconds in shares))
    print(f"load average at the end: {', '.join(f'{load:.1f}' for load in os.getloadavg())}")


if __name__ == "__main__":
    main()
