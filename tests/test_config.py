"""Typed configs: presets, official config.json, overrides and actionable validation errors."""

import json
from pathlib import Path

import pytest

from owl2.config import MODEL_PRESETS, ConfigError, ModelConfig, build, load_yaml, parse_overrides, to_dict
from owl2.model.foreign_config import model_config_from_official


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_presets_validate_and_round_trip(name):
    spec = ModelConfig.from_preset(name)
    assert build(ModelConfig, to_dict(spec)) == spec


def test_owl2_7b_preset_is_the_released_layout():
    spec = ModelConfig.from_preset("owl2-7b")
    assert (spec.vision.hidden_size, spec.vision.num_layers, spec.vision.image_size, spec.vision.num_tokens) == (
        1024,
        24,
        448,
        1025,
    )
    assert (spec.abstractor.num_layers, spec.abstractor.num_queries, spec.tokens_per_image) == (6, 64, 65)
    assert (spec.decoder.hidden_size, spec.decoder.num_layers, spec.decoder.vocab_size) == (4096, 32, 32000)


def test_official_config_json_reads_as_debug_preset(golden_dir):
    official = json.loads((golden_dir / "config.json").read_text())
    assert model_config_from_official(official) == ModelConfig.from_preset("debug")


def test_official_config_rejects_unsupported_variants(golden_dir):
    official = json.loads((golden_dir / "config.json").read_text())
    official["visual_config"]["visual_model"]["use_cls_token"] = False
    with pytest.raises(ConfigError, match="use_cls_token"):
        model_config_from_official(official)
    with pytest.raises(ConfigError, match="model_type"):
        model_config_from_official({"model_type": "llama"})


def test_overrides_are_typed_and_nested():
    spec = ModelConfig.from_preset("tiny-cpu", ["abstractor.num_queries=32", "decoder.rope_theta=500000"])
    assert spec.abstractor.num_queries == 32
    assert spec.decoder.rope_theta == 500000.0 and isinstance(spec.decoder.rope_theta, float)
    assert parse_overrides(["a.b.c=[1, 2]", "a.d=yes"]) == {"a": {"b": {"c": [1, 2]}, "d": True}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["abstractor.hidden_size=48", "abstractor.num_heads=4"], r"abstractor.hidden_size \(48\) must equal vision"),
        (["decoder.num_heads=5"], r"decoder.num_heads \(5\) must divide decoder.hidden_size"),
        (["decoder.num_kv_heads=3"], r"decoder.num_kv_heads \(3\) must divide"),
        (["vision.image_size=50"], r"vision.image_size \(50\) must be a multiple of vision.patch_size"),
        (["decoder.num_layer=3"], r"unknown field\(s\) \['model.decoder.num_layer'\]"),
        (["decoder.num_layers=two"], r"model.decoder.num_layers must be int, got 'two'"),
        (["decoder.num_layers=true"], r"must be int"),
        (["decoder.eos_token_id=300"], r"decoder.eos_token_id \(300\) must lie in"),
        (["decoder"], r"must look like section.field=value"),
        (["projector=linear"], r"^model.projector 'linear' must be one of \['abstractor', 'mlp'\]$"),
        (["decoder.modality_adaptive=maybe"], r"model.decoder.modality_adaptive must be bool, got 'maybe'"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_preset("debug", overrides)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match=r"choose one of \['debug', 'owl2-7b', 'tiny-cpu'\]"):
        ModelConfig.from_preset("owl2-13b")


def test_yaml_file_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_yaml(tmp_path / "list.yaml")


def test_exponent_without_a_dot_is_still_a_float():
    from owl2.config import OptimConfig

    assert build(OptimConfig, {"lr": "3e-3"}).lr == 0.003
    with pytest.raises(ConfigError, match="optim.lr must be float, got 'fast'"):
        build(OptimConfig, {"lr": "fast"}, "optim")


# --------------------------------------------------------------------------------------------------
# A stage's eval section (benchmark scores at checkpoint steps)
# --------------------------------------------------------------------------------------------------

PIPELINE = Path(__file__).resolve().parents[1] / "experiments" / "tiny_cpu" / "pipeline.yaml"


