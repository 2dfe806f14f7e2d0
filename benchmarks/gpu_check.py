"""GPU check of the 7B recipe: kernel throughput and MFU, and whether each stage's training step fits one GPU.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--cpu-smoke]

Run it on the first GPU machine at hand (one GPU, no weights, no data: everything is random at the true shapes;
a few minutes on an H100). It writes one JSON with a section per check, each guarded: a failure (an OOM, say)
is recorded as that section's ``error`` and the rest still runs.

* ``matmul_peak``: a large bf16 matmul, timed; its TFLOP/s is the peak that every ``mfu`` below divides by.
* ``decoder_layer``: one 7B-shaped decoder layer, with the modality-adaptive module (65 tokens an image), the
  same compiled as training compiles it (``stage.compile``: ``torch.compile`` per layer, inductor; its
  ``compile_s`` is the first call's time), and as transformers' plain ``LlamaDecoderLayer``, forward + backward
  in bf16 at T = 512 and 2048, timed by ``benchmarks/layer_bench.py`` (medians). FLOPs: matmuls only, 2 per
  multiply-add, causal attention as the lower triangle, backward = 2x forward; routed by span, the MAM layer
  runs the same matmuls as LLaMA's.
* ``vision``: the ViT-L/14 at 448 px and the abstractor, forward + backward in bf16 at the stage-2 micro-batch
  (FLOPs counted by ``torch.utils.flop_counter``).
* ``stage1_step``: one full training step of the 7B model as ``experiments/owl2_7b/stage1.yaml`` configures it
  (micro-batch, image size, trainable set, activation checkpointing, bf16, its layers compiled as
  ``compile: auto`` does on a GPU; on one GPU, unsharded, whatever its ``strategy``), with the real optimizer
  (``build_optimizer``) and precision policy (``parallel.prepare_precision``), and its peak memory;
  ``stage1_step_other_checkpointing`` the same with activation checkpointing the other way round, and
  ``stage1_step_other_compile`` with compilation the other way round (eager on a GPU): whether compiling pays
  for a whole step.
* ``stage2_step``: the same for stage 2 at full depth without optimizer state (its AdamW state only fits
  sharded), and ``stage2_step_full_state``: the deepest stage-2 model whose whole training state fits.
  Each step reports its peak memory next to ``owl2.plan``'s estimate for that configuration on one GPU.
* ``sync_debug``: one stage-1 step under ``torch.cuda.set_sync_debug_mode("error")``: whether it raised, where.
* ``packing``: a training step of samples packed into stage 2's ``max_length`` rows against one sample a row
  (``benchmarks/packing_bench.py``, two decoder layers at full width): the varlen kernel against SDPA's causal
  flash one, their times and how far the packed loss and gradients are from the padded ones.

Timings use CUDA events after warm-up (compilation happens in the warm-up). ``--cpu-smoke`` runs the same code on
the CPU at reduced sizes (the ``debug`` preset, short sequences, ``perf_counter``, Dynamo's ``eager`` backend
where the GPU run compiles with inductor) so that ``tests/test_gpu_check.py`` keeps it working.
Without a visible GPU and without ``--cpu-smoke`` it exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "experiments" / "owl2_7b"
NO_GPU_EXIT = 2
VISUAL_TOKENS = 65
"""Image tokens at the start of the MAM layer's sequence: one 7B image (64 queries + end-of-image)."""


@dataclasses.dataclass
class Bench:
    """Where and at what size the checks run; ``peak_tflops`` is set by the matmul check."""

    device: torch.device
    smoke: bool
    peak_tflops: float | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def compile_backend(self) -> str:
        """Inductor on the GPU, as training compiles; the smoke run only traces (its timings mean nothing)."""
        return "eager" if self.smoke else "inductor"

    def spec(self, decoder_layers: int | None = None) -> Any:
        from owl2.config import ModelConfig

        overrides = {"decoder": {"num_layers": decoder_layers}} if decoder_layers else {}
        return ModelConfig.from_preset("debug" if self.smoke else "owl2-7b", overrides)

    def stage(self, name: str) -> Any:
        """The recipe's stage; the smoke run shrinks its batch and lengths to the debug preset's."""
        from owl2.config import StageConfig, build, load_yaml

        stage = build(StageConfig, load_yaml(RECIPE / f"{name}.yaml"), f"stages.{name}")
        if not self.smoke:
            return stage
        size = self.spec().vision.image_size
        data = dataclasses.replace(stage.data, max_length=32, image_size=size)
        return dataclasses.replace(stage, micro_batch_size=2, image_size=size, data=data)

    def seconds(self, run: Callable[[], Any], warmup: int = 2, iters: int = 5) -> float:
        """Mean seconds per call of ``run`` after ``warmup`` calls (one and one in the smoke run: it checks the
        code, and its timings mean nothing)."""
        if self.smoke:
            warmup, iters = min(warmup, 1), 1
        for _ in range(warmup):
            run()
        if not self.cuda:
            start = time.perf_counter()
            for _ in range(iters):
                run()
            return (time.perf_counter() - start) / iters
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        for _ in range(iters):
            run()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000 / iters

    def rate(self, flops: float, seconds: float) -> dict[str, float | None]:
        tflops = flops / seconds / 1e12
        return {
            "seconds": seconds,
            "flops": flops,
            "tflops": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
        }

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


