"""Sweep planning: which stages run once and which every trial runs, validated against the experiment."""

from pathlib import Path

import yaml

from owl2.tune.sweep import load_sweep, plan_stages

SWEEPS = Path(__file__).resolve().parents[1] / "experiments" / "sweeps"


def _stage2_sweep(path, world, name, space, **settings):
    """A sweep of stage-2 keys on the shortened tiny-cpu pipeline: stage 1 runs once, trials run stage 2."""
    path.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "experiment": str(SWEEPS.parent / "tiny_cpu" / "pipeline.yaml"),
                "overrides": [
                    "resources.num_workers=1",
                    "stages.stage1.max_steps=2",
                    "stages.stage1.checkpoint_every=2",
                    "stages.stage1.log_every=2",
                    "stages.stage1.optim.warmup_steps=1",
                    "stages.stage1.validation.every=2",
                    "stages.stage2.max_steps=6",
                    "stages.stage2.checkpoint_every=6",
                    "stages.stage2.log_every=2",
                    "stages.stage2.optim.warmup_steps=1",
                    "stages.stage2.validation.every=2",
                    "stages.stage2.max_nonfinite_steps=0",
                ],
                "space": space,
                "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": 10},
                "storage_path": str(world / "runs"),
                "tracking": {"experiment": "owl2-tiny-cpu-sweeps"},
                **settings,
            }
        )
    )
    sweep, base = load_sweep(path)
    assert plan_stages(sweep, base) == (["stage1"], ["stage2"])
    return sweep, base


def test_shipped_architecture_sweep_plans_both_stages_per_trial():
    sweep, base = load_sweep(SWEEPS / "tiny_cpu.yaml")
    assert plan_stages(sweep, base) == ([], ["stage1", "stage2"])  # architecture knobs re-run stage 1


def test_stage_two_keys_share_stage_one(tmp_path):
    sweep, base = _stage2_sweep(
        tmp_path / "decay.yaml", Path(tmp_path), "decay", {"stages.stage2.optim.layer_decay": {"grid": [0.8, 1.0]}}
    )
    assert sweep.space and base.stages["stage2"].max_steps == 6
