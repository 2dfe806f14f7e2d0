import re

import pytest

from owl2.cli import main
from owl2.config import StageConfig

# Parameters of the released MAGAer13/mplug-owl2-llama2-7b (../shared/reference/owl2_7b_state_dict_shapes.json,
# buffers excluded).
OWL2_7B_PARAMETERS = 8_197_859_328


def _parameter_rows(output: str) -> dict[str, int]:
    section = output.split("\nparameters\n", 1)[1]
    return {name: int(count.replace(",", "")) for name, count in re.findall(r"^\s+(\w+)\s+([\d,]+)$", section, re.M)}


def test_model_summary_prints_config_and_parameter_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "summary", "--preset", "debug"]) == 0
    output = capsys.readouterr().out

    assert re.search(r"^\s+decoder\.vocab_size\s+256$", output, re.M)
    rows = _parameter_rows(output)
    assert {"vision", "abstractor", "decoder", "lm_head", "total"} <= set(rows)
    assert rows["total"] == sum(count for name, count in rows.items() if name != "total")
    assert rows["lm_head"] == 256 * 64  # vocab x decoder width, untied from the embeddings


def test_model_summary_applies_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "summary", "--preset", "debug", "decoder.num_layers=1"]) == 0
    assert re.search(r"^\s+decoder\.num_layers\s+1$", capsys.readouterr().out, re.M)


def test_model_summary_shows_the_ablation_switches(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "summary", "--preset", "debug"]) == 0
    output = capsys.readouterr().out
    assert re.search(r"^\s+projector\s+abstractor$", output, re.M)
    assert re.search(r"^\s+decoder\.modality_adaptive\s+True$", output, re.M)

    assert main(["model", "summary", "--preset", "debug", "projector=mlp", "decoder.modality_adaptive=false"]) == 0
    output = capsys.readouterr().out
    assert re.search(r"^\s+projector\s+mlp$", output, re.M)
    assert re.search(r"^\s+decoder\.modality_adaptive\s+False$", output, re.M)
    assert re.search(r"^\s+tokens_per_image\s+16$", output, re.M)  # a 4x4 patch grid at 56 px
    assert "abstractor.num_queries" not in output  # the section is unused
    assert _parameter_rows(output)["abstractor"] == 32 * 64 + 64 + 64 * 64 + 64

    assert main(["model", "summary", "--preset", "debug", "projector=linear"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [captured.err.strip()] and captured.out == ""
    assert "model.projector 'linear' must be one of ['abstractor', 'mlp']" in captured.err


def test_model_summary_of_the_7b_preset_matches_the_released_checkpoint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "summary", "--preset", "owl2-7b"]) == 0
    assert _parameter_rows(capsys.readouterr().out)["total"] == OWL2_7B_PARAMETERS


def test_bad_override_is_a_clean_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "summary", "--preset", "debug", "decoder.num_heads=5"]) == 2
    captured = capsys.readouterr()
    assert "decoder.num_heads" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_unknown_preset_is_a_clean_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "summary", "--preset", "no-such-preset"]) == 2
    assert "no-such-preset" in capsys.readouterr().err


def test_model_convert_turns_the_official_folder_into_ours(tmp_path, golden_dir, capsys) -> None:
    import json

    import torch
    from safetensors.torch import load_file

    from owl2.model import Owl2ForCausalLM

    assert main(["model", "convert", str(golden_dir), "--out", str(tmp_path / "owl2"), "--dtype", "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((tmp_path / "owl2" / "config.json").read_text())["model_type"] == "owl2"
    saved = load_file(tmp_path / "owl2" / "model.safetensors")
    assert saved["decoder.norm.weight"].dtype == torch.bfloat16
    reloaded = Owl2ForCausalLM.from_pretrained(tmp_path / "owl2")
    official = Owl2ForCausalLM.from_pretrained(golden_dir, dtype=torch.bfloat16)
    for (name, ours), (_, theirs) in zip(reloaded.state_dict().items(), official.state_dict().items(), strict=True):
        assert torch.equal(ours, theirs), name


def test_model_convert_carries_the_tokenizer_along(tmp_path, golden_dir, spm_tokenizer_dir, capsys) -> None:
    import shutil

    from owl2.data.tokenizer import load_tokenizer

    released = tmp_path / "released"
    shutil.copytree(golden_dir, released)
    shutil.copy2(spm_tokenizer_dir / "tokenizer.model", released / "tokenizer.model")
    assert main(["model", "convert", str(released), "--out", str(tmp_path / "owl2")]) == 0
    assert "--tokenizer" not in capsys.readouterr().out
    text = "a red circle at the top left"
    assert load_tokenizer(tmp_path / "owl2")(text).input_ids == load_tokenizer(released)(text).input_ids

    assert main(["model", "convert", str(golden_dir), "--out", str(tmp_path / "bare")]) == 0
    assert "pass --tokenizer" in capsys.readouterr().out


def test_model_convert_of_a_missing_folder_is_a_clean_error(tmp_path, capsys) -> None:
    assert main(["model", "convert", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_data_stats_defaults_are_the_data_configs() -> None:
    from owl2.cli import _build_parser
    from owl2.config import DataConfig

    args = _build_parser().parse_args(["data", "stats", "--format", "llava", "--path", "a.json", "--tokenizer", "t"])
    defaults = DataConfig()
    assert (args.template, args.max_length, args.image_size, args.resize) == (
        defaults.template,
        defaults.max_length,
        defaults.image_size,
        defaults.resize,
    )
    assert args.micro_batch_size == StageConfig().micro_batch_size


def test_data_stats_refuses_an_empty_micro_batch(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["data", "stats", "--format", "llava", "--path", "a.json", "--tokenizer", "t", "--micro-batch-size", "0"]
    assert main(args) == 2
    assert capsys.readouterr().err == "owl2: error: --micro-batch-size must be positive, got 0\n"


def test_eval_suites_are_the_configs(capsys: pytest.CaptureFixture[str]) -> None:
    from owl2.cli import _build_parser
    from owl2.config import EVAL_SUITES

    parser = _build_parser()
    for suite in EVAL_SUITES:
        assert parser.parse_args(["eval", "--checkpoint", "c", "--suite", suite]).suite == suite
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["eval", "--checkpoint", "c", "--suite", "imagenet"])
    assert exit_info.value.code == 2 and "invalid choice: 'imagenet'" in capsys.readouterr().err