# ------------------------------------------------------------------------------------------ kernels


def matmul_peak(bench: Bench) -> dict[str, Any]:
    """The bf16 matmul rate this device reaches: the denominator of every MFU."""
    n = 256 if bench.smoke else 8192
    a, b = (torch.randn(n, n, device=bench.device, dtype=torch.bfloat16) for _ in range(2))
    result = {"n": n, **bench.rate(2 * n**3, bench.seconds(lambda: a @ b, warmup=3, iters=10))}
    result.pop("mfu")
    bench.peak_tflops = result["tflops"]
    return result


def layer_flops(decoder: Any, length: int) -> float:
    """Forward + backward matmul FLOPs of one decoder layer over ``length`` tokens (causal: lower triangle). The
    modality-adaptive layer routes each token through its own K/V copy: the same matmuls as a LLaMA layer."""
    width, heads, head_dim = decoder.hidden_size, decoder.num_heads, decoder.head_dim
    weights = 2 * width * heads * head_dim + 2 * width * decoder.num_kv_heads * head_dim
    weights += 3 * width * decoder.intermediate_size
    attention = 2 * 2 * heads * head_dim * length * (length + 1) / 2
    return 3 * (2 * length * weights + attention)


def decoder_layer(bench: Bench) -> dict[str, Any]:
    """One modality-adaptive layer, eager and compiled, and one plain LLaMA layer, timed by ``layer_bench`` (bf16)."""
    from layer_bench import time_layers

    decoder = bench.spec().decoder
    warmup, iters = (1, 1) if bench.smoke else (2, 5)
    result = {}
    for length in (16, 64) if bench.smoke else (512, 2048):
        visual = min(VISUAL_TOKENS, length // 2)
        times = time_layers(
            decoder, 1, length, visual, bench.device, torch.bfloat16, warmup, iters, bench.compile_backend
        )
        for name, key in (
            ("modality_adaptive", "mam_s"),
            ("modality_adaptive_compiled", "compiled_s"),
            ("llama", "llama_s"),
        ):
            result[f"{name}_T{length}"] = {"length": length, **bench.rate(layer_flops(decoder, length), times[key])}
        result[f"modality_adaptive_compiled_T{length}"]["compile_s"] = times["compile_s"]
    return result


def _counted_rate(bench: Bench, module: torch.nn.Module, inputs: torch.Tensor) -> dict[str, Any]:
    """Forward + backward of ``module`` on ``inputs``: FLOPs counted once by torch, then timed."""
    from torch.utils.flop_counter import FlopCounterMode

    def step() -> None:
        out = module(inputs)
        (out[0] if isinstance(out, tuple) else out).float().sum().backward()

    with FlopCounterMode(display=False) as counter:
        step()
    return bench.rate(counter.get_total_flops(), bench.seconds(step))


def vision(bench: Bench) -> dict[str, Any]:
    """The ViT at stage 2's resolution and the abstractor on its output, at stage 2's micro-batch."""
    from owl2.model.abstractor import VisualAbstractor
    from owl2.model.vision import VisionEncoder

    spec, stage = bench.spec(), bench.stage("stage2")
    encoder = VisionEncoder(dataclasses.replace(spec.vision, image_size=stage.image_size))
    encoder.to(bench.device, torch.bfloat16)
    images = torch.randn(stage.micro_batch_size, 3, stage.image_size, stage.image_size, device=bench.device)
    result = {"images": stage.micro_batch_size, "image_size": stage.image_size}
    result["vit"] = _counted_rate(bench, encoder, images.to(torch.bfloat16))
    grid = stage.image_size // spec.vision.patch_size
    abstractor = VisualAbstractor(spec.abstractor, grid, spec.decoder.hidden_size).to(bench.device, torch.bfloat16)
    tokens = torch.randn(stage.micro_batch_size, 1 + grid * grid, spec.vision.hidden_size, device=bench.device)
    result["abstractor"] = _counted_rate(bench, abstractor, tokens.to(torch.bfloat16).requires_grad_())
    return result


# ------------------------------------------------------------------------------------------ training steps


def random_model(bench: Bench, spec: Any, stage: Any) -> torch.nn.Module:
    """The stage's model at random weights, built on the device as the loop prepares it (no fp32 detour)."""
    from owl2.model import Owl2Config, Owl2ForCausalLM
    from owl2.model.keymaps import Conversion
    from owl2.train import parallel
    from owl2.train.optim import apply_trainable

    config = Owl2Config.from_spec(spec)
    model = Owl2ForCausalLM.from_state_dict(
        config, Conversion(state_dict={}), device=bench.device, dtype=torch.bfloat16, strict=False, fresh=("",)
    )
    model.set_image_size(stage.image_size)
    apply_trainable(model, stage.trainable)
    parallel.prepare_precision(model, stage, bench.device)
    parallel.prepare_layers(model, stage, bench.device, bench.compile_backend)
    return model.train()


def random_batch(bench: Bench, spec: Any, stage: Any) -> dict[str, Any]:
    """``micro_batch_size`` rows of one image and text, ``max_length`` decoder tokens each once expanded."""
    from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from owl2.model.layout import RowLayout

    rows, text = stage.micro_batch_size, stage.data.max_length - spec.tokens_per_image + 1
    ids = torch.randint(3, spec.decoder.vocab_size, (rows, text), device=bench.device)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    images = torch.randn(rows, 3, stage.image_size, stage.image_size, device=bench.device, dtype=torch.bfloat16)
    labels = torch.where(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX, ids)
    mask = torch.ones_like(ids)
    layout = RowLayout.unpacked([text] * rows, [1] * rows)  # as the collator says it: attention takes the flash path
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": images, "image_counts": [1] * rows}
    return {**batch, "layout": layout}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch: dict[str, Any]) -> None:
    """Forward, backward, clip and update as the loop does, without its host reads (loss, norm)."""
    with torch.autocast(model.device.type, dtype=torch.bfloat16):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    if optimizer is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
    model.zero_grad(set_to_none=True)


