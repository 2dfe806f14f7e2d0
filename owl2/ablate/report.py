"""An ablation's report from its trials' final metrics: tables (report.md), plots (PNG), results.json and the
headline metrics of the ablation's MLflow run. Pure functions of the numbers: no Ray, no MLflow.

Per arm and metric: n, mean, standard deviation and t-interval over seeds; per non-baseline arm the paired
difference to the baseline (by seed) with its interval, worded by :func:`owl2.ablate.stats.verdict`. Per arm the
cost: decoder tokens and FLOPs per sample and wall time per trial.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl2.ablate.stats import NO_DIFFERENCE, NO_SPREAD, Summary, paired_difference, summarise, verdict
from owl2.tables import Column, format_table

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"
FLOPS_PLOT = "headline_vs_flops.png"


@dataclass
class TrialResult:
    """One trial (an arm at a seed): the metrics of its last stage's final report (none when it failed or stopped
    short: a partial run is no replicate), its wall time, and for a failed trial the error."""

    arm: str
    seed: int
    metrics: dict[str, float]
    wall_s: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class ArmCost:
    """What one sample of the arm's last stage costs the decoder: its image's tokens plus ``text_tokens`` (the
    mean measured over that stage's training batches), and ``decoder_flops``, the decoder's forward FLOPs for
    that sample (``owl2.plan``'s rule, model count; None when the text tokens were not measured)."""

    image_tokens: int
    text_tokens: float | None
    decoder_flops: float | None

    @property
    def decoder_tokens(self) -> float | None:
        return None if self.text_tokens is None else self.image_tokens + self.text_tokens


@dataclass
class ArmResult:
    """One arm's summaries: ``metrics`` over seeds; ``differences`` to the baseline (paired by seed; none for the
    baseline itself) with their ``verdicts``; cost and wall time per trial."""

    name: str
    overrides: list[str]
    values: dict[str, dict[int, float]]
    """Metric -> seed -> final value, for the trials that reported it."""
    metrics: dict[str, Summary | None]
    differences: dict[str, Summary | None] = field(default_factory=dict)
    verdicts: dict[str, str] = field(default_factory=dict)
    cost: ArmCost | None = None
    wall: Summary | None = None


@dataclass
class AblationReport:
    name: str
    experiment: str
    baseline: str
    directions: dict[str, str]
    """Metric -> ``max`` (higher is better) or ``min``, in the order the ablation lists them."""
    seeds: list[int]
    confidence: float
    shared_stages: list[str]
    """Stages run once per seed that every arm started from (empty: each trial ran all stages)."""
    shared_wall: Summary | None
    arms: dict[str, ArmResult]
    failed: list[TrialResult]

    @property
    def headline(self) -> str:
        return next(iter(self.directions))


def build_report(
    *,
    name: str,
    experiment: str,
    arms: Mapping[str, Sequence[str]],
    baseline: str,
    directions: Mapping[str, str],
    seeds: Sequence[int],
    trials: Sequence[TrialResult],
    costs: Mapping[str, ArmCost] | None = None,
    shared_stages: Sequence[str] = (),
    shared_wall_s: Sequence[float] = (),
    confidence: float = 0.95,
) -> AblationReport:
    """Summarise ``trials`` per arm and metric and compare every arm with ``baseline`` seed by seed.

    A metric missing from a trial (it failed, or never reported it) leaves that seed out of that metric's sample.
    """
    results: dict[str, ArmResult] = {}
    for arm, overrides in arms.items():
        own = [trial for trial in trials if trial.arm == arm]
        values = {
            metric: {trial.seed: trial.metrics[metric] for trial in own if metric in trial.metrics}
            for metric in directions
        }
        walls = [trial.wall_s for trial in own if trial.error is None and trial.wall_s is not None]
        results[arm] = ArmResult(
            name=arm,
            overrides=list(overrides),
            values=values,
            metrics={metric: summarise(list(by_seed.values()), confidence) for metric, by_seed in values.items()},
            cost=(costs or {}).get(arm),
            wall=summarise(walls, confidence),
        )
    base = results[baseline]
    for arm in results.values():
        if arm.name == baseline:
            continue
        for metric, direction in directions.items():
            difference = paired_difference(arm.values[metric], base.values[metric], confidence)
            arm.differences[metric] = difference
            arm.verdicts[metric] = verdict(difference, direction)
    return AblationReport(
        name=name,
        experiment=experiment,
        baseline=baseline,
        directions=dict(directions),
        seeds=list(seeds),
        confidence=confidence,
        shared_stages=list(shared_stages),
        shared_wall=summarise(list(shared_wall_s), confidence),
        arms=results,
        failed=[trial for trial in trials if trial.error is not None],
    )


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def _number(value: float | None, spec: str = ".4g") -> str | None:
    return None if value is None else format(value, spec)


def _interval(summary: Summary | None, spec: str = ".4g") -> str | None:
    if summary is None or summary.low is None or summary.high is None:
        return None
    return f"[{summary.low:{spec}}, {summary.high:{spec}}]"


def metric_table(report: AblationReport, metric: str) -> str:
    """One metric: per arm n, mean, std and interval; per non-baseline arm the paired difference and verdict."""
    level = f"{report.confidence:.0%}"
    columns = (
        Column("arm", align="<"),
        Column("n"),
        Column("mean"),
        Column("std"),
        Column("ci", f"{level} CI"),
        Column("difference", "arm - baseline"),
        Column("difference_ci", f"{level} CI"),
        Column("verdict", align="<"),
    )
    rows = []
    for arm in report.arms.values():
        summary, difference = arm.metrics[metric], arm.differences.get(metric)
        rows.append(
            {
                "arm": arm.name + (" (baseline)" if arm.name == report.baseline else ""),
                "n": 0 if summary is None else summary.n,
                "mean": _number(summary and summary.mean),
                "std": _number(summary and summary.std),
                "ci": _interval(summary),
                "difference": _number(difference and difference.mean, "+.4g"),
                "difference_ci": _interval(difference, "+.4g"),
                "verdict": arm.verdicts.get(metric),
            }
        )
    return format_table(rows, columns)


def cost_table(report: AblationReport) -> str:
    """Per arm: decoder tokens per image and per sample, decoder GFLOPs per sample, wall time per trial."""
    level = f"{report.confidence:.0%}"
    columns = (
        Column("arm", align="<"),
        Column("image_tokens", "tokens/image"),
        Column("decoder_tokens", "decoder tokens/sample", ".1f"),
        Column("gflops", "decoder GFLOPs/sample", ".4g"),
        Column("wall", "wall s/trial", ".1f"),
        Column("wall_ci", f"{level} CI"),
    )
    rows = []
    for arm in report.arms.values():
        cost = arm.cost
        rows.append(
            {
                "arm": arm.name,
                "image_tokens": None if cost is None else cost.image_tokens,
                "decoder_tokens": None if cost is None else cost.decoder_tokens,
                "gflops": None if cost is None or cost.decoder_flops is None else cost.decoder_flops / 1e9,
                "wall": None if arm.wall is None else arm.wall.mean,
                "wall_ci": _interval(arm.wall, ".1f"),
            }
        )
    return format_table(rows, columns)


def plot_files(report: AblationReport) -> dict[str, str]:
    """Metric -> the file name of its bar plot."""
    return {metric: f"metric_{_slug(metric)}.png" for metric in report.directions}


def to_markdown(report: AblationReport) -> str:
    """report.md: the design, one table per metric, the cost table, failed trials and the plots."""
    level = f"{report.confidence:.0%}"
    seeds = ", ".join(str(seed) for seed in report.seeds)
    if report.shared_stages:
        design = (
            f"The arms differ only after {', '.join(report.shared_stages)}: that ran once per seed and every arm's "
            "trial of the seed started from its checkpoint, so the arms of a seed differ in nothing but their "
            "overrides (a paired design)."
        )
    else:
        design = (
            "The arms change the first stage (the model or its first stage's settings), so every trial ran all "
            "stages; the two runs of a seed share its data order and random seed."
        )
    lines = [
        f"# Ablation {report.name}",
        "",
        f"Experiment `{report.experiment}`, baseline arm `{report.baseline}`, seeds {seeds} (each an independent "
        f"replicate: the seed sets the initial weights and every stage's data order). {design}",
        "",
        "| arm | overrides |",
        "|---|---|",
        *(
            f"| `{arm.name}` | {', '.join(f'`{item}`' for item in arm.overrides) or '(the base experiment)'} |"
            for arm in report.arms.values()
        ),
        "",
        f"Per arm: n seeds, mean, standard deviation and {level} t-interval of the mean over seeds. Per arm against "
        f"the baseline: the mean of the paired differences (arm minus baseline, seed by seed) with its {level} "
        f"t-interval. An interval that contains zero is reported as **{NO_DIFFERENCE}**: these seeds cannot tell "
        "the arms apart, which is not evidence that they are equal. When every seed gave the same difference, "
        f"the interval has no width and the verdict is **{NO_SPREAD}**.",
    ]
    plots = plot_files(report)
    for metric, direction in report.directions.items():
        lines += [
            "",
            f"## {metric} ({'higher' if direction == 'max' else 'lower'} is better)",
            "",
            "```",
            metric_table(report, metric),
            "```",
            "",
            f"![{metric}]({plots[metric]})",
        ]
    lines += [
        "",
        "## Cost",
        "",
        "```",
        cost_table(report),
        "```",
        "",
        "Decoder tokens per sample: one image's tokens plus the mean text tokens per sample of the last stage's "
        "training batches. Decoder GFLOPs per sample: the decoder's forward pass (layers and LM head, "
        "`owl2.plan`'s FLOP rule, model count) on such a sample. Wall time: each trial from its start to its "
        "last report (the stages it ran; trials that failed left out); it compares arms only when trials did not "
        "share CPUs.",
    ]
    if report.shared_wall is not None:
        lines += [
            "",
            f"Shared {', '.join(report.shared_stages)}: {report.shared_wall.mean:.1f} s per seed "
            f"({report.shared_wall.n} runs), not counted in the trials' wall time.",
        ]
    if any(arm.cost and arm.cost.decoder_flops for arm in report.arms.values()):
        lines += ["", f"![{report.headline} against decoder FLOPs per sample]({FLOPS_PLOT})"]
    if report.failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- `{trial.arm}` seed {trial.seed}: {_last_line(trial.error)}" for trial in report.failed]
    return "\n".join(lines) + "\n"


def text_summary(report: AblationReport) -> str:
    """The tables of report.md as plain text, for the terminal."""
    parts = [f"ablation {report.name}: baseline {report.baseline}, seeds {report.seeds}"]
    parts += [f"{metric}\n{metric_table(report, metric)}" for metric in report.directions]
    parts.append(f"cost\n{cost_table(report)}")
    return "\n\n".join(parts)


def headline_metrics(report: AblationReport) -> dict[str, float]:
    """The MLflow metrics of the ablation's run: ``arm.<arm>.<metric>.{mean,std,ci_low,ci_high,n}``, for other
    arms ``.diff``, ``.diff_low``, ``.diff_high``; ``arm.<arm>.{decoder_tokens,decoder_flops}_per_sample`` and
    ``arm.<arm>.wall_s``."""
    values: dict[str, float | None] = {}
    for arm in report.arms.values():
        prefix = f"arm.{arm.name}"
        for metric, summary in arm.metrics.items():
            if summary is not None:
                key = f"{prefix}.{metric}"
                values.update(
                    {
                        f"{key}.mean": summary.mean,
                        f"{key}.std": summary.std,
                        f"{key}.ci_low": summary.low,
                        f"{key}.ci_high": summary.high,
                        f"{key}.n": summary.n,
                    }
                )
        for metric, difference in arm.differences.items():
            if difference is not None:
                key = f"{prefix}.{metric}"
                values.update(
                    {
                        f"{key}.diff": difference.mean,
                        f"{key}.diff_low": difference.low,
                        f"{key}.diff_high": difference.high,
                    }
                )
        if arm.cost is not None:
            values[f"{prefix}.decoder_tokens_per_sample"] = arm.cost.decoder_tokens
            values[f"{prefix}.decoder_flops_per_sample"] = arm.cost.decoder_flops
        if arm.wall is not None:
            values[f"{prefix}.wall_s"] = arm.wall.mean
    return {key: float(value) for key, value in values.items() if value is not None}


# --------------------------------------------------------------------------------------------------
# Plots and files
# --------------------------------------------------------------------------------------------------


def write_report(report: AblationReport, folder: str | Path) -> list[Path]:
    """report.md, results.json and the PNG plots into ``folder`` (created); returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_FILE).write_text(to_markdown(report))
    (folder / RESULTS_FILE).write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
    written = [folder / REPORT_FILE, folder / RESULTS_FILE]
    for metric, name in plot_files(report).items():
        written.append(_bar_plot(report, metric, folder / name))
    if any(arm.cost and arm.cost.decoder_flops for arm in report.arms.values()):
        written.append(_flops_plot(report, folder / FLOPS_PLOT))
    return written


def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    """A figure drawn by the Agg backend without pyplot: importing or using owl2 changes no matplotlib state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _bar_plot(report: AblationReport, metric: str, path: Path) -> Path:
    """Bars of the arms' means with their intervals as error bars, and each seed's value as a dot."""
    arms = list(report.arms.values())
    figure = _figure(max(4.0, 1.4 * len(arms) + 2), 4.0)
    axes = figure.subplots()
    positions = range(len(arms))
    means = [arm.metrics[metric].mean if arm.metrics[metric] else 0.0 for arm in arms]
    errors = [(arm.metrics[metric] and arm.metrics[metric].half_width) or 0.0 for arm in arms]
    colors = ["tab:gray" if arm.name == report.baseline else "tab:blue" for arm in arms]
    axes.bar(positions, means, yerr=errors, capsize=6, color=colors, alpha=0.75)
    for position, arm in zip(positions, arms, strict=True):
        seeds = arm.values[metric]
        axes.scatter([position] * len(seeds), list(seeds.values()), color="black", s=14, zorder=3)
    axes.set_xticks(list(positions), [arm.name for arm in arms])
    direction = "higher" if report.directions[metric] == "max" else "lower"
    axes.set_ylabel(f"{metric} ({direction} is better)")
    axes.set_title(f"{report.name}: mean over seeds, {report.confidence:.0%} t-interval, dots = seeds", fontsize=9)
    figure.savefig(path, dpi=120)
    return path


def _flops_plot(report: AblationReport, path: Path) -> Path:
    """The headline metric against decoder GFLOPs per sample, one point per arm with its interval."""
    figure = _figure()
    axes = figure.subplots()
    metric = report.headline
    for arm in report.arms.values():
        summary, cost = arm.metrics[metric], arm.cost
        if summary is None or cost is None or cost.decoder_flops is None:
            continue
        gflops = cost.decoder_flops / 1e9
        axes.errorbar([gflops], [summary.mean], yerr=[[summary.half_width or 0.0]], fmt="o", capsize=5)
        axes.annotate(arm.name, (gflops, summary.mean), textcoords="offset points", xytext=(6, 6), fontsize=9)
    axes.set_xlabel("decoder GFLOPs per sample (forward)")
    axes.set_ylabel(metric)
    axes.set_title(f"{report.name}: {metric} against decoder compute", fontsize=9)
    figure.savefig(path, dpi=120)
    return path


def _slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_")


def _last_line(text: str | None) -> str:
    """The last non-blank line (a Ray error ends with the exception that ended the trial), cut to 300 characters."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "failed"
