"""Every shipped YAML, at any depth, loads and validates; semantic checks on the stage recipes."""

from pathlib import Path

import pytest

from owl2.config import ConfigError, StageConfig, build, load_experiment, load_yaml

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
ALL_YAML = sorted(EXPERIMENTS.rglob("*.yaml"))
PIPELINES = [path for path in ALL_YAML if "stages" in load_yaml(path)]


def test_every_yaml_is_a_pipeline_or_a_stage_a_pipeline_uses():
    used = {
        path.parent / stage
        for path in PIPELINES
        for stage in load_yaml(path)["stages"].values()
        if isinstance(stage, str)
    }
    orphans = [
        path
        for path in ALL_YAML
        if path not in PIPELINES and path not in used and not {"sweeps", "ablations"} & set(path.parts)
    ]
    assert not orphans, f"YAML files no loader validates: {orphans}"
    assert {"tiny_cpu", "owl2_7b"} <= {path.parent.name for path in PIPELINES}


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_pipeline_validates(path):
    experiment = load_experiment(path)
    for name, stage in experiment.stages.items():
        assert experiment.gradient_accumulation(name) >= 1
        assert isinstance(stage, StageConfig)
    names = list(experiment.stages)
    if len(names) > 1:
        # The resolution never goes down between stages, and the last stage trains everything.
        sizes = [experiment.stages[n].image_size for n in names]
        assert sizes == sorted(sizes)
        assert experiment.stages[names[-1]].trainable == ["all"]


@pytest.mark.parametrize(
    "path",
    [p for p in ALL_YAML if p not in PIPELINES and not {"sweeps", "ablations"} & set(p.parts)],
    ids=lambda p: str(p.relative_to(EXPERIMENTS)),
)
def test_stage_file_validates_alone(path):
    stage = build(StageConfig, load_yaml(path), path.stem)
    assert stage.data.sources and stage.data.image_size == stage.image_size


def test_paper_recipe_numbers():
    experiment = load_experiment(EXPERIMENTS / "owl2_7b" / "pipeline.yaml")
    stage1, stage2 = experiment.stages["stage1"], experiment.stages["stage2"]
    assert stage1.trainable == ["vision", "abstractor", "decoder.visual"] and stage1.image_size == 224
    assert (stage1.optim.lr, stage1.optim.warmup_steps, stage1.optim.layer_decay) == (1e-4, 1000, 0.9)
    assert (stage2.optim.lr, stage2.global_batch_size, stage2.image_size) == (2e-5, 256, 448)
    assert stage2.optim.layer_decay == 0.9 and stage2.precision == stage1.precision == "bf16"


def test_the_7b_recipe_compiles_its_layers_on_gpus_and_the_tiny_one_never():
    big = load_experiment(EXPERIMENTS / "owl2_7b" / "pipeline.yaml")
    tiny = load_experiment(EXPERIMENTS / "tiny_cpu" / "pipeline.yaml", ["stages.stage1.compile=on"])
    assert [stage.compile for stage in big.stages.values()] == ["auto", "auto"] and big.resources.use_gpu
    # YAML reads on/off as booleans, which the key takes as they are.
    assert [stage.compile for stage in tiny.stages.values()] == [True, False]


def test_overrides_address_stages_by_name_and_bad_keys_are_named():
    path = EXPERIMENTS / "tiny_cpu" / "pipeline.yaml"
    experiment = load_experiment(path, ["stages.stage2.optim.lr=5e-4", "resources.num_workers=1"])
    assert experiment.stages["stage2"].optim.lr == 5e-4
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['stages.stage2.optim.learning_rate'\]"):
        load_experiment(path, ["stages.stage2.optim.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"global_batch_size \(16\) must be a multiple of"):
        load_experiment(path, ["resources.num_workers=3"])
    with pytest.raises(ConfigError, match="fsdp needs GPU workers"):
        load_experiment(path, ["stages.stage2.strategy=fsdp"])


@pytest.mark.parametrize("path", sorted((EXPERIMENTS / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_validates_with_its_base_experiment(path):
    from owl2.tune.sweep import load_sweep

    sweep, base = load_sweep(path)
    assert sweep.space and base.stages


ABLATIONS = sorted(EXPERIMENTS.rglob("ablations/*.yaml"))


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_ablation_validates_with_its_base_experiment(path):
    from owl2.ablate.run import arm_experiment, load_ablation

    ablation, base = load_ablation(path)
    quick, quick_base = load_ablation(path, quick=True)
    for version, version_base in ((ablation, base), (quick, quick_base)):
        for arm in version.arms:  # every arm's experiment, as the run builds it before Ray starts
            arm_experiment(version_base, version, arm, version.seeds[0])
    assert len(ablation.seeds) >= 3 and len(quick.seeds) >= 2 and quick.name == f"{ablation.name}-quick"
    assert sum(stage.max_steps for stage in quick_base.stages.values()) < sum(
        stage.max_steps for stage in base.stages.values()
    )
    assert "Expected" in path.read_text()  # each documents its expected running time


def test_every_shipped_ablation_has_a_cpu_and_a_7b_version():
    names = {path.stem for path in ABLATIONS if path.parent == EXPERIMENTS / "ablations"}
    assert names == {"modality_adaptive", "abstractor", "vision_lr"}
    assert names == {path.stem for path in ABLATIONS if path.parent == EXPERIMENTS / "owl2_7b" / "ablations"}


def test_sweep_keys_are_checked_against_the_experiment(tmp_path):
    from owl2.tune.sweep import load_sweep

    (tmp_path / "bad.yaml").write_text(
        f"experiment: {EXPERIMENTS / 'tiny_cpu' / 'pipeline.yaml'}\n"
        "space:\n  model.overrides.abstractor.num_querys: {grid: [8]}\n"
    )
    with pytest.raises(ConfigError, match=r"space.model.overrides.abstractor.num_querys=8 does not fit"):
        load_sweep(tmp_path / "bad.yaml")


def test_ray_job_entrypoints_reject_a_bad_config_cleanly(tmp_path, capsys):
    from owl2.cli import add_train_arguments, job_entrypoint, run_train

    code = job_entrypoint(
        "train",
        add_train_arguments,
        run_train,
        ["--config", str(EXPERIMENTS / "tiny_cpu" / "pipeline.yaml"), "resources.num_workers=0"],
    )
    assert code == 2 and "resources.num_workers must be >= 1" in capsys.readouterr().err