def plan_estimate(bench: Bench, spec: Any, stage: Any, *, optimizer: bool) -> dict[str, float]:
    """``owl2.plan``'s memory estimate (GiB) for this step on one GPU without a wrapper: the plan's DDP over one
    worker (whole weights, autocast's bf16 casts of the trainable ones), less the optimizer state when the step
    runs without it."""
    from owl2.plan.flops import Trainable
    from owl2.plan.memory import GIB, Workload, estimate_memory
    from owl2.plan.report import stage_parameters
    from owl2.train.parallel import use_bf16

    layout = stage_parameters(spec, stage.trainable, stage.image_size).layout
    work = Workload(
        strategy="ddp",
        world_size=1,
        bf16=use_bf16(stage, bench.device),
        micro_batch=stage.micro_batch_size,
        length=stage.data.max_length,
        images_per_row=1,
        image_size=stage.image_size,
        checkpointing=stage.activation_checkpointing,
    )
    estimate = estimate_memory(spec, Trainable.from_parts(stage.trainable), layout, work)
    parts = {name: getattr(estimate, name) / GIB for name in ("weights", "gradients", "buffers", "activations")}
    parts["optimizer"] = estimate.optimizer / GIB if optimizer else 0.0
    return parts | {"total": sum(parts.values())}


def stage_step(
    bench: Bench,
    name: str,
    *,
    layers: int | None = None,
    optimizer: bool = True,
    checkpointing: bool | None = None,
    compiled: bool | None = None,
) -> dict[str, Any]:
    """One warm-up (which compiles, where the stage compiles) and one timed training step of the recipe's stage
    (activation checkpointing and compilation as configured unless ``checkpointing`` or ``compiled`` says); peak
    memory over both."""
    from owl2.train.optim import build_optimizer
    from owl2.train.parallel import use_compile

    stage = bench.stage(name)
    if checkpointing is not None:
        stage = dataclasses.replace(stage, activation_checkpointing=checkpointing)
    if compiled is not None:
        stage = dataclasses.replace(stage, compile=compiled)
    spec = bench.spec(layers)
    bench.reset_peak()
    model = random_model(bench, spec, stage)
    opt = build_optimizer(model, stage.optim)[0] if optimizer else None
    batch = random_batch(bench, spec, stage)
    seconds = bench.seconds(lambda: train_step(model, opt, batch), warmup=1, iters=1)
    return {
        "decoder_layers": spec.decoder.num_layers,
        "micro_batch": stage.micro_batch_size,
        "tokens_per_row": stage.data.max_length,
        "image_size": stage.image_size,
        "trainable": stage.trainable,
        "activation_checkpointing": stage.activation_checkpointing,
        "compiled": use_compile(stage, bench.device),
        "optimizer": optimizer,
        "step_seconds": seconds,
        "peak_memory_gb": bench.peak_gb(),
        "plan_estimate_gb": plan_estimate(bench, spec, stage, optimizer=optimizer),
    }