def test_eval_section_from_overrides_with_defaults():
    from owl2.config import EvalConfig, load_experiment

    experiment = load_experiment(PIPELINE, ["stages.stage2.eval.limit=16"])
    assert experiment.stages["stage1"].eval is None
    assert experiment.stages["stage2"].eval == EvalConfig(suite="shapes", data=None, every=None, limit=16)
    assert build(type(experiment), to_dict(experiment)) == experiment
    vqa = ["stages.stage2.checkpoint_every=40", "stages.stage2.eval.every=80"]
    vqa += ["stages.stage2.eval.suite=vqa", "stages.stage2.eval.data=vqa.jsonl"]
    stage = load_experiment(PIPELINE, vqa).stages["stage2"]
    assert (stage.eval.every, stage.eval.data) == (80, "vqa.jsonl")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["stages.stage2.eval.suite=shape"],
            r"stages.stage2.eval.suite 'shape' must be one of \['shapes', 'vqa', 'mmbench', 'mme', 'captions'\]",
        ),
        (["stages.stage2.eval.every=0"], r"stages.stage2.eval.every must be positive, got 0"),
        (["stages.stage2.eval.limit=-1"], r"stages.stage2.eval.limit must be positive"),
        (["stages.stage2.eval.batch_size=0"], r"stages.stage2.eval.batch_size must be positive"),
        (["stages.stage2.eval.suite=mme"], r"stages.stage2.eval.data is empty: the mme suite needs"),
        (["stages.stage2.eval.limti=4"], r"unknown field\(s\) \['stages.stage2.eval.limti'\]"),
        (
            ["stages.stage2.checkpoint_every=40", "stages.stage2.eval.every=60"],
            r"stages.stage2.eval.every \(60\) must be a multiple of stages.stage2.checkpoint_every \(40\)",
        ),
        (
            ["stages.stage2.eval.limit=4", "stages.stage2.strategy=fsdp", "resources.use_gpu=true"],
            r"stages.stage2.eval is not supported with stages.stage2.strategy fsdp yet",
        ),
    ],
)
def test_eval_section_errors_name_the_key(overrides, message):
    from owl2.config import load_experiment

    with pytest.raises(ConfigError, match=message):
        load_experiment(PIPELINE, overrides)


def test_nested_section_errors_name_the_full_key():
    from owl2.config import load_experiment

    with pytest.raises(ConfigError, match=r"^stages.stage1.validation.every must be positive"):
        load_experiment(PIPELINE, ["stages.stage1.validation.every=0"])
    with pytest.raises(ConfigError, match=r"^stages.stage2.data.resize 'squash' must be one of"):
        load_experiment(PIPELINE, ["stages.stage2.data.resize=squash"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stages.stage1.max_steps=0", r"^stages.stage1.max_steps must be positive, got 0$"),
        ("stages.stage1.global_batch_size=0", r"^stages.stage1.global_batch_size must be positive, got 0$"),
        ("stages.stage2.precision=fp16", r"^stages.stage2.precision 'fp16' must be one of \['auto', 'bf16', 'fp32'\]"),
        ("stages.stage2.compile=always", r"^stages.stage2.compile 'always' must be true, false or auto"),
        ("stages.stage2.trainable=[]", r"^stages.stage2.trainable must name at least one part"),
        ("stages.stage1.max_nonfinite_steps=-1", r"^stages.stage1.max_nonfinite_steps must be >= 0, got -1$"),
        ("stages.stage1.optim.warmup_steps=100000", r"^stages.stage1.optim.warmup_steps \(100000\) exceeds the stage"),
        ("stages.stage2.optim.layer_decay=0", r"^stages.stage2.optim.layer_decay must lie in \(0, 1\], got 0"),
        ("stages.stage1.data.max_bad_fraction=2", r"^stages.stage1.data.max_bad_fraction must lie in \[0, 1\], got 2"),
        (
            "stages.stage1.data.sources=[{format: coco, path: x.json}]",
            r"^stages.stage1.data.sources\[0\].format 'coco' must be one of \['llava', 'captions', 'webdataset'\]",
        ),
        ("resources.cpus_per_worker=0", r"^resources.cpus_per_worker must be positive, got 0"),
        ("model.preset=huge", r"^model.preset 'huge' must be one of \['debug', 'owl2-7b', 'tiny-cpu'\]"),
    ],
)
def test_stage_and_source_errors_name_the_full_key(override, message):
    from owl2.config import load_experiment

    with pytest.raises(ConfigError, match=message):
        load_experiment(PIPELINE, [override])


def test_a_stage_built_alone_names_its_keys_by_section():
    from owl2.config import SourceConfig, StageConfig

    with pytest.raises(ConfigError, match=r"^stage.checkpoint_every must be positive, got 0$"):
        StageConfig(checkpoint_every=0)
    with pytest.raises(ConfigError, match=r"^source.weight must be positive, got -1"):
        build(SourceConfig, {"format": "llava", "path": "a.json", "weight": -1})


def test_eval_suites_are_the_runners():
    from owl2.config import EVAL_SUITES
    from owl2.eval.suite import SUITES

    assert EVAL_SUITES == SUITES


def test_init_from_is_checked_before_workers_start(tmp_path, golden_dir):
    from owl2.config import load_experiment
    from owl2.train.trainer import check_init_from

    def experiment(path):
        return load_experiment(PIPELINE, [f"stages.stage2.init_from={path}"])

    with pytest.raises(ConfigError, match=r"stages.stage2.init_from .*nowhere does not exist"):
        check_init_from(experiment(tmp_path / "nowhere"))
    (tmp_path / "snapshot.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):
        check_init_from(experiment(tmp_path / "snapshot.json"))
    check_init_from(experiment(tmp_path / "nowhere"), stages=["stage1"])  # stage 2 does not run
    check_init_from(experiment(golden_dir))
    check_init_from(experiment("s3://bucket/checkpoint"))  # remote storage is Ray Train's to read
