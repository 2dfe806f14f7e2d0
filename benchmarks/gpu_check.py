"""GPU smoke check and throughput table: a few bf16 steps of both stages through the real Ray Train path.

    python benchmarks/gpu_check.py [--steps 20] [--strategies ddp,fsdp] [--activation-checkpointing]
                                   [--set model.overrides.decoder.num_layers=8 ...] [--keep DIR]

Generates a small shapes world (``owl2.data.world.generate_world``) in a temporary folder and runs the shipped
tiny-cpu pipeline (``experiments/tiny_cpu``) on it with ``run_experiment``, exactly as ``owl2 train`` would,
but with ``resources.use_gpu=true``, one worker and ``precision: bf16``:

* stage 1 (frozen decoder text side, captions) and stage 2 (everything, conversations with text-only rows)
  under DDP;
* with ``fsdp`` in ``--strategies``: stage 2 again under FSDP2, starting from the same stage-1 checkpoint.

Each row reports the last logging window (the second half of the stage, so start-up and the first CUDA
kernels are left out): samples/s and tokens/s over all workers, the peak GPU memory of the fullest worker
(``torch.cuda.max_memory_allocated``, reported by the loop as ``peak_memory_gb``) and the final loss.
With the tiny preset the GPU is mostly idle: the numbers check that the path works, not how fast the 7B
runs; ``--set model.overrides...`` makes the model bigger. Takes 2-4 minutes on one GPU (workers, Ray Data
and MLflow start-up dominate). Exits with code 2, before starting anything, when no GPU is visible; CI never
runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PIPELINE = Path(__file__).resolve().parents[1] / "experiments" / "tiny_cpu" / "pipeline.yaml"
NO_GPU_EXIT = 2


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per stage (default 20)")
    parser.add_argument(
        "--strategies", default="ddp,fsdp", help="stage-2 strategies to run, comma-separated (default ddp,fsdp)"
    )
    parser.add_argument("--activation-checkpointing", action="store_true", help="turn it on in both stages")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra experiment override, e.g. model.overrides.decoder.num_layers=8 (repeatable)",
    )
    parser.add_argument("--cpus-per-worker", type=float, default=4.0)
    parser.add_argument("--keep", type=Path, help="write the world, checkpoints and MLflow store here and keep them")
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - {"ddp", "fsdp"})
    if unknown or not strategies:
        parser.error(f"--strategies takes ddp and/or fsdp, got {args.strategies!r}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the table reports the second half of each stage)")
    args.strategies = strategies
    return args


def _gpu_or_exit() -> str:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print(
            "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on a GPU machine. "
            "CPU training is covered by tests/test_train.py.",
            file=sys.stderr,
        )
        raise SystemExit(NO_GPU_EXIT)
    return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}"


def _stage_overrides(stage: str, steps: int, activation_checkpointing: bool) -> list[str]:
    from owl2.config import StageConfig

    overrides = [
        f"stages.{stage}.max_steps={steps}",
        f"stages.{stage}.checkpoint_every={steps}",
        f"stages.{stage}.log_every={steps // 2}",
        f"stages.{stage}.optim.warmup_steps=1",
        f"stages.{stage}.precision=bf16",
        f"stages.{stage}.activation_checkpointing={str(activation_checkpointing).lower()}",
    ]
    if "validation" in {field.name for field in dataclasses.fields(StageConfig)}:
        overrides.append(f"stages.{stage}.validation=null")  # held-out loss is not what this measures
    return overrides


def _experiment(root: Path, name: str, args: argparse.Namespace, extra: list[str]) -> Any:
    from owl2.config import load_experiment
    from owl2.train.trainer import resolve_paths

    overrides = [
        f"name={name}",
        f"storage_path={root / 'runs'}",
        "resources.use_gpu=true",
        "resources.num_workers=1",
        f"resources.cpus_per_worker={args.cpus_per_worker}",
        "max_failures=0",
        *_stage_overrides("stage1", args.steps, args.activation_checkpointing),
        *_stage_overrides("stage2", args.steps, args.activation_checkpointing),
        *args.set,
        *extra,
    ]
    # The pipeline's data paths are relative (data/shapes_world/...): resolve them against the scratch root.
    return resolve_paths(load_experiment(PIPELINE, overrides), base=root)


def _row(stage: str, strategy: str, metrics: dict[str, Any], wall_s: float) -> dict[str, Any]:
    return {
        "stage": stage,
        "strategy": strategy,
        "steps": int(metrics.get("step", 0)),
        "samples/s": metrics.get("samples_per_s", float("nan")),
        "tokens/s": metrics.get("tokens_per_s", float("nan")),
        "peak GiB": metrics.get("peak_memory_gb", float("nan")),
        "final loss": metrics.get("loss", float("nan")),
        "stage wall s": wall_s,
    }


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = list(rows[0])
    cells = [
        [
            f"{value:,.1f}"
            if key in ("samples/s", "tokens/s", "stage wall s")
            else f"{value:.2f}"
            if key == "peak GiB"
            else f"{value:.4f}"
            if key == "final loss"
            else str(value)
            for key, value in row.items()
        ]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))

    print(render(header))
    print("-" * len(render(header)))
    for line in cells:
        print(render(line))


def run(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    from owl2.data.world import generate_world
    from owl2.train.trainer import run_experiment

    generate_world(root / "data" / "shapes_world", seed=0, num_train=400, num_heldout=16)
    stamp = time.strftime("%Y%m%d-%H%M%S")  # a new name each time: a known name would resume that run
    rows = []

    experiment = _experiment(root, f"gpu-check-{stamp}", args, ["stages.stage2.strategy=ddp"])
    stages = ["stage1", "stage2"] if "ddp" in args.strategies else ["stage1"]
    stage1: Any = None
    for stage in stages:
        start = time.perf_counter()
        result = run_experiment(experiment, stages=[stage])
        rows.append(_row(stage, experiment.stages[stage].strategy, result[0].metrics, time.perf_counter() - start))
        if stage == "stage1":
            stage1 = result[0]
            # Stage 2 of this experiment must start from this stage-1 checkpoint, as in a full pipeline run.
            experiment.stages["stage2"].init_from = stage1.checkpoint.path

    if "fsdp" in args.strategies:
        fsdp = _experiment(
            root,
            f"gpu-check-{stamp}-fsdp",
            args,
            ["stages.stage2.strategy=fsdp", f"stages.stage2.init_from={stage1.checkpoint.path}"],
        )
        start = time.perf_counter()
        result = run_experiment(fsdp, stages=["stage2"])
        rows.append(_row("stage2", "fsdp", result[0].metrics, time.perf_counter() - start))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = _gpu_or_exit()
    print(f"gpu_check on {device}: {args.steps} bf16 steps per stage, strategies {args.strategies}", flush=True)
    began = time.perf_counter()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows = run(args, args.keep.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="owl2-gpu-check-") as scratch:
            rows = run(args, Path(scratch))
    print()
    _print_table(rows)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