def deepest_full_state(bench: Bench) -> int:
    """Decoder depth whose stage-2 training state (fp32 weights, gradients, AdamW, bf16 copies: 18 bytes per
    parameter) takes at most 3/4 of the GPU, the rest left to activations; 2 layers in the smoke run."""
    if bench.smoke:
        return 2
    from owl2.model import Owl2Config, Owl2ForCausalLM

    def count(layers: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in Owl2ForCausalLM(Owl2Config.from_spec(bench.spec(layers))).parameters())

    per_layer, base = count(2) - count(1), 2 * count(1) - count(2)
    budget = 0.75 * torch.cuda.get_device_properties(bench.device).total_memory / 18
    return max(1, min(bench.spec().decoder.num_layers, math.floor((budget - base) / per_layer)))


def sync_debug(bench: Bench) -> dict[str, Any]:
    """A stage-1 step (two decoder layers at full width) with host-device syncs made errors."""
    from owl2.train.optim import build_optimizer

    stage, spec = bench.stage("stage1"), bench.spec(2)
    model = random_model(bench, spec, stage)
    optimizer = build_optimizer(model, stage.optim)[0]
    batch = random_batch(bench, spec, stage)
    train_step(model, optimizer, batch)  # warm-up: optimizer state and lazy initialisations
    result: dict[str, Any] = {"mode": "error" if bench.cuda else "not set (no CUDA)", "raised": False}
    if bench.cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(model, optimizer, batch)
    except Exception as error:  # noqa: BLE001 - torch raises RuntimeError; any failure is what is asked
        frames = [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_tb(error.__traceback__)]
        result.update(raised=True, error=str(error).splitlines()[0], where=frames[-6:])
    finally:
        if bench.cuda:
            torch.cuda.set_sync_debug_mode(0)
    return result


def packing(bench: Bench) -> dict[str, Any]:
    """A training step of stage 2's samples packed into ``max_length`` rows against one sample a row (two decoder
    layers at full width): the varlen kernel against SDPA's causal flash one, time and agreement."""
    from packing_bench import compare

    stage = bench.stage("stage2")
    warmup, iters = (1, 1) if bench.smoke else (2, 5)
    # The smoke run's rows hold a few of the benchmark's samples (its stage rows of 32 tokens would hold none).
    samples, max_length = (8, 192) if bench.smoke else (4 * stage.micro_batch_size, stage.data.max_length)
    return compare(bench.spec(2), samples, max_length, bench.device, warmup, iters, seed=0)


# ------------------------------------------------------------------------------------------ driver


def guarded(check: Callable[[], dict[str, Any]], bench: Bench) -> dict[str, Any]:
    """Run one check; an exception becomes its ``error``. Memory and compiled graphs are released for the next
    check (each compiles what it runs in its own warm-up)."""
    start = time.perf_counter()
    try:
        result = check()
    except Exception as error:  # noqa: BLE001 - recorded, and the other checks still run
        result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:400]}
    torch._dynamo.reset()
    gc.collect()
    if bench.cuda:
        torch.cuda.empty_cache()
    result["check_seconds"] = time.perf_counter() - start
    return result


def run(bench: Bench) -> dict[str, Any]:
    from owl2.train.parallel import use_compile

    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "matmul_peak": lambda: matmul_peak(bench),
        "decoder_layer": lambda: decoder_layer(bench),
        "vision": lambda: vision(bench),
        "stage1_step": lambda: stage_step(bench, "stage1"),
        "stage1_step_other_checkpointing": lambda: stage_step(
            bench, "stage1", checkpointing=not bench.stage("stage1").activation_checkpointing
        ),
        "stage1_step_other_compile": lambda: stage_step(
            bench, "stage1", compiled=not use_compile(bench.stage("stage1"), bench.device)
        ),
        "stage2_step": lambda: stage_step(bench, "stage2", optimizer=False),
        "stage2_step_full_state": lambda: stage_step(bench, "stage2", layers=deepest_full_state(bench)),
        "sync_debug": lambda: sync_debug(bench),
        "packing": lambda: packing(bench),
    }
    name = torch.cuda.get_device_name(bench.device) if bench.cuda else "cpu"
    result: dict[str, Any] = {"device": name, "torch": torch.__version__, "cpu_smoke": bench.smoke}
    for key, check in checks.items():
        result[key] = guarded(check, bench)
        print(f"gpu_check: {key} done in {result[key]['check_seconds']:.1f} s", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON to write (gpu_check.json)")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same checks on the CPU at reduced sizes")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible; run it on a GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return NO_GPU_EXIT
    bench = Bench(torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0), smoke=args.cpu_smoke)
    result = run(bench)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    failed = [key for key, value in result.items() if isinstance(value, dict) and "error" in value]
    print(f"gpu_check: wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
