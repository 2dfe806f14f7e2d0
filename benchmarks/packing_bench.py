"""Training forward + backward of one micro-batch, one sample a row against the same samples packed.

    python benchmarks/packing_bench.py [--preset tiny-cpu] [--samples 8] [--max-length 192] [--device cpu]
        [--warmup 2] [--iters 7] [--seed 0] [--json]

The micro-batch is built by the real :class:`~owl2.data.batch.Collator` from ``--samples`` random samples shaped
like the tiny shapes world's stage-2 mixture (``owl2 data synth``'s world through the ``mplug_owl2`` template:
instruction records of one image and 82-168 text tokens, text-only ones of 13-37, and at weight 0.2 captions of
one image and 10-26), once padded and once packed into rows of ``--max-length`` decoder tokens. Both run the
training forward (``label_counts``: the LM head on label positions) and backward of the whole model; each time
is the median over ``--iters`` runs after ``--warmup``, the two taking turns. It also reports how far the packed
loss and gradients are from the padded ones (on CUDA: the varlen kernel against SDPA's causal flash one, in
bf16). ``--json`` prints ``{"padded_s", "packed_s", "speedup", "loss_relative_difference",
"grad_relative_difference", "padded_shape", "packed_shape", "padding_efficiency", ...}``; otherwise a table.
fp32 on the CPU (use ``OMP_NUM_THREADS=1`` on a shared machine), bf16 autocast on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ConfigError, ModelConfig
from owl2.data.batch import Batch, Collator
from owl2.data.packing import padding_efficiency
from owl2.data.pipeline import EPOCH, ORDER_KEY
from owl2.model import Owl2Config, Owl2ForCausalLM
from owl2.model.owl2 import count_labels

# (share of samples, images, text tokens low-high, labelled tokens at the end): the shapes world's stage-2 mixture,
# 2000 instruction records with an image, 502 without, and 2000 captions at weight 0.2 (median labels 20, 4, 17).
KINDS = ((0.69, 1, (82, 168), 20), (0.17, 0, (13, 37), 4), (0.14, 1, (10, 26), 17))


def records(samples: int, image_size: int, seed: int) -> dict[str, np.ndarray]:
    """``samples`` rows as ``pipeline.encoded`` hands them to the collator, drawn from :data:`KINDS`."""
    rng = np.random.default_rng(seed)
    shares = [share for share, *_ in KINDS]
    rows: dict[str, list[Any]] = {name: [] for name in ("id", "error", "detail", "input_ids", "labels", "pixels")}
    rows |= {"num_images": [], EPOCH: [], ORDER_KEY: []}
    for key in range(samples):
        _, images, (low, high), labelled = KINDS[rng.choice(len(KINDS), p=shares)]
        ids = rng.integers(3, 256, int(rng.integers(low, high + 1)))
        ids[1 : 1 + images] = IMAGE_TOKEN_INDEX
        rows["id"].append(f"r{key}")
        rows["error"].append("")
        rows["detail"].append("")
        rows["input_ids"].append(ids)
        rows["labels"].append(np.where(np.arange(len(ids)) >= max(1 + images, len(ids) - labelled), ids, IGNORE_INDEX))
        rows["pixels"].append(rng.integers(0, 256, (images, 3, image_size, image_size), dtype=np.uint8))
        rows["num_images"].append(images)
        rows[EPOCH].append(0)
        rows[ORDER_KEY].append(key)
    out = {}
    for name, values in rows.items():
        if name in ("input_ids", "labels", "pixels"):
            out[name] = np.empty(len(values), dtype=object)
            out[name][:] = values
        else:
            out[name] = np.asarray(values)
    return out


def _step(model: Owl2ForCausalLM, batch: Batch, device: torch.device) -> Callable[[], torch.Tensor]:
    """The training forward and backward of ``batch``, returning the (device) loss and leaving the gradients."""
    labels = count_labels(batch.input_ids, batch.labels, batch.sample_ids)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = batch.to(device, dtype)

    def run() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**inputs, use_cache=False, label_counts=labels).loss
        loss.backward()
        return loss.detach()

    return run


def _difference(model: Owl2ForCausalLM, steps: dict[str, Callable[[], torch.Tensor]]) -> dict[str, float]:
    """How far the packed step's loss and gradients are from the padded one's (relative; 0 in exact arithmetic)."""
    results = {}
    for name, run in steps.items():
        loss = run()
        results[name] = loss.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    (padded_loss, padded), (packed_loss, packed) = results["padded"], results["packed"]
    # Over all gradients together: some are zero in exact arithmetic (a key bias under softmax), and their
    # rounding noise would dominate a per-parameter ratio.
    difference = torch.stack([(packed[n] - g).norm() for n, g in padded.items()]).norm()
    total = torch.stack([g.norm() for g in padded.values()]).norm()
    return {
        "loss_relative_difference": float((packed_loss - padded_loss).abs() / padded_loss),
        "grad_relative_difference": float(difference / total),
    }


def _seconds(run: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def compare(
    spec: ModelConfig, samples: int, max_length: int, device: torch.device, warmup: int, iters: int, seed: int
) -> dict[str, Any]:
    """Median seconds of a training forward + backward, padded and packed, on the same samples, and how far the
    packed loss and gradients are from the padded ones (the gradients' difference relative to their norm, over all
    parameters together)."""
    torch.manual_seed(seed)
    model = Owl2ForCausalLM(Owl2Config.from_spec(spec)).to(device).train()
    rows = records(samples, spec.vision.image_size, seed)
    pad = spec.decoder.pad_token_id
    padded = Collator(pad, spec.vision.image_size)(rows)
    packed = Collator(pad, spec.vision.image_size, max_length, spec.tokens_per_image)(rows)
    steps = {"padded": _step(model, padded, device), "packed": _step(model, packed, device)}
    for _ in range(warmup):
        for run in steps.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, run in steps.items():
            times[name].append(_seconds(run, device))
    padded_s, packed_s = (statistics.median(times[name]) for name in ("padded", "packed"))
    lengths = [n for row in padded.layout.expanded(spec.tokens_per_image) for n in row]
    return {
        "padded_s": padded_s,
        "packed_s": packed_s,
        "speedup": padded_s / packed_s,
        **_difference(model, steps),
        "padded_shape": [len(lengths), max(lengths)],
        "packed_shape": [len(packed.layout.tokens), max(map(sum, packed.layout.expanded(spec.tokens_per_image)))],
        "padding_efficiency": padding_efficiency([lengths], max_length),
        "decoder_tokens": sum(lengths),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--samples", type=int, default=8, help="samples in the micro-batch (tiny stage 2: 8)")
    parser.add_argument("--max-length", type=int, default=192, help="packed row length (tiny stage 2: 192)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("packing_bench: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    if not (args.samples > 0 and args.max_length > 0 and args.iters > 0 and args.warmup >= 0):
        print("packing_bench: need --samples, --max-length and --iters > 0, --warmup >= 0", file=sys.stderr)
        return 2
    try:
        spec = ModelConfig.from_preset(args.preset)
    except ConfigError as error:
        print(f"packing_bench: {error}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    result = compare(spec, args.samples, args.max_length, device, args.warmup, args.iters, args.seed)
    result.update(preset=args.preset, samples=args.samples, max_length=args.max_length, device=args.device)
    if args.json:
        print(json.dumps(result))
        return 0
    efficiency = result["padding_efficiency"]
    print(
        f"{args.preset}, {args.samples} samples ({result['decoder_tokens']} decoder tokens), rows of up to "
        f"{args.max_length}, {args.device}; training forward + backward, median of {args.iters}"
    )
    print(f"{'':8} {'rows x width':>13} {'efficiency':>11} {'seconds':>9}")
    for name in ("padded", "packed"):
        shape = "{} x {}".format(*result[f"{name}_shape"])
        print(f"{name:8} {shape:>13} {efficiency[name]:11.3f} {result[f'{name}_s']:9.4f}")
    loss, grad = result["loss_relative_difference"], result["grad_relative_difference"]
    print(f"speedup {result['speedup']:.2f}x; packed vs padded (relative): loss {loss:.1e}, gradients {grad:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
