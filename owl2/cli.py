"""The ``owl2`` command.

Subcommands import their heavy dependencies lazily, so ``owl2 --help`` and config errors come back at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from owl2.config import (
    DATA_FORMATS,
    EVAL_SUITES,
    MODEL_PRESETS,
    RESIZE_MODES,
    TEMPLATE_NAMES,
    ConfigError,
    DataConfig,
    ModelConfig,
    StageConfig,
    build,
    to_dict,
)
from owl2.errors import StageFailed
from owl2.folders import DamagedFolder
from owl2.tables import Column, format_table

# Exit code for a bad command line or configuration, as argparse uses for usage errors.
USAGE_ERROR = 2
RUN_FAILED = 1


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``owl2`` command line; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    _quiet_mlflow()
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError, DamagedFolder) as error:
        print(f"owl2: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except StageFailed as error:  # the cause is in the message; the traceback would bury it
        print(f"owl2: error: {error}", file=sys.stderr)
        return RUN_FAILED


def _quiet_mlflow() -> None:
    # The command's own lines carry the progress; MLflow's INFO lines (database set-up) would bury them.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="owl2", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_commands(commands)
    _add_model_commands(commands)
    _add_data_commands(commands)
    add_eval_commands(commands)
    return parser


def _add_run_commands(commands: Any) -> None:
    """``train``, ``demo``, ``sweep`` and ``ablate``: the commands that run Ray Train (their options are shared with
    ray_jobs/)."""
    train = commands.add_parser("train", help="run an experiment's training stages on Ray Train")
    add_train_arguments(train)
    train.set_defaults(handler=run_train)

    demo = commands.add_parser(
        "demo", help="the whole pipeline on this CPU: synthetic data, two training stages, evaluation, MLflow"
    )
    add_demo_arguments(demo)
    demo.set_defaults(handler=run_demo_command)

    plan = commands.add_parser(
        "plan", help="per stage, from the config alone: parameters, memory per GPU and whether it fits, FLOPs"
    )
    add_plan_arguments(plan)
    plan.set_defaults(handler=run_plan_command)

    sweep = commands.add_parser("sweep", help="run a Ray Tune sweep whose trials are training runs")
    add_sweep_arguments(sweep)
    sweep.set_defaults(handler=run_sweep_command)

    ablate = commands.add_parser(
        "ablate", help="run an ablation (arms x seeds as Ray Tune trials) and write its report against a baseline"
    )
    add_ablate_arguments(ablate)
    ablate.set_defaults(handler=run_ablate_command)


def _add_model_commands(commands: Any) -> None:
    """``model summary``, ``model convert`` and ``model build``."""
    model = commands.add_parser("model", help="inspect model configurations")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="COMMAND")
    summary = model_commands.add_parser(
        "summary", help="print a preset's configuration and parameter counts (no weights are allocated)"
    )
    summary.add_argument("--preset", required=True, help=f"model preset: {', '.join(MODEL_PRESETS)}")
    summary.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. decoder.num_layers=4")
    summary.set_defaults(handler=_model_summary)

    convert = model_commands.add_parser(
        "convert", help="re-save a released mPLUG-Owl2 folder (or one of ours) as an owl2 safetensors folder"
    )
    convert.add_argument("source", help="folder with config.json and weights (official or owl2 format)")
    convert.add_argument("--out", required=True, help="folder to write (config.json + model*.safetensors)")
    convert.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights, e.g. bfloat16")
    convert.set_defaults(handler=_model_convert)

    build = model_commands.add_parser(
        "build", help="assemble a fresh model from a LLaMA-2 folder and CLIP ViT-L/14 weights (new abstractor)"
    )
    build.add_argument("--llama", required=True, help="transformers LLaMA folder (config.json + weights)")
    build.add_argument("--clip", required=True, help="CLIP vision weights: OpenAI, timm or transformers naming")
    build.add_argument("--out", required=True, help="folder to write")
    build.add_argument("--image-size", type=int, help="input resolution (default 448); positions are resampled")
    build.add_argument(
        "--preset", help="architecture preset (default: ViT-L/14, the paper's abstractor, the LLaMA config's decoder)"
    )
    build.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="preset overrides, e.g. abstractor.num_layers=3"
    )
    build.add_argument("--dtype", choices=sorted(DTYPES), help="parameter dtype, e.g. bfloat16")
    build.set_defaults(handler=_model_build)


def _add_data_commands(commands: Any) -> None:
    """``data synth`` and ``data stats``; the stats defaults are the data config's own."""
    data = commands.add_parser("data", help="prepare datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    synth = data_commands.add_parser(
        "synth", help="generate the synthetic shapes world: images, captions, VQA, text task, tokenizer"
    )
    synth.add_argument("--out", required=True, help="folder to write (missing, empty or an earlier world)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes identical files")
    synth.add_argument("--train", type=int, default=2000, help="training images (default %(default)s)")
    synth.add_argument("--heldout", type=int, default=200, help="held-out images (default %(default)s)")
    synth.add_argument("--image-size", type=int, default=112, help="image side in pixels (default %(default)s)")
    synth.set_defaults(handler=_data_synth)

    defaults = DataConfig()
    stats = data_commands.add_parser(
        "stats", help="run a dataset through the training pipeline and print a JSON summary (counts, skips, lengths)"
    )
    stats.add_argument("--format", required=True, choices=DATA_FORMATS, help="data format")
    stats.add_argument("--path", required=True, nargs="+", help="data file(s) or folder(s), local or URI")
    stats.add_argument("--image-root", help="folder that relative image paths are under (default: beside the file)")
    stats.add_argument("--tokenizer", required=True, help="folder with tokenizer.model (e.g. the checkpoint folder)")
    stats.add_argument("--template", default=defaults.template, choices=TEMPLATE_NAMES, help="chat template")
    stats.add_argument("--max-length", type=int, default=defaults.max_length, help="sequence limit in decoder tokens")
    stats.add_argument("--image-size", type=int, default=defaults.image_size, help="training resolution")
    stats.add_argument("--resize", default=defaults.resize, choices=RESIZE_MODES, help="how images become square")
    stats.add_argument("--preset", default="owl2-7b", help="model preset giving the tokens per image (owl2-7b: 65)")
    stats.add_argument(
        "--micro-batch-size",
        type=int,
        default=StageConfig().micro_batch_size,
        help="samples per micro-batch, for the padding efficiency with and without packing (default %(default)s)",
    )
    stats.set_defaults(handler=_data_stats)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``owl2 train``, shared with ``ray_jobs/train.py``."""
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. experiments/tiny_cpu/pipeline.yaml")
    parser.add_argument(
        "--stage", action="append", help="run only this stage (repeatable); it starts from its init_from checkpoint"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. stages.stage2.optim.lr=1e-4")


def run_train(args: argparse.Namespace) -> int:
    from owl2.config import load_experiment
    from owl2.train.trainer import run_experiment

    experiment = load_experiment(args.config, list(args.overrides))
    results = run_experiment(experiment, stages=args.stage)
    for result in results:
        loss = result.metrics.get("loss")
        print(
            f"{result.stage}: step {result.metrics.get('step')}, loss {loss if loss is None else round(loss, 4)}, "
            f"checkpoint {result.checkpoint.path}"
        )
    return 0


def job_entrypoint(description: str, add_arguments: Any, run: Any, argv: Sequence[str] | None = None) -> int:
    """``main`` of a ``ray_jobs/`` script: the CLI command's options and behaviour, as a standalone program."""
    parser = Parser(description=description)
    add_arguments(parser)
    _quiet_mlflow()
    try:
        return run(parser.parse_args(argv))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except StageFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return RUN_FAILED


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``owl2 plan``."""
    from owl2.plan.gpus import GPUS

    parser.add_argument("--config", required=True, help="experiment YAML, e.g. experiments/owl2_7b/pipeline.yaml")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--gpu", help=f"the workers' GPU (default: resources.gpu): {', '.join(GPUS)}")
    target.add_argument("--gpu-memory-gb", type=float, help="GPU memory in GiB, for a GPU not in the table")
    parser.add_argument(
        "--text-tokens", type=int, help="text tokens per row beside its one image (default: a full data.max_length row)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. stages.stage1.micro_batch_size=16")


def run_plan_command(args: argparse.Namespace) -> int:
    """Print every stage's plan; exit status 1 when a stage does not fit, with one line per such stage."""
    import json

    from owl2.config import load_experiment
    from owl2.plan.report import format_plan, plan_experiment

    experiment = load_experiment(args.config, list(args.overrides))
    plans = plan_experiment(experiment, args.gpu, args.gpu_memory_gb, args.text_tokens)
    if args.json:
        print(json.dumps({"stages": {name: plan.to_json() for name, plan in plans.items()}}, indent=2))
    else:
        print("\n\n".join(format_plan(plan) for plan in plans.values()))
    failing = [plan for plan in plans.values() if plan.fits is False]
    for plan in failing:
        print(f"owl2: {plan.reason()}", file=sys.stderr)
    return 1 if failing else 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``owl2 demo``, shared with ``ray_jobs/demo.py``."""
    parser.add_argument("--out", default="owl2-demo", help="folder for the data, runs and summary.json")
    parser.add_argument("--quick", action="store_true", help="a few steps only (checks the plumbing, learns little)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="experiment overrides")


def run_demo_command(args: argparse.Namespace) -> int:
    from owl2.demo import run_demo

    run_demo(args.out, quick=args.quick, overrides=list(args.overrides))
    return 0


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``owl2 sweep``, shared with ``ray_jobs/sweep.py``."""
    parser.add_argument("--config", required=True, help="sweep YAML, e.g. experiments/sweeps/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="sweep overrides, e.g. num_samples=8")


def run_sweep_command(args: argparse.Namespace) -> int:
    from owl2.tune.sweep import load_sweep, run_sweep

    sweep, base = load_sweep(args.config, list(args.overrides))
    summaries = run_sweep(sweep, base)
    return 0 if any(summary.status != "ERROR" for summary in summaries) else 1


def add_ablate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``owl2 ablate``, shared with ``ray_jobs/ablate.py``."""
    parser.add_argument("--config", required=True, help="ablation YAML, e.g. experiments/ablations/vision_lr.yaml")
    parser.add_argument(
        "--quick", action="store_true", help="the ablation's quick version (its quick section: fewer steps and seeds)"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="ablation overrides, e.g. seeds=[0,1,2,3]")


def run_ablate_command(args: argparse.Namespace) -> int:
    """Exit status 1 when a trial failed (the report then counts the trials that finished)."""
    from owl2.ablate.run import load_ablation, run_ablation

    ablation, base = load_ablation(args.config, list(args.overrides), quick=args.quick)
    outcome = run_ablation(ablation, base)
    for trial in outcome.report.failed:
        print(f"owl2: trial {trial.arm} seed {trial.seed} failed; the report leaves it out", file=sys.stderr)
    return RUN_FAILED if outcome.report.failed else 0


DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _dtype(name: str | None) -> Any:
    import torch

    return getattr(torch, DTYPES[name]) if name else None


# The tokenizer travels with the weights, so that a converted folder is a checkpoint on its own.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def _model_convert(args: argparse.Namespace) -> int:
    import shutil

    from owl2.folders import replacing
    from owl2.model.owl2 import Owl2ForCausalLM

    model = Owl2ForCausalLM.from_pretrained(args.source, dtype=_dtype(args.dtype))
    source = Path(args.source)
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    with replacing(args.out) as staging:  # an existing --out is replaced whole, never left half-written
        model.save_pretrained(staging)
        for name in copied:
            shutil.copy2(source / name, staging / name)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters, {model.dtype})")
    if "tokenizer.model" not in copied:
        print(f"note: {source} has no tokenizer.model; pass --tokenizer when you use {args.out}")
    return 0


def _model_build(args: argparse.Namespace) -> int:
    from owl2.folders import replacing
    from owl2.model.build import build_from_llama_and_clip

    if args.overrides and not args.preset:
        raise ConfigError("overrides need --preset (without it the architecture comes from the checkpoints)")
    spec = ModelConfig.from_preset(args.preset, list(args.overrides)) if args.preset else None
    model = build_from_llama_and_clip(
        args.llama, args.clip, spec=spec, image_size=args.image_size, dtype=_dtype(args.dtype)
    )
    with replacing(args.out) as staging:
        model.save_pretrained(staging)
    new = len(model.load_report.missing)
    print(f"wrote {args.out}: decoder from {args.llama}, vision from {args.clip}, {new} new abstractor tensors")
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    import time

    from owl2.data.world import generate_world

    start = time.perf_counter()
    try:
        world = generate_world(args.out, args.seed, args.train, args.heldout, args.image_size)
    except FileExistsError as error:
        raise ConfigError(f"--out: {error}") from error
    counts = world["counts"]
    print(
        f"wrote {args.out}: {counts['train']['images']} train + {counts['heldout']['images']} held-out images, "
        f"{counts['train']['llava_records']} + {counts['heldout']['llava_records']} LLaVA records, "
        f"tokenizer of {world['tokenizer']['vocab_size']} pieces (seed {world['seed']}, "
        f"{time.perf_counter() - start:.1f} s)"
    )
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    import json

    from owl2.data.preflight import first_problem
    from owl2.data.stats import dataset_stats
    from owl2.runtime import ensure_ray

    if args.micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size must be positive, got {args.micro_batch_size}")
    source = {"format": args.format, "path": args.path[0] if len(args.path) == 1 else args.path}
    if args.image_root:
        source["image_root"] = args.image_root
    config = build(
        DataConfig,
        {
            "sources": [source],
            "tokenizer": args.tokenizer,
            "template": args.template,
            "max_length": args.max_length,
            "image_size": args.image_size,
            "resize": args.resize,
        },
        "data",
    )
    problem = first_problem(config)
    if problem is not None:
        key, message = problem
        option = {"tokenizer": "--tokenizer"}.get(key, "--image-root" if key.endswith("image_root") else "--path")
        raise ConfigError(f"{option} {message}")
    tokens_per_image = ModelConfig.from_preset(args.preset).tokens_per_image
    ensure_ray()
    print(json.dumps(dataset_stats(config, tokens_per_image, args.micro_batch_size), indent=2))
    return 0


def _model_summary(args: argparse.Namespace) -> int:
    from owl2.tracking import flatten

    spec = ModelConfig.from_preset(args.preset, list(args.overrides))
    counts = parameter_counts(spec)

    print(f"model preset {args.preset}" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
    config = {**flatten(to_dict(spec)), "tokens_per_image": spec.tokens_per_image}
    if spec.projector != "abstractor":  # the abstractor section is then unused: listing it would mislead
        config = {key: value for key, value in config.items() if not key.startswith("abstractor.")}
    _print_table("config", config)
    _print_table("parameters", {name: f"{count:,}" for name, count in counts.items()})
    return 0


def parameter_counts(spec: ModelConfig) -> dict[str, int]:
    """Parameters per top-level module of ``Owl2ForCausalLM`` plus ``total``, counted without allocating memory."""
    import torch

    from owl2.model.owl2 import Owl2Config, Owl2ForCausalLM

    # The meta device records shapes only, so even the 8B model builds instantly.
    with torch.device("meta"):
        model = Owl2ForCausalLM(Owl2Config.from_spec(spec))
    counts = {
        name: sum(p.numel() for p in getattr(model, name).parameters())
        for name in ("vision", "abstractor", "decoder", "lm_head")
    }
    total = sum(p.numel() for p in model.parameters())
    if total != sum(counts.values()):  # parameters held directly by the top-level model
        counts["other"] = total - sum(counts.values())
    counts["total"] = total
    return counts


def _print_table(title: str, values: dict[str, Any]) -> None:
    rows = [{"name": name, "value": value} for name, value in values.items()]
    columns = [Column("name", align="<"), Column("value", width=15)]
    print(format_table(rows, columns, title=f"\n{title}", header=False, indent="  "))


# --------------------------------------------------------------------------------------------------
# Evaluation and inference: owl2 eval / generate / chat
# --------------------------------------------------------------------------------------------------


def add_eval_commands(commands: Any) -> None:
    """Register ``eval``, ``generate`` and ``chat`` on the ``owl2`` subcommand parser."""

    def checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--checkpoint", required=True, help="released mPLUG-Owl2 folder or owl2 checkpoint")
        parser.add_argument(
            "--tokenizer", help="folder with tokenizer.model (default: the checkpoint's, or its experiment's)"
        )
        parser.add_argument(
            "--template",
            choices=TEMPLATE_NAMES,
            help="chat template (default: the checkpoint's training template, mplug_owl2 for released models)",
        )

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on a benchmark suite, tracked in MLflow")
    checkpoint_arguments(evaluate)
    evaluate.add_argument("--suite", required=True, choices=EVAL_SUITES)
    evaluate.add_argument("--data", help="benchmark file or folder (shapes: the world folder, default: the model's)")
    evaluate.add_argument("--image-root", help="folder relative image paths are under (default: beside --data)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="items per generate() call (default %(default)s)")
    evaluate.add_argument("--limit", type=int, help="evaluate the first N items (of each split for shapes)")
    evaluate.add_argument(
        "--num-actors", type=int, default=1, help="Ray actors holding a model each (default %(default)s)"
    )
    evaluate.add_argument("--gpu", action="store_true", help="one GPU per actor")
    evaluate.add_argument("--output", help="predictions JSONL to write (default: a temporary file, logged to MLflow)")
    evaluate.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow eval run")
    evaluate.set_defaults(handler=_run_eval)

    generate = commands.add_parser("generate", help="answer one prompt (with an image) and print the answer")
    checkpoint_arguments(generate)
    generate.add_argument("--prompt", required=True, help="the question; <|image|> marks where the image goes")
    generate.add_argument("--image", action="append", default=[], help="image file or URI (repeatable)")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="default %(default)s")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when --temperature > 0")
    generate.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    generate.set_defaults(handler=_run_generate)

    chat = commands.add_parser("chat", help="interactive multi-turn chat; /image PATH, /reset, /quit")
    checkpoint_arguments(chat)
    chat.add_argument("--max-new-tokens", type=int, default=512, help="per reply (default %(default)s)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy decoding")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when --temperature > 0")
    chat.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    chat.set_defaults(handler=_run_chat)


def _run_eval(args: argparse.Namespace) -> int:
    from owl2.eval.runner import run_eval
    from owl2.eval.suite import Suite

    result = run_eval(
        args.checkpoint,
        args.suite,
        args.data,
        tokenizer=args.tokenizer,
        template=args.template,
        image_root=args.image_root,
        batch_size=args.batch_size,
        limit=args.limit,
        num_actors=args.num_actors,
        use_gpu=args.gpu,
        output=args.output,
        track=not args.no_mlflow,
    )
    if result.rows:
        print(Suite.table(result.rows, f"{args.suite}: {args.checkpoint}"))
    for note in result.notes:
        print(note)
    print(f"predictions: {result.predictions}" + (f"\nMLflow run: {result.run_id}" if result.run_id else ""))
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from owl2.config import IMAGE_PLACEHOLDER
    from owl2.data.images import BadImage, read_bytes
    from owl2.eval.benchmarks import EvalItem
    from owl2.eval.generate import generate_batch, load_model, model_source

    prompt = args.prompt
    if IMAGE_PLACEHOLDER not in prompt:
        prompt = IMAGE_PLACEHOLDER * len(args.image) + prompt  # images first, as the official CLI asks
    try:
        images = [read_bytes(path) for path in args.image]
        item = EvalItem("prompt", "chat", [{"role": "user", "content": prompt}], images)
    except (BadImage, ValueError) as error:
        raise ConfigError(f"--prompt/--image: {error}") from error
    source = model_source(args.checkpoint, args.tokenizer, args.template)
    model, tokenizer = load_model(source, device=args.device)
    (answer,) = generate_batch(
        model,
        tokenizer,
        [item],
        args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature or 1.0,
        top_p=args.top_p,
        resize=source.resize,
        template=source.template,
        image_token_at_front=source.image_token_at_front,
    )
    print(answer)
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    from owl2.eval.chat import run_chat
    from owl2.eval.generate import model_source

    source = model_source(args.checkpoint, args.tokenizer, args.template)
    run_chat(
        source, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, device=args.device
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
