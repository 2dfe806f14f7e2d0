"""Key-mapping tables and checkpoint I/O: the 7B layout, save/load round trips, LLaMA-2 + CLIP builds, decoders
with and without the modality-adaptive module."""

import json
import logging
import pickle
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.layers import QuickGELU
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from owl2.config import ConfigError, DecoderConfig, ModelConfig
from owl2.model.build import build_from_llama_and_clip
from owl2.model.checkpoint_io import read_config, read_state_dict
from owl2.model.foreign_config import decoder_config_from_llama
from owl2.model.keymaps import (
    CLIP_OPENAI,
    LLAMA,
    OFFICIAL,
    Conversion,
    convert,
    convert_clip,
    detect_clip_layout,
    fuse_qkv_parts,
    target_keys,
)
from owl2.model.owl2 import Owl2Config, Owl2ForCausalLM
from owl2.model.vision import resample_position_embedding

OWL2_7B_PARAMETERS = 8_197_859_328
CASE_A = "A_image_text"

# The tiny CLIP tower: 28 px images of 14 px patches, i.e. a 2x2 grid and 5 position rows.
CLIP_WIDTH, CLIP_LAYERS, CLIP_HEADS, CLIP_MLP, CLIP_IMAGE = 32, 2, 4, 64, 28


def _spec(image_size: int = 56) -> ModelConfig:
    """The debug model with grouped-query attention, to match the tiny LLaMA below."""
    return ModelConfig.from_preset("debug", [f"vision.image_size={image_size}", "decoder.num_kv_heads=2"])


