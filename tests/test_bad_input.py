"""Bad command lines and configs: each gives exit status 2 and one line naming the key, file or option, without a
traceback and before Ray starts (the table below runs every command in-process with Ray made to fail loudly)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from owl2.cli import main

REPO = Path(__file__).resolve().parents[1]
PIPELINE = str(REPO / "experiments" / "tiny_cpu" / "pipeline.yaml")
SWEEP = str(REPO / "experiments" / "sweeps" / "tiny_cpu.yaml")
ABLATION = str(REPO / "experiments" / "ablations" / "vision_lr.yaml")


def _bad_files(root: Path) -> Path:
    """Broken config files and folders the table points at."""
    (root / "syntax.yaml").write_text("name: x\nstages:\n  stage1: {max_steps: 2\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "stage_file.yaml").write_text("name: x\nstages:\n  stage1: missing_stage.yaml\n")
    (root / "sweep_field.yaml").write_text("base: x.yaml\n")
    (root / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (root / "empty.json").write_text("[]")
    (root / "not_a_checkpoint").mkdir()
    return root


# (command line, a fragment the one error line must contain); {bad} is a folder of broken files.
CASES = [
    # owl2 train: files
    (["train", "--config", "{bad}/syntax.yaml"], "syntax.yaml: invalid YAML at line 4, column 1"),
    (["train", "--config", "{bad}/list.yaml"], "must hold a mapping at the top level"),
    (["train", "--config", "{bad}/nothere.yaml"], "config file {bad}/nothere.yaml does not exist"),
    (["train", "--config", "{bad}/stage_file.yaml"], "missing_stage.yaml does not exist"),
    (["train", "--config", "{bad}/latin1.yaml"], "latin1.yaml: not UTF-8 text"),
    # owl2 train: overrides
    (["train", "--config", PIPELINE, "stages.stag1.optim.lr=1e-3"], "unknown stage 'stag1' in the overrides"),
    (["train", "--config", PIPELINE, "stages.stage1.global_batch_size=0"], "stages.stage1.global_batch_size"),
    (["train", "--config", PIPELINE, "stages.stage1.optim.lr=-1"], "stages.stage1.optim.lr must be positive"),
    (["train", "--config", PIPELINE, "stages.stage1.optim.lr=abc"], "stages.stage1.optim.lr must be float"),
    (["train", "--config", PIPELINE, "stages.stage1.optim.warmup_steps=100000"], "stages.stage1.optim.warmup_steps"),
    (["train", "--config", PIPELINE, "stages.stage1.micro_batch_size=3"], "stages.stage1.global_batch_size (16)"),
    (["train", "--config", PIPELINE, "stages.stage1.strategy=zero3"], "stages.stage1.strategy 'zero3'"),
    (["train", "--config", PIPELINE, "stages.stage1.trainable=[wings]"], "stages.stage1.trainable"),
    (["train", "--config", PIPELINE, "stages.stage1.data.sources.0.format=coco"], "sources[0].format 'coco'"),
    (["train", "--config", PIPELINE, "stages.stage1.data.sources.5.path=x"], "sources has 1 item(s)"),
    (["train", "--config", PIPELINE, "stages.stage1.image_size=100"], "stages.stage1.image_size (100)"),
    (["train", "--config", PIPELINE, "stages.stage1.unknown_key=1"], "stages.stage1.unknown_key"),
    (["train", "--config", PIPELINE, "model.preset=huge"], "model.preset 'huge'"),
    (["train", "--config", PIPELINE, "resources.num_workers=0"], "resources.num_workers"),
    (["train", "--config", PIPELINE, "resources.gpu=tpu"], "resources.gpu 'tpu'"),
    (["train", "--config", PIPELINE, "max_failures=-1"], "max_failures must be >= 0"),
    (["train", "--config", PIPELINE, "tracking.system_metrics_s=-1"], "tracking.system_metrics_s must be >= 0"),
    (["train", "--config", PIPELINE, "noequals"], "override 'noequals'"),
    (["train", "--config", PIPELINE, "stages..lr=1"], "empty key part"),
    (["train", "--config", PIPELINE, "stages.stage1.optim.lr=[1,"], "the value is invalid YAML"),
    (["train", "--config", PIPELINE, "--stage", "stage9"], "unknown stage(s) ['stage9']"),
    # owl2 train: paths checked on the driver
    (["train", "--config", PIPELINE, "stages.stage1.data.sources.0.path=/nope.jsonl"], "sources[0].path /nope.jsonl"),
    (["train", "--config", PIPELINE, "stages.stage1.data.sources.0.image_root=/nope"], "sources[0].image_root /nope"),
    (["train", "--config", PIPELINE, "stages.stage1.data.tokenizer=/nope"], "stages.stage1.data.tokenizer /nope"),
    (["train", "--config", PIPELINE, "stages.stage2.init_from=/nope"], "stages.stage2.init_from /nope"),
    (["train", "--config", PIPELINE, "--traim"], "unrecognized arguments: --traim"),
    # owl2 sweep
    (["sweep", "--config", "{bad}/nothere.yaml"], "nothere.yaml does not exist"),
    (["sweep", "--config", "{bad}/sweep_field.yaml"], "unknown field(s) ['sweep.base']"),
    (["sweep", "--config", SWEEP, "metric=accuracy"], "sweep metric 'accuracy'"),
    (["sweep", "--config", SWEEP, "mode=up"], "sweep mode 'up'"),
    (["sweep", "--config", SWEEP, "num_samples=0"], "sweep num_samples"),
    # owl2 ablate
    (["ablate", "--config", "{bad}/nothere.yaml"], "nothere.yaml does not exist"),
    (["ablate", "--config", "{bad}/sweep_field.yaml"], "unknown field(s) ['ablation.base']"),
    (["ablate", "--config", ABLATION, "baseline=nope"], "baseline 'nope' is not one of the arms"),
    (["ablate", "--config", ABLATION, "seeds=[0]"], "seeds must name at least two seeds"),
    (["ablate", "--config", ABLATION, "--quick", "quick.seeds=[3]"], "quick.seeds must name at least two seeds"),
    (["ablate", "--config", ABLATION, "arms.frozen=[stages.stage2.optim.lrr=1]"], "arms.frozen does not fit"),
    (["ablate", "--config", ABLATION, "metrics.accuracy=max"], "metrics.accuracy is not reported by training"),
    (["ablate", "--config", ABLATION, "metrics.val_loss=up"], "metrics.val_loss 'up' must be one of"),
    # owl2 ablate: the data of every arm is checked on the driver, before Ray
    (["ablate", "--config", ABLATION, "arms.frozen=[stages.stage2.data.tokenizer=/nope]"], "data.tokenizer /nope"),
    # owl2 demo
    (["demo", "stages.stage1.max_steps=0"], "stages.stage1.max_steps must be positive"),
    (["demo", "--out", "/proc/owl2-demo"], "--out /proc/owl2-demo: cannot create it"),
    # owl2 eval / generate
    (["eval", "--checkpoint", "/nope", "--suite", "shapes"], "/nope is not a checkpoint folder"),
    (["eval", "--checkpoint", "{bad}/not_a_checkpoint", "--suite", "vqa"], "not_a_checkpoint is not a checkpoint"),
    (["eval", "--checkpoint", "/nope", "--suite", "coco"], "argument --suite: invalid choice: 'coco'"),
    (["generate", "--checkpoint", "/nope", "--prompt", "hi"], "/nope is not a checkpoint folder"),
    (["generate", "--checkpoint", "/nope"], "the following arguments are required: --prompt"),
    # owl2 data stats
    (["data", "stats", "--format", "llava", "--path", "/nope.json", "--tokenizer", "{bad}"], "--path /nope.json"),
    (["data", "stats", "--format", "llava", "--path", "{bad}/empty.json", "--tokenizer", "{bad}"], "--tokenizer"),
    (
        [
            "data",
            "stats",
            "--format",
            "llava",
            "--path",
            "{bad}/empty.json",
            "--tokenizer",
            "{bad}",
            "--image-root",
            "/no",
        ],
        "--image-root /no does not exist",
    ),
    (["data", "stats", "--format", "coco", "--path", "x", "--tokenizer", "y"], "argument --format: invalid choice"),
    # owl2 plan
    (["plan", "--config", PIPELINE, "--gpu", "tpu-v9"], "unknown GPU 'tpu-v9'"),
    (["plan", "--config", PIPELINE, "--gpu-memory-gb", "-3"], "--gpu-memory-gb must be positive"),
    (["plan", "--config", PIPELINE, "--text-tokens", "-5"], "--text-tokens must be >= 0"),
    (["plan", "--config", "{bad}/syntax.yaml"], "invalid YAML"),
    # owl2 model / data synth
    (["model", "summary", "--preset", "huge"], "unknown model preset 'huge'"),
    (["model", "convert", "/nope", "--out", "{bad}/converted"], "/nope has no config.json"),
    (["data", "synth", "--out", "{bad}/world", "--train", "0"], "need at least one train"),
]


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any start of (or connection to) Ray fail the test: these errors must be found before it."""
    import ray

    import owl2.runtime

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started for a command line that is bad before Ray is needed")

    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr(owl2.runtime, "ensure_ray", started)


