"""A whole-model training step of this tree against another revision of owl2, side by side in one run.

    python benchmarks/step_bench.py [--against 11bca87] [--batch 4 1] [--iters 5] [--rounds 2] [--json]

The model is the configuration issue 14 measured against the official code: LLaMA 512 wide x 4 layers
(8 heads, vocabulary 32000), ViT 256 wide x 4 layers at 224 px, abstractor 2 layers x 32 queries; fp32 on the
CPU. A batch holds right-padded rows of one image and 100-190 text tokens each, the last 40 labelled, as the
collate function builds them. A step is forward with labels, backward and an AdamW update, each tree calling
its model the way its own training loop does (this tree: host-known layout and label counts, so attention runs
causal without a mask and the LM head only where labels are; older trees: whatever their ``forward`` takes).

``--against REV`` checks REV out into a temporary git worktree and times it in a child process that imports
owl2 from there; this tree is timed in a child process too. The children take turns ``--rounds`` times, so a
busy machine slows both alike; each child reports the median of ``--iters`` steps after two warm-up steps, and
the table shows the median over rounds. Without ``--against`` only this tree is timed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = [
    "decoder.vocab_size=32000",
    "decoder.hidden_size=512",
    "decoder.intermediate_size=1376",
    "decoder.num_layers=4",
    "decoder.num_heads=8",
    "decoder.num_kv_heads=8",
    "decoder.max_position_embeddings=1024",
    "vision.hidden_size=256",
    "vision.num_layers=4",
    "vision.num_heads=4",
    "vision.intermediate_size=1024",
    "vision.image_size=224",
    "abstractor.hidden_size=256",
    "abstractor.num_layers=2",
    "abstractor.num_heads=4",
    "abstractor.intermediate_size=1024",
    "abstractor.num_queries=32",
]
LABELLED = 40


def _batch(size: int, seed: int = 0) -> dict:
    """``size`` right-padded rows: bos, an image placeholder, then text; the last ``LABELLED`` tokens labelled."""
    import torch

    from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    generator = torch.Generator().manual_seed(seed)
    lengths = [190 - 30 * (row % 4) for row in range(size)]  # 190, 160, 130, 100, ...
    ids = torch.zeros(size, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(3, 32000, (length,), generator=generator)
        ids[row, 0], ids[row, 1] = 1, IMAGE_TOKEN_INDEX  # bos, then the image
        mask[row, :length] = 1
        labels[row, length - LABELLED : length] = ids[row, length - LABELLED : length]
    images = torch.randn(size, 3, 224, 224, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": images, "lengths": lengths}


def _training_inputs(model, batch: dict) -> dict:
    """The keyword arguments this tree's training loop passes its model."""
    accepted = inspect.signature(model.forward).parameters
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels", "images")}
    inputs["image_counts"] = [1] * len(batch["lengths"])
    if "layout" in accepted:  # span routing, the flash path and the label-position head (issue 14)
        from owl2.model.layout import RowLayout

        inputs["layout"] = RowLayout.unpacked(batch["lengths"], inputs["image_counts"])
    if "label_counts" in accepted:
        from owl2.model.owl2 import count_labels

        inputs["label_counts"] = count_labels(batch["input_ids"], batch["labels"])
    return inputs


def time_steps(batch_size: int, warmup: int, iters: int) -> float:
    """Median seconds of a training step of the owl2 importable here."""
    import torch

    from owl2.config import ModelConfig
    from owl2.model import Owl2Config, Owl2ForCausalLM

    torch.manual_seed(0)
    model = Owl2ForCausalLM(Owl2Config.from_spec(ModelConfig.from_preset("tiny-cpu", MODEL)))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = _training_inputs(model, _batch(batch_size))
    times = []
    for index in range(warmup + iters):
        start = time.perf_counter()
        model(**inputs, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _child(tree: Path, batches: list[int], iters: int) -> dict[int, float]:
    """Step times of the owl2 in ``tree``, from a fresh process that imports it first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--batch", *map(str, batches)]
    command += ["--iters", str(iters)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"timing {tree} failed:\n{done.stderr[-3000:]}")
    return {int(size): seconds for size, seconds in json.loads(done.stdout.splitlines()[-1]).items()}


def _worktree(revision: str, into: Path) -> Path:
    folder = into / "against"
    add = ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), revision]
    done = subprocess.run(add, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"--against {revision}: {done.stderr.strip().splitlines()[-1]}")
    return folder


def compare(against: str | None, batches: list[int], iters: int, rounds: int) -> dict:
    """Median step seconds per batch size, of this tree and of ``against``, taking turns ``rounds`` times."""
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"this": ROOT}
        if against:
            trees[against] = _worktree(against, Path(scratch))
        try:
            runs = [{name: _child(tree, batches, iters) for name, tree in trees.items()} for _ in range(rounds)]
        finally:
            if against:
                remove = ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees[against])]
                subprocess.run(remove, capture_output=True, check=False)
    return {name: {size: statistics.median(run[name][size] for run in runs) for size in batches} for name in trees}


def table(result: dict, against: str | None) -> str:
    lines = [
        f"{'batch':>5} {'this tree (s)':>14}"
        + (f" {against + ' (s)':>16} {'this / ' + against:>16}" if against else "")
    ]
    for size, seconds in result["this"].items():
        line = f"{size:>5} {seconds:>14.4f}"
        if against:
            old = result[against][size]
            line += f" {old:>16.4f} {seconds / old:>16.3f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default=None, help="a git revision of owl2 to time beside this tree")
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 1])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.batch) < 1 or args.iters < 1 or args.rounds < 1:
        print("step_bench: --batch, --iters and --rounds must be positive", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps({size: time_steps(size, 2, args.iters) for size in args.batch}))
        return 0
    try:
        result = compare(args.against, args.batch, args.iters, args.rounds)
    except RuntimeError as error:
        print(f"step_bench: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else table(result, args.against))
    return 0


if __name__ == "__main__":
    sys.exit(main())