def _perturb_norms_and_biases(model: nn.Module, seed: int) -> None:
    """Freshly initialised norms are ones and biases zeros; random values make every copy test meaningful."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif param.dim() == 1 and "norm" in name:
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))


def _logits(model: Owl2ForCausalLM, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


# ---------------------------------------------------------------------------------------------- 7B layout


def test_official_7b_keys_map_onto_exactly_our_parameters(reference_dir: Path) -> None:
    spec = ModelConfig.from_preset("owl2-7b")
    with torch.device("meta"):
        model = Owl2ForCausalLM(Owl2Config.from_spec(spec))
    params = {name: tuple(param.shape) for name, param in model.named_parameters()}
    assert sum(param.numel() for param in model.parameters()) == OWL2_7B_PARAMETERS

    listed = json.loads((reference_dir / "owl2_7b_state_dict_shapes.json").read_text())["keys"]
    buffers = sorted(key for key, entry in listed.items() if entry["kind"] == "buffer")
    for key, entry in listed.items():
        targets = target_keys(key, OFFICIAL)
        assert targets is not None, f"no rule for official key {key}"
        if entry["kind"] == "buffer":
            assert targets == (), f"buffer {key} must be dropped (recomputed), not mapped to {targets}"
        else:
            assert len(targets) == 1 and targets[0] in params, f"{key} -> {targets}"

    # Transforms included (the fused-QKV reordering), on meta tensors of the listed shapes.
    official = {key: torch.empty(entry["shape"], device="meta") for key, entry in listed.items()}
    conversion = convert(official, OFFICIAL, spec)
    assert conversion.unexpected == []
    assert sorted(conversion.dropped) == buffers
    assert {key: tuple(value.shape) for key, value in conversion.state_dict.items()} == params


# ---------------------------------------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def official_state_dict(golden_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(golden_dir / "model.safetensors")


@pytest.fixture(scope="module")
def case_a(golden_dir: Path) -> dict[str, torch.Tensor]:
    inputs = load_file(golden_dir / "inputs.safetensors")
    return {name: inputs[f"{CASE_A}.{name}"] for name in ("input_ids", "attention_mask", "images")}


def _official_folder(folder: Path, golden_dir: Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(golden_dir / "config.json", folder / "config.json")
    if state_dict is None:
        shutil.copy(golden_dir / "model.safetensors", folder / "model.safetensors")
    else:
        save_file(state_dict, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def official_logits(
    tmp_path_factory: pytest.TempPathFactory, golden_dir: Path, case_a: dict[str, torch.Tensor]
) -> torch.Tensor:
    folder = _official_folder(tmp_path_factory.mktemp("official") / "owl2", golden_dir)
    return _logits(Owl2ForCausalLM.from_pretrained(folder), case_a)


def test_save_pretrained_round_trip_keeps_logits(
    tmp_path: Path, golden_dir: Path, case_a: dict[str, torch.Tensor], official_logits: torch.Tensor
) -> None:
    model = Owl2ForCausalLM.from_pretrained(_official_folder(tmp_path / "official", golden_dir))
    model.save_pretrained(tmp_path / "ours")

    saved = {path.name for path in (tmp_path / "ours").iterdir()}
    assert "model.safetensors" in saved and not any(name.endswith(".bin") for name in saved)
    assert read_config(tmp_path / "ours")["model_type"] == "owl2"
    reloaded = Owl2ForCausalLM.from_pretrained(tmp_path / "ours")
    assert reloaded.load_report.missing == [] and reloaded.load_report.unexpected == []
    assert torch.equal(_logits(reloaded, case_a), official_logits)


def test_sharded_bin_checkpoint_in_the_official_layout_loads(
    tmp_path: Path,
    golden_dir: Path,
    official_state_dict: dict[str, torch.Tensor],
    case_a: dict[str, torch.Tensor],
    official_logits: torch.Tensor,
) -> None:
    # As the official converter shards it: decoder layers first, everything else in the last shard.
    shutil.copy(golden_dir / "config.json", tmp_path / "config.json")
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    shards: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for key, value in official_state_dict.items():
        shards[names[0] if key.startswith("model.layers.") else names[1]][key] = value
    weight_map = {}
    for name, shard in shards.items():
        torch.save(shard, tmp_path / name)
        weight_map.update(dict.fromkeys(shard, name))
    total_size = sum(value.numel() * value.element_size() for value in official_state_dict.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))

    model = Owl2ForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(model, case_a), official_logits)


_payload_ran = []


def _payload() -> None:
    _payload_ran.append(True)


class _Malicious:
    """Unpickling this calls ``_payload``: what a hostile ``.bin`` would do with ``os.system``."""

    def __reduce__(self) -> tuple:
        return (_payload, ())


def test_bin_with_a_pickled_object_is_refused(
    tmp_path: Path, golden_dir: Path, official_state_dict: dict[str, torch.Tensor]
) -> None:
    shutil.copy(golden_dir / "config.json", tmp_path / "config.json")
    torch.save({**official_state_dict, "extra": _Malicious()}, tmp_path / "pytorch_model.bin")

    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        read_state_dict(tmp_path / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        Owl2ForCausalLM.from_pretrained(tmp_path)
    assert _payload_ran == []


# ---------------------------------------------------------------------------------------------- bad checkpoints


def test_wrong_shape_is_an_error_naming_the_key(
    tmp_path: Path, golden_dir: Path, official_state_dict: dict[str, torch.Tensor]
) -> None:
    state_dict = {**official_state_dict, "lm_head.weight": torch.zeros(256, 32)}
    with pytest.raises(ValueError, match=r"lm_head\.weight: checkpoint \(256, 32\) vs model \(256, 64\)"):
        Owl2ForCausalLM.from_pretrained(_official_folder(tmp_path / "owl2", golden_dir, state_dict))


def test_strict_load_names_a_missing_key(
    tmp_path: Path, golden_dir: Path, official_state_dict: dict[str, torch.Tensor]
) -> None:
    state_dict = {key: value for key, value in official_state_dict.items() if key != "model.norm.weight"}
    folder = _official_folder(tmp_path / "owl2", golden_dir, state_dict)
    with pytest.raises(ValueError, match=r"decoder\.norm\.weight"):
        Owl2ForCausalLM.from_pretrained(folder)
    assert Owl2ForCausalLM.from_pretrained(folder, strict=False).load_report.missing == ["decoder.norm.weight"]


def test_unknown_key_is_reported_or_refused(
    tmp_path: Path, golden_dir: Path, official_state_dict: dict[str, torch.Tensor]
) -> None:
    state_dict = {**official_state_dict, "model.mystery.weight": torch.zeros(3)}
    folder = _official_folder(tmp_path / "owl2", golden_dir, state_dict)
    with pytest.raises(ValueError, match=r"model\.mystery\.weight"):
        Owl2ForCausalLM.from_pretrained(folder)
    report = Owl2ForCausalLM.from_pretrained(folder, strict=False).load_report
    assert report.unexpected == ["model.mystery.weight"] and report.missing == []


# ---------------------------------------------------------------------------------------------- decoder layouts

WITHOUT_MAM = ["decoder.modality_adaptive=false"]
MODALITY_PARTS = ("self_attn.k_proj", "self_attn.v_proj", "input_layernorm", "post_attention_layernorm")


def _layout_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "owl2.model.owl2"]


def test_official_checkpoint_into_a_decoder_without_the_mam_keeps_the_text_branch(
    golden_dir: Path, official_state_dict: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="owl2.model.owl2"):
        plain = Owl2ForCausalLM.from_pretrained(golden_dir, overrides=WITHOUT_MAM)
    assert plain.config.spec.decoder.modality_adaptive is False
    ours = plain.state_dict()
    for i in range(2):
        for part in MODALITY_PARTS:
            text = official_state_dict[f"model.layers.{i}.{part}.multiway.0.weight"]
            assert torch.equal(ours[f"decoder.layers.{i}.{part}.weight"], text), part
    report = plain.load_report
    assert report.missing == [] and report.unexpected == []
    visual = sorted(f"decoder.layers.{i}.{part}.visual.weight" for i in range(2) for part in MODALITY_PARTS)
    assert sorted(key for key in report.dropped if ".visual." in key) == visual
    assert len(report.dropped) == 6 + len(visual)  # the recomputed buffers, as without the switch
    (line,) = _layout_warnings(caplog)
    assert "keeps the text branch" in line and "drops the 8 visual copies" in line


def test_without_the_mam_text_rows_are_unchanged_and_image_rows_are_not(
    golden_dir: Path, case_a: dict[str, torch.Tensor], official_logits: torch.Tensor
) -> None:
    inputs = load_file(golden_dir / "inputs.safetensors")
    text_only = {name: inputs[f"B_text_only.{name}"] for name in ("input_ids", "attention_mask")}
    mam = Owl2ForCausalLM.from_pretrained(golden_dir)
    plain = Owl2ForCausalLM.from_pretrained(golden_dir, overrides=WITHOUT_MAM)
    torch.testing.assert_close(_logits(plain, text_only), _logits(mam, text_only), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(_logits(plain, case_a), official_logits, atol=1e-3)


def test_our_checkpoints_load_into_the_other_decoder_layout(
    tmp_path: Path, golden_dir: Path, case_a: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    mam = Owl2ForCausalLM.from_pretrained(golden_dir)
    mam.save_pretrained(tmp_path / "mam")
    plain = Owl2ForCausalLM.from_pretrained(tmp_path / "mam", overrides=WITHOUT_MAM)
    layer, source = plain.decoder.layers[0], mam.decoder.layers[0]
    assert torch.equal(layer.self_attn.v_proj.weight, source.self_attn.v_proj.text.weight)
    assert torch.equal(layer.post_attention_layernorm.weight, source.post_attention_layernorm.text.weight)

    plain.save_pretrained(tmp_path / "plain")
    assert read_config(tmp_path / "plain")["decoder"]["modality_adaptive"] is False
    assert not Owl2ForCausalLM.from_pretrained(tmp_path / "plain").config.spec.decoder.modality_adaptive
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="owl2.model.owl2"):
        back = Owl2ForCausalLM.from_pretrained(tmp_path / "plain", overrides=["decoder.modality_adaptive=true"])
    (line,) = _layout_warnings(caplog)
    assert "both modality branches" in line
    assert back.load_report.missing == [] and back.load_report.unexpected == []
    for branch in ("text", "visual"):
        copy = getattr(back.decoder.layers[1].self_attn.k_proj, branch)
        assert torch.equal(copy.weight, plain.decoder.layers[1].self_attn.k_proj.weight)
    # Identical branches: the MAM model computes what the plain one does, image tokens included.
    torch.testing.assert_close(_logits(back, case_a), _logits(plain, case_a), atol=1e-5, rtol=1e-5)


def test_llama_builds_a_decoder_without_the_mam_directly(
    llama: tuple[Path, dict[str, torch.Tensor]], hf_clip: tuple[Path, CLIPVisionModel], caplog: pytest.LogCaptureFixture
) -> None:
    spec = _spec(image_size=56).with_overrides(WITHOUT_MAM)
    with caplog.at_level(logging.WARNING, logger="owl2.model.owl2"):
        model = build_from_llama_and_clip(llama[0], hf_clip[0], spec)
    assert _layout_warnings(caplog) == []  # LLaMA's one copy is the layout itself: nothing converted
    assert all(key.startswith("abstractor.") for key in model.load_report.missing)
    ours = model.state_dict()
    for part in MODALITY_PARTS:
        assert torch.equal(ours[f"decoder.layers.1.{part}.weight"], llama[1][f"model.layers.1.{part}.weight"])


# ---------------------------------------------------------------------------------------------- LLaMA + CLIP


@pytest.fixture(scope="module")
def llama(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_config: LlamaConfig
) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config)
    _perturb_norms_and_biases(model, seed=1)
    folder = tmp_path_factory.mktemp("llama") / "llama2"
    model.save_pretrained(folder)
    return folder, {key: value.clone() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CLIPVisionModel]:
    torch.manual_seed(2)
    config = CLIPVisionConfig(
        hidden_size=CLIP_WIDTH,
        intermediate_size=CLIP_MLP,
        num_hidden_layers=CLIP_LAYERS,
        num_attention_heads=CLIP_HEADS,
        image_size=CLIP_IMAGE,
        patch_size=14,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-6,  # owl2's eps, so that outputs can be compared tightly
    )
    model = CLIPVisionModel(config).eval()
    _perturb_norms_and_biases(model, seed=3)
    folder = tmp_path_factory.mktemp("clip") / "hf_vision"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def hf_clip_full(tmp_path_factory: pytest.TempPathFactory, hf_clip: tuple[Path, CLIPVisionModel]) -> Path:
    """A whole transformers ``CLIPModel`` (image tower under ``vision_model.``, plus the text tower)."""
    vision_config = hf_clip[1].config.to_dict()
    text_config = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 64,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=8))
    model.vision_model.load_state_dict(hf_clip[1].state_dict())
    folder = tmp_path_factory.mktemp("clip") / "hf_full"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def timm_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, VisionTransformer]:
    torch.manual_seed(4)
    model = VisionTransformer(
        img_size=CLIP_IMAGE,
        patch_size=14,
        embed_dim=CLIP_WIDTH,
        depth=CLIP_LAYERS,
        num_heads=CLIP_HEADS,
        mlp_ratio=CLIP_MLP / CLIP_WIDTH,
        pre_norm=True,  # the CLIP layout: norm_pre, no patch-embedding bias
        num_classes=16,  # timm keeps CLIP's projection as this head
        act_layer=QuickGELU,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    _perturb_norms_and_biases(model, seed=5)
    path = tmp_path_factory.mktemp("clip") / "timm_vit.safetensors"
    save_file(model.state_dict(), path)
    return path, model


def _openai_names(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An OpenAI CLIP state dict (image tower + a token text tower) holding the HF image tower's tensors."""
    state = {
        "visual.class_embedding": hf["embeddings.class_embedding"],
        "visual.positional_embedding": hf["embeddings.position_embedding.weight"],
        "visual.conv1.weight": hf["embeddings.patch_embedding.weight"],
        "visual.proj": torch.randn(CLIP_WIDTH, 8),
        "positional_embedding": torch.randn(77, 16),
        "token_embedding.weight": torch.randn(64, 16),
        "transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16),
        "ln_final.weight": torch.ones(16),
        "text_projection": torch.randn(16, 8),
        "logit_scale": torch.tensor(4.6),
    }
    for p in ("weight", "bias"):
        state[f"visual.ln_pre.{p}"] = hf[f"pre_layrnorm.{p}"]
        state[f"visual.ln_post.{p}"] = hf[f"post_layernorm.{p}"]
        for i in range(CLIP_LAYERS):
            old, new = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
            projections = [hf[f"{old}self_attn.{x}_proj.{p}"] for x in "qkv"]
            state[f"{new}attn.in_proj_{p}"] = torch.cat(projections)  # nn.MultiheadAttention's packing
            for ours, theirs in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                state[f"{new}{ours}.{p}"] = hf[f"{old}{theirs}.{p}"]
    return state