@pytest.mark.parametrize(("argv", "fragment"), CASES, ids=[" ".join(c[0])[-60:] for c in CASES])
def test_bad_input_is_one_line_with_exit_status_2(
    argv: list[str],
    fragment: str,
    no_ray: None,
    pipeline_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = str(_bad_files(tmp_path))
    monkeypatch.chdir(pipeline_dir)  # the shipped YAMLs name data/shapes_world relative to the working directory
    try:
        status = main([arg.replace("{bad}", bad) for arg in argv])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2, lines
    assert len(lines) == 1, lines
    assert "error: " in lines[0] and "Traceback" not in lines[0]
    assert fragment.replace("{bad}", bad) in lines[0]


@pytest.mark.parametrize(
    ("script", "args", "fragment"),
    [
        ("train.py", ["--config", "/nope.yaml"], "config file /nope.yaml does not exist"),
        ("sweep.py", ["--config", SWEEP, "mode=up"], "sweep mode 'up'"),
        ("ablate.py", ["--config", ABLATION, "seeds=[1]"], "seeds must name at least two seeds"),
        ("demo.py", ["stages.stage1.max_steps=0"], "stages.stage1.max_steps"),
    ],
)
def test_ray_job_scripts_report_bad_input_in_one_line(script: str, args: list[str], fragment: str) -> None:
    """The ``ray job submit`` entrypoints, as the job runs them: a separate Python process."""
    process = subprocess.run(
        [sys.executable, str(REPO / "ray_jobs" / script), *args], capture_output=True, text=True, timeout=120
    )
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert process.returncode == 2, process.stderr
    assert len(lines) == 1 and fragment in lines[0], lines
