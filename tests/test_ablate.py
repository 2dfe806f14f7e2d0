"""Ablations: the statistics and the report on hand-checked numbers, the config's validation before Ray, and one
2-arm x 2-seed ablation end to end on local Ray (shared stage 1 per seed, report, MLflow), two trials at a time
beside a process that burns CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml

from owl2.ablate.report import ArmCost, TrialResult, build_report, headline_metrics, to_markdown, write_report
from owl2.ablate.run import arm_cost, load_ablation, run_ablation, seeded
from owl2.ablate.stats import NO_DIFFERENCE, NO_SPREAD, TOO_FEW, paired_difference, summarise, verdict
from owl2.config import ConfigError, ModelConfig
from owl2.plan.flops import FlopModel
from owl2.tune.sweep import split_stages

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PIPELINE = EXPERIMENTS / "tiny_cpu" / "pipeline.yaml"
# Student's t quantiles for a two-sided 95% interval (tables): 1, 2 and 3 degrees of freedom.
T_975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305}

# ------------------------------------------------------------------------------------------ statistics


def test_summary_is_mean_sample_std_and_t_interval() -> None:
    summary = summarise([1.0, 2.0, 3.0, 4.0])
    std = math.sqrt(5 / 3)  # squared deviations 2.25 + 0.25 + 0.25 + 2.25 over n - 1 = 3
    half = T_975[3] * std / 2
    assert (summary.n, summary.mean) == (4, 2.5)
    assert summary.std == pytest.approx(std, rel=1e-12)
    assert (summary.low, summary.high) == (pytest.approx(2.5 - half, rel=1e-8), pytest.approx(2.5 + half, rel=1e-8))
    two = summarise([0.0, 1.0])
    assert two.half_width == pytest.approx(T_975[1] * math.sqrt(0.5) / math.sqrt(2), rel=1e-8)
    wider = summarise([1.0, 2.0, 3.0, 4.0], confidence=0.99)
    assert wider.low < summary.low and wider.high > summary.high
    one = summarise([7.0])
    assert (one.n, one.mean, one.std, one.low, one.high) == (1, 7.0, None, None, None)
    assert summarise([]) is None


def test_paired_difference_uses_common_seeds_and_the_wording_follows_the_interval() -> None:
    baseline = {0: 0.70, 1: 0.71, 2: 0.75}
    arm = {0: 0.80, 1: 0.82, 2: 0.84, 3: 0.99}  # seed 3 has no baseline run: not a pair
    difference = paired_difference(arm, baseline)
    half = T_975[2] * 0.01 / math.sqrt(3)  # differences 0.10, 0.11, 0.09: mean 0.10, std 0.01
    assert difference.n == 3 and difference.mean == pytest.approx(0.10)
    assert difference.low == pytest.approx(0.10 - half) and difference.high == pytest.approx(0.10 + half)
    assert verdict(difference, "max") == "higher than the baseline (better)"
    assert verdict(difference, "min") == "higher than the baseline (worse)"
    lower = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 3.1, 2: 3.9})
    assert verdict(lower, "min") == "lower than the baseline (better)"
    # The unpaired means differ by 0.1, but the seeds disagree on the sign: nothing detectable.
    mixed = paired_difference({0: 0.80, 1: 0.70}, {0: 0.60, 1: 0.70 + 0.1})
    assert mixed.low < 0 < mixed.high and verdict(mixed, "max") == NO_DIFFERENCE
    assert verdict(paired_difference({0: 0.9}, {0: 0.1}), "max") == TOO_FEW  # one pair: no interval
    assert verdict(None, "max") == TOO_FEW
    # Two seeds, each 12 of 300 questions better: a zero-width interval, not a detected difference.
    assert verdict(paired_difference({0: 0.55, 1: 0.59}, {0: 0.51, 1: 0.55}), "max") == NO_SPREAD


# ------------------------------------------------------------------------------------------ report


def _report(costs: dict[str, ArmCost] | None = None):
    trials = [
        TrialResult("base", seed, {"acc": acc, "val_loss": loss}, wall_s=100.0 + seed)
        for seed, acc, loss in [(0, 0.70, 1.5), (1, 0.71, 1.4), (2, 0.75, 1.3)]
    ]
    trials += [
        TrialResult("small", seed, {"acc": acc, "val_loss": loss}, wall_s=50.0 + seed)
        for seed, acc, loss in [(0, 0.80, 1.6), (1, 0.82, 1.3)]
    ]
    trials.append(TrialResult("small", 2, {}, wall_s=3.0, error="Traceback ...\nRuntimeError: worker died"))
    return build_report(
        name="demo",
        experiment="../tiny_cpu/pipeline.yaml",
        arms={"base": [], "small": ["stages.stage2.optim.lr=1e-3"]},
        baseline="base",
        directions={"acc": "max", "val_loss": "min"},
        seeds=[0, 1, 2],
        trials=trials,
        costs=costs,
        shared_stages=["stage1"],
        shared_wall_s=[30.0, 32.0],
    )


def test_report_tables_numbers_and_headline_metrics() -> None:
    costs = {"base": ArmCost(17, 100.0, 2.0e9), "small": ArmCost(65, 100.0, 5.0e9)}
    report = _report(costs)
    base, small = report.arms["base"], report.arms["small"]
    assert base.metrics["acc"].n == 3 and small.metrics["acc"].n == 2  # the failed trial is left out
    assert small.metrics["acc"].mean == pytest.approx(0.81)
    assert small.differences["acc"].n == 2 and small.differences["acc"].mean == pytest.approx(0.105)
    assert small.verdicts["acc"] == "higher than the baseline (better)"  # 0.10 and 0.11: a tight interval
    assert small.verdicts["val_loss"] == NO_DIFFERENCE  # +0.1 and -0.1
    assert small.wall.n == 2 and small.wall.mean == pytest.approx(50.5)  # the failed trial's time is not a trial's
    assert [(t.arm, t.seed) for t in report.failed] == [("small", 2)]
    assert report.shared_wall.mean == pytest.approx(31.0)

    text = to_markdown(report)
    assert "# Ablation demo" in text and "`stages.stage2.optim.lr=1e-3`" in text
    assert "ran once per seed" in text and "## acc (higher is better)" in text and "## val_loss (lower is" in text
    assert NO_DIFFERENCE in text and "RuntimeError: worker died" in text
    acc_rows = text.split("## acc")[1].split("```")[1].strip().splitlines()
    assert acc_rows[1].split() == ["base", "(baseline)", "3", "0.72", "0.02646", "[0.6543,", "0.7857]"]
    # 0.105 +- 12.7062 * 0.00707 / sqrt(2)
    assert acc_rows[2].split()[:8] == ["small", "2", "0.81", "0.01414", "[0.6829,", "0.9371]", "+0.105", "[+0.04147,"]
    cost_rows = text.split("## Cost")[1].split("```")[1].strip().splitlines()
    assert cost_rows[1].split() == ["base", "17", "117.0", "2", "101.0", "[98.5,", "103.5]"]  # 2 GFLOPs

    metrics = headline_metrics(report)
    assert metrics["arm.base.acc.mean"] == pytest.approx(0.72)
    assert metrics["arm.base.acc.n"] == 3 and metrics["arm.small.acc.n"] == 2
    assert metrics["arm.small.acc.diff"] == pytest.approx(0.105)
    assert metrics["arm.small.acc.diff_low"] == pytest.approx(0.105 - T_975[1] * math.sqrt(0.00005) / math.sqrt(2))
    assert metrics["arm.small.decoder_flops_per_sample"] == 5.0e9
    assert metrics["arm.small.decoder_tokens_per_sample"] == 165.0
    assert metrics["arm.base.wall_s"] == pytest.approx(101.0)
    assert "arm.base.acc.diff" not in metrics  # the baseline has no difference to itself


def test_report_files_are_written_with_nonempty_plots(tmp_path: Path) -> None:
    report = _report({"base": ArmCost(17, 100.0, 2.0e9), "small": ArmCost(65, None, None)})
    written = write_report(report, tmp_path / "report")
    names = sorted(path.name for path in written)
    assert names == ["headline_vs_flops.png", "metric_acc.png", "metric_val_loss.png", "report.md", "results.json"]
    for path in written:
        assert path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![acc](metric_acc.png)" in (tmp_path / "report" / "report.md").read_text()
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["arms"]["small"]["differences"]["acc"]["n"] == 2
    # Without any FLOP count there is nothing to plot against.
    assert "headline_vs_flops.png" not in {path.name for path in write_report(_report(), tmp_path / "bare")}


def test_plotting_leaves_matplotlib_state_alone(tmp_path: Path) -> None:
    """The plots draw on Agg figures without pyplot: the process's backend choice is untouched."""
    script = textwrap.dedent(
        f"""
        import sys
        import matplotlib
        before = matplotlib.rcParams._get("backend")
        from owl2.ablate.report import ArmCost, TrialResult, build_report, write_report
        trials = [TrialResult(arm, seed, {{"acc": 0.5 + seed / 10}}) for arm in ("a", "b") for seed in (0, 1)]
        report = build_report(
            name="x", experiment="x.yaml", arms={{"a": [], "b": []}}, baseline="a", directions={{"acc": "max"}},
            seeds=[0, 1], trials=trials, costs={{"a": ArmCost(17, 1.0, 1e9), "b": ArmCost(65, 1.0, 2e9)}},
        )
        write_report(report, {str(tmp_path)!r})
        assert "matplotlib.pyplot" not in sys.modules
        assert matplotlib.rcParams._get("backend") == before
        print("untouched")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "untouched" in result.stdout


# ------------------------------------------------------------------------------------------ config


def _write(path: Path, **changes) -> Path:
    ablation = {
        "name": "lr",
        "experiment": str(PIPELINE),
        "overrides": ["resources.num_workers=1"],
        "arms": {"low": [], "high": ["stages.stage2.optim.lr=1e-3"]},
        "baseline": "low",
        "seeds": [0, 1],
        "metrics": {"val_loss": "min"},
        **changes,
    }
    path.write_text(yaml.safe_dump(ablation, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"baseline": "mid"}, "baseline 'mid' is not one of the arms ['low', 'high']"),
        ({"seeds": [3]}, "seeds must name at least two seeds"),
        ({"seeds": [3, 3]}, "seeds has a repeated seed"),
        ({"quick": {"seeds": [1]}}, "quick.seeds must name at least two seeds"),
        ({"arms": {"low": []}}, "arms must name at least two arms"),
        ({"arms": {"low": [], "a.b": []}, "baseline": "low"}, "arms.a.b: an arm name may hold only"),
        ({"arms": {"low": [], "high": ["stages.stage2.optim.lrr=1"]}}, "arms.high does not fit the experiment"),
        ({"arms": {"low": [], "high": ["stages.stage9.max_steps=1"]}}, "arms.high: unknown stage 'stage9'"),
        ({"arms": {"low": [], "high": ["seed=3"]}}, "arms.high sets seed, which the ablation's seeds set"),
        ({"arms": {"low": [], "high": ["stages.stage1.data.seed=3"]}}, "arms.high sets stages.stage1.data.seed"),
        ({"arms": {"low": [], "high": ["noequals"]}}, "arms.high: override 'noequals'"),
        ({"metrics": {"accuracy": "max"}}, "metrics.accuracy is not reported by training"),
        ({"metrics": {"val_loss": "down"}}, "metrics.val_loss 'down' must be one of ['max', 'min']"),
        ({"metrics": {"eval/vqa/accuracy": "max"}}, "needs the 'vqa' eval suite in stages.stage2.eval"),
        ({"overrides": ["stages.stage2.validation=null"]}, "metrics.val_loss needs stages.stage2.validation"),
        ({"base": "x.yaml"}, "unknown field(s) ['ablation.base']"),
    ],
)
def test_bad_ablations_are_named_before_ray(tmp_path: Path, changes: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_ablation(_write(tmp_path / "ablation.yaml", **changes))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_quick_version_and_seeds(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "ablation.yaml",
        seeds=[0, 1, 2],
        quick={"overrides": ["stages.stage2.max_steps=50"], "seeds": [4, 5]},
    )
    ablation, base = load_ablation(path)
    quick, quick_base = load_ablation(path, quick=True)
    assert (ablation.name, ablation.seeds, base.stages["stage2"].max_steps) == ("lr", [0, 1, 2], 1200)
    assert (quick.name, quick.seeds, quick_base.stages["stage2"].max_steps) == ("lr-quick", [4, 5], 50)
    assert quick_base.resources.num_workers == 1  # the ablation's own overrides still apply

    run = seeded(base, ["stages.stage2.optim.lr=1e-3"], 7)
    assert run.seed == 7 and {stage.data.seed for stage in run.stages.values()} == {7}
    assert run.stages["stage2"].validation.data.seed == 0  # the same held-out batches for every seed
    assert run.stages["stage2"].optim.lr == 1e-3 and base.seed == 0 and base.stages["stage2"].optim.lr == 5e-4


def test_stage_one_is_shared_only_when_every_arm_changes_later_stages_only() -> None:
    ablation, base = load_ablation(EXPERIMENTS / "ablations" / "vision_lr.yaml")
    keys = [key for overrides in ablation.arms.values() for key in _keys(overrides)]
    assert split_stages(keys, base) == (["stage1"], ["stage2"])
    assert split_stages([*keys, "model.overrides.abstractor.num_queries"], base) == ([], ["stage1", "stage2"])
    assert split_stages([*keys, "stages.stage1.optim.lr"], base) == ([], ["stage1", "stage2"])


def _keys(overrides: list[str]) -> list[str]:
    from owl2.ablate.run import arm_keys

    return arm_keys(overrides)


def test_arm_cost_from_the_training_reports() -> None:
    import pandas as pd

    _, base = load_ablation(EXPERIMENTS / "ablations" / "vision_lr.yaml")
    spec = ModelConfig.from_preset(base.model.preset, base.model.overrides)
    per_image = spec.tokens_per_image
    # Two windows of stage 2 (index 1): 100 and 120 text tokens per sample, one image each; a stage-1 row and a
    # validation-only row (no window metrics) do not count.
    history = pd.DataFrame(
        {
            "stage_index": [0, 1, 1, 1],
            "samples_per_s": [10.0, 10.0, 5.0, None],
            "images_per_s": [10.0, 10.0, 5.0, None],
            "tokens_per_s": [10.0 * (30 + per_image), 10.0 * (100 + per_image), 5.0 * (120 + per_image), None],
        }
    )
    cost = arm_cost(base, [history])
    assert cost.image_tokens == per_image and cost.text_tokens == pytest.approx(110.0)
    assert cost.decoder_tokens == pytest.approx(110.0 + per_image)
    assert cost.decoder_flops == FlopModel(spec, (), base.stages["stage2"].image_size).decoder(110, 1).model
    assert arm_cost(base, []) == ArmCost(per_image, None, None)


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture
def world(pipeline_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(pipeline_dir)  # the tiny-cpu YAMLs name data/shapes_world relative to the working directory
    return pipeline_dir


@pytest.fixture
def cpu_burner() -> Iterator[subprocess.Popen]:
    """Another program keeping a CPU busy for the whole test, outside Ray, as a background job: at nice 19, so it
    takes every cycle the test leaves idle and a share of the rest (Ray's workers run at nice 15, its driver and
    services at 0). At full priority it made the test take 333 s instead of 150 s, at nice 10 224 s."""
    burner = subprocess.Popen([sys.executable, "-c", "import os\nos.nice(19)\nwhile True: pass"])
    yield burner
    burner.kill()
    burner.wait()


@pytest.mark.slow
def test_two_arms_two_seeds_share_stage_one_per_seed_and_report_beside_other_cpu_work(
    ray_cluster, world: Path, tmp_path: Path, cpu_burner: subprocess.Popen
) -> None:
    # Two trials at once on the 2-CPU cluster, each a Train run with its own reservation and its own Ray Data
    # tasks, while another program burns CPU: the shape of a sweep that once waited forever. Ray schedules logical
    # CPUs, so the burner only changes the timing; a reservation that starved its own trials' data tasks would
    # hang the test, and the stall watchdog and pytest-timeout would say so.
    steps = [
        f"stages.{stage}.{key}"
        for stage, n in (("stage1", 1), ("stage2", 2))
        for key in (f"max_steps={n}", f"checkpoint_every={n}", f"log_every={n}", "optim.warmup_steps=0")
    ]
    path = _write(
        tmp_path / "ablation.yaml",
        name="e2e",
        overrides=[
            "resources.num_workers=1",
            *steps,
            "stages.stage1.validation=null",
            "stages.stage2.validation.every=2",
            "stages.stage2.validation.max_batches=1",
            "stages.stage2.eval={suite: shapes, limit: 2, batch_size: 6}",
        ],
        arms={"base": [], "fast": ["stages.stage2.optim.lr=3e-3"]},
        baseline="base",
        metrics={"eval/shapes/vqa/accuracy": "max", "val_loss": "min"},
        max_concurrent_trials=2,
        storage_path=str(world / "runs"),
        tracking={"experiment": "owl2-ablations"},
    )
    ablation, base = load_ablation(path)
    outcome = run_ablation(ablation, base)
    report = outcome.report

    assert cpu_burner.poll() is None  # the other work ran beside the whole ablation
    assert not report.failed and report.shared_stages == ["stage1"]
    for arm in report.arms.values():
        assert set(arm.values["val_loss"]) == {0, 1} and arm.metrics["eval/shapes/vqa/accuracy"].n == 2
        assert arm.wall.n == 2 and arm.wall.mean > 0
        assert arm.cost.text_tokens > 0 and arm.cost.decoder_flops > 0
    assert report.arms["fast"].differences["val_loss"].n == 2
    # Both arms have one architecture: the same decoder cost per image; the measured text tokens may differ.
    assert report.arms["fast"].cost.image_tokens == report.arms["base"].cost.image_tokens == 17

    files = {path.name for path in outcome.folder.iterdir()}
    plots = {"metric_eval_shapes_vqa_accuracy.png", "metric_val_loss.png", "headline_vs_flops.png"}
    assert {"report.md", "results.json"} | plots <= files
    assert all((outcome.folder / name).stat().st_size > 1000 for name in plots)
    assert outcome.folder == world / "runs" / "e2e" / "report"

    client = mlflow.MlflowClient(f"sqlite:///{world / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("owl2-ablations").experiment_id])
    parent = next(run for run in runs if run.info.run_name == "e2e")
    assert parent.info.status == "FINISHED"
    artifacts = {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "results.json", "ablation.yaml"} | plots <= artifacts
    metric = parent.data.metrics["arm.fast.val_loss.mean"]
    assert metric == pytest.approx(report.arms["fast"].metrics["val_loss"].mean)
    assert (
        "arm.fast.val_loss.diff" in parent.data.metrics and "arm.base.decoder_flops_per_sample" in parent.data.metrics
    )

    children = {run.info.run_name: run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    trials = {f"e2e-{arm}-seed{seed}" for arm in ("base", "fast") for seed in (0, 1)}
    assert set(children) == trials | {"e2e-shared-seed0", "e2e-shared-seed1"}
    shared = {}
    for seed in (0, 1):
        stage1 = _child(runs, children[f"e2e-shared-seed{seed}"], "stage1")
        shared[seed] = stage1.data.tags["owl2.checkpoint"]
        assert children[f"e2e-shared-seed{seed}"].data.params["seed"] == str(seed)
    assert shared[0] != shared[1]  # one stage 1 per seed: the seeds are independent replicates
    for arm in ("base", "fast"):
        for seed in (0, 1):
            trial = children[f"e2e-{arm}-seed{seed}"]
            # What tells the trials apart, as the compare page's axes; the whole config is experiment.yaml.
            arm_params = {"stages.stage2.optim.lr": "3e-3"} if arm == "fast" else {}  # as the arm wrote it
            assert trial.data.params == {"ablation.arm": arm, "ablation.seed": str(seed), **arm_params}
            assert "experiment.yaml" in {artifact.path for artifact in client.list_artifacts(trial.info.run_id)}
            stage2 = _child(runs, trial, "stage2")
            assert stage2.data.params["init_from"] == shared[seed]  # both arms of a seed start from its stage 1
            assert not _child(runs, trial, "stage1", missing_ok=True)


def _child(runs, parent, name: str, missing_ok: bool = False):
    found = [
        run
        for run in runs
        if run.info.run_name == name and run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    assert missing_ok or len(found) == 1, (name, parent.info.run_name)
    return found[0] if found else None