@pytest.fixture(scope="module")
def openai_clip(tmp_path_factory: pytest.TempPathFactory, hf_clip: tuple[Path, CLIPVisionModel]) -> Path:
    state = _openai_names({key: value.clone() for key, value in hf_clip[1].state_dict().items()})
    path = tmp_path_factory.mktemp("clip") / "ViT-tiny.bin"
    torch.save(state, path)
    return path


def _assert_decoder_is_llama(model: Owl2ForCausalLM, llama: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    for key in ("embed_tokens.weight", "norm.weight"):
        assert torch.equal(ours[f"decoder.{key}"], llama[f"model.{key}"]), key
    assert torch.equal(ours["lm_head.weight"], llama["lm_head.weight"])
    for i in range(2):
        theirs, mine = f"model.layers.{i}.", f"decoder.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert torch.equal(ours[f"{mine}{name}.weight"], llama[f"{theirs}{name}.weight"]), name
        for name in ("self_attn.k_proj", "self_attn.v_proj", "input_layernorm", "post_attention_layernorm"):
            for branch in ("text", "visual"):
                assert torch.equal(ours[f"{mine}{name}.{branch}.weight"], llama[f"{theirs}{name}.weight"]), name


@pytest.mark.parametrize("layout", ["hf-bare", "hf", "timm", "openai"])
def test_llama_and_clip_build_resamples_positions_and_only_leaves_the_abstractor_new(
    layout: str,
    llama: tuple[Path, dict[str, torch.Tensor]],
    hf_clip: tuple[Path, CLIPVisionModel],
    hf_clip_full: Path,
    timm_clip: tuple[Path, VisionTransformer],
    openai_clip: Path,
) -> None:
    clip_path = {"hf-bare": hf_clip[0], "hf": hf_clip_full, "timm": timm_clip[0], "openai": openai_clip}[layout]
    source = read_state_dict(clip_path)
    assert detect_clip_layout(source) == layout

    model = build_from_llama_and_clip(llama[0], clip_path, _spec(image_size=56))

    report = model.load_report
    abstractor = sorted(key for key in model.state_dict() if key.startswith("abstractor."))
    assert report.missing == abstractor and report.unexpected == []
    assert all(torch.isfinite(model.state_dict()[key]).all() for key in abstractor)
    _assert_decoder_is_llama(model, llama[1])

    # 2x2 CLIP grid -> the 4x4 grid of 56 px images; the CLS row is kept as it is.
    pos_key, cls_key = {
        "hf-bare": ("embeddings.position_embedding.weight", "embeddings.class_embedding"),
        "hf": ("vision_model.embeddings.position_embedding.weight", "vision_model.embeddings.class_embedding"),
        "timm": ("pos_embed", "cls_token"),
        "openai": ("visual.positional_embedding", "visual.class_embedding"),
    }[layout]
    table = source[pos_key].reshape(1, -1, CLIP_WIDTH)
    assert model.vision.pos_embed.shape == (1, 17, CLIP_WIDTH)
    assert torch.equal(model.vision.pos_embed.data, resample_position_embedding(table, 4))
    assert torch.equal(model.vision.cls_token.data, source[cls_key].reshape(1, 1, CLIP_WIDTH))

    expected_dropped = {
        "hf-bare": set(),
        "hf": {"logit_scale", "text_projection.weight", "visual_projection.weight"},
        "timm": {"head.weight", "head.bias"},
        "openai": {
            "visual.proj",
            "positional_embedding",
            "token_embedding.weight",
            "ln_final.weight",
            "transformer.resblocks.0.attn.in_proj_weight",
            "text_projection",
            "logit_scale",
        },
    }[layout]
    assert expected_dropped <= set(report.dropped)
    if layout == "hf":
        assert any(key.startswith("text_model.") for key in report.dropped)


def test_vision_encoder_matches_transformers_clip(
    llama: tuple[Path, dict[str, torch.Tensor]], hf_clip: tuple[Path, CLIPVisionModel], openai_clip: Path
) -> None:
    folder, reference = hf_clip
    model = build_from_llama_and_clip(llama[0], folder, _spec(), image_size=CLIP_IMAGE)
    assert model.config.spec.vision.image_size == CLIP_IMAGE  # the argument replaced the spec's 56
    images = torch.randn(2, 3, CLIP_IMAGE, CLIP_IMAGE, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours, _ = model.vision(images)
        # CLIPVisionModel's last_hidden_state precedes post_layernorm (only its pooler applies it).
        theirs = reference.post_layernorm(reference(pixel_values=images).last_hidden_state)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    # The OpenAI naming of the same tensors gives the very same encoder.
    from_openai = build_from_llama_and_clip(llama[0], openai_clip, _spec(), image_size=CLIP_IMAGE)
    for key, value in model.vision.state_dict().items():
        assert torch.equal(from_openai.vision.state_dict()[key], value), key


def test_vision_encoder_matches_timm_clip(
    llama: tuple[Path, dict[str, torch.Tensor]], timm_clip: tuple[Path, VisionTransformer]
) -> None:
    path, reference = timm_clip
    model = build_from_llama_and_clip(llama[0], path, _spec(image_size=CLIP_IMAGE))
    images = torch.randn(2, 3, CLIP_IMAGE, CLIP_IMAGE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(model.vision(images)[0], reference.forward_features(images), rtol=1e-5, atol=1e-5)


def test_decoder_section_is_derived_from_the_llama_config(llama: tuple[Path, dict[str, torch.Tensor]]) -> None:
    derived = decoder_config_from_llama(read_config(llama[0]))
    assert derived == DecoderConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
    )
    # transformers 4 spelling of the RoPE base.
    legacy = {**read_config(llama[0]), "rope_theta": 5e5}
    del legacy["rope_parameters"]
    assert decoder_config_from_llama(legacy).rope_theta == 5e5
    with pytest.raises(ConfigError, match="rope_scaling|RoPE scaling"):
        decoder_config_from_llama({**legacy, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ConfigError, match="model_type 'mistral'"):
        decoder_config_from_llama({**legacy, "model_type": "mistral"})


def test_llama_that_does_not_match_the_spec_is_refused(
    llama: tuple[Path, dict[str, torch.Tensor]], timm_clip: tuple[Path, VisionTransformer]
) -> None:
    spec = ModelConfig.from_preset("debug", ["decoder.num_kv_heads=2", "decoder.num_layers=3"])
    with pytest.raises(ConfigError, match=r"num_hidden_layers=2 does not match the spec's decoder\.num_layers=3"):
        build_from_llama_and_clip(llama[0], timm_clip[0], spec)


def test_incomplete_or_unknown_clip_weights_are_refused(
    tmp_path: Path, llama: tuple[Path, dict[str, torch.Tensor]], timm_clip: tuple[Path, VisionTransformer]
) -> None:
    state = {key: value.clone() for key, value in timm_clip[1].state_dict().items()}
    truncated = {key: value for key, value in state.items() if key != "blocks.1.mlp.fc2.bias"}
    save_file(truncated, tmp_path / "truncated.safetensors")
    with pytest.raises(ValueError, match=r"vision\.blocks\.1\.mlp\.fc2\.bias"):
        build_from_llama_and_clip(llama[0], tmp_path / "truncated.safetensors", _spec())

    save_file({**state, "blocks.0.attn.mystery": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.mystery"):
        build_from_llama_and_clip(llama[0], tmp_path / "extra.safetensors", _spec())

    with pytest.raises(ValueError, match="no known CLIP vision layout"):
        detect_clip_layout({"model.embed_tokens.weight": torch.zeros(1)})


def test_split_qkv_is_fused_in_q_k_v_order_and_must_be_complete(hf_clip: tuple[Path, CLIPVisionModel]) -> None:
    state = load_file(hf_clip[0] / "model.safetensors")
    fused = convert_clip(state, _spec(image_size=CLIP_IMAGE))
    layer = "encoder.layers.1.self_attn."
    expected = torch.cat([state[f"{layer}{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(fused.state_dict["vision.blocks.1.attn.qkv.weight"], expected)
    assert not any("@" in key for key in fused.state_dict)

    partial_parts = Conversion(
        state_dict={
            "vision.blocks.0.attn.qkv.bias@q": torch.zeros(4),
            "vision.blocks.0.attn.qkv.bias@v": torch.zeros(4),
        }
    )
    with pytest.raises(ValueError, match=r"vision\.blocks\.0\.attn\.qkv\.bias.*\['k'\]"):
        fuse_qkv_parts(partial_parts)


def test_openai_table_keeps_the_text_tower_out() -> None:
    assert target_keys("transformer.resblocks.11.mlp.c_fc.weight", CLIP_OPENAI) == ()
    assert target_keys("visual.transformer.resblocks.11.mlp.c_fc.weight", CLIP_OPENAI) == (
        "vision.blocks.11.mlp.fc1.weight",
    )
    assert target_keys("visual.attnpool.weight", CLIP_OPENAI) is None  # a ResNet CLIP: not ours


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_is_refused_with_a_way_out(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), tmp_path / "ViT-L-14.pt")
    with pytest.raises(ValueError, match=r"TorchScript archive.*torch.jit.load\(path\).state_dict\(\)"):
        read_state_dict(tmp_path / "ViT-L-14.pt")


def test_two_checkpoint_keys_for_one_weight_are_refused(official_state_dict: dict[str, torch.Tensor]) -> None:
    # A file mixing the released names with LLaMA's own for the same decoder weight.
    mixed = {"model.norm.weight": official_state_dict["model.norm.weight"], "lm_head.weight": torch.zeros(256, 64)}
    mixed["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    mixed["model.layers.0.self_attn.k_proj.multiway.0.weight"] = torch.zeros(64, 64)
    with pytest.raises(ValueError, match=r"both map to decoder.layers.0.self_attn.k_proj.text.weight"):
        convert(mixed, OFFICIAL + LLAMA, _spec())


def test_bfloat16_build_keeps_fixed_tables_in_float32(
    llama: tuple[Path, dict[str, torch.Tensor]], hf_clip: tuple[Path, CLIPVisionModel]
) -> None:
    model = build_from_llama_and_clip(llama[0], hf_clip[0], _spec(image_size=56), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.decoder.rotary_emb.inv_freq.dtype == torch.float32
    assert model.abstractor.image_pos.dtype == torch.float32
    with torch.no_grad():
        out = model(torch.tensor([[1, -200, 5, 6]]), images=torch.randn(1, 3, 56, 56, dtype=torch.bfloat16))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


def test_cli_build_writes_a_loadable_model(
    tmp_path: Path, llama: tuple[Path, dict[str, torch.Tensor]], hf_clip: tuple[Path, CLIPVisionModel]
) -> None:
    from owl2.cli import main

    out = tmp_path / "fresh"
    args = ["model", "build", "--llama", str(llama[0]), "--clip", str(hf_clip[0]), "--out", str(out)]
    assert main([*args, "--preset", "debug", "decoder.num_kv_heads=2"]) == 0
    model = Owl2ForCausalLM.from_pretrained(out)
    _assert_decoder_is_llama(model, llama[1])
    # The decoder must match the LLaMA folder: a preset that disagrees is refused before any work.
    assert main([*args, "--preset", "debug"]) == 2
