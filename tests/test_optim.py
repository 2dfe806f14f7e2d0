"""The stage spec and the optimizer policy: exact trainable sets, parameter groups, LLRD, schedule, checks."""

import socket
import subprocess
import sys

import pytest
import torch
from timm.models._manipulate import group_parameters
from torch import nn

from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ConfigError, ModelConfig, OptimConfig, StageConfig
from owl2.model import Owl2Config, Owl2ForCausalLM
from owl2.train.optim import (
    OptimizerSetupError,
    apply_trainable,
    build_optimizer,
    build_param_groups,
    canonical_name,
    expected_trainable,
    format_group_table,
    group_table_rows,
    lr_factor,
    trainable_names,
    verify_optimizer_setup,
    warmup_cosine,
)

STAGE1 = ["vision", "abstractor", "decoder.visual"]
# The debug preset has 2 decoder layers; each has four modality copies (2 norms, K, V).
VISUAL_COPIES = {
    f"decoder.layers.{i}.{module}.visual.weight"
    for i in range(2)
    for module in ("input_layernorm", "post_attention_layernorm", "self_attn.k_proj", "self_attn.v_proj")
}


def _model(*overrides: str) -> Owl2ForCausalLM:
    torch.manual_seed(0)
    return Owl2ForCausalLM(Owl2Config.from_spec(ModelConfig.from_preset("debug", list(overrides))))


@pytest.fixture
def model() -> Owl2ForCausalLM:
    return _model()


def _names(model: nn.Module, prefix: str = "") -> set[str]:
    return {name for name, _ in model.named_parameters() if name.startswith(prefix)}


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {group["name"]: group for group in groups}


class CompiledLike(nn.Module):
    """What ``torch.compile`` returns, as far as names go: the model under ``_orig_mod``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


# ------------------------------------------------------------------------------------------ trainable sets


def test_stage1_trains_vision_abstractor_and_exactly_the_visual_copies(model):
    apply_trainable(model, STAGE1)
    trainable = trainable_names(model)
    decoder_side = {name for name in trainable if not name.startswith(("vision.", "abstractor."))}
    assert decoder_side == VISUAL_COPIES
    assert len(decoder_side) == 8
    assert trainable == _names(model, "vision.") | _names(model, "abstractor.") | VISUAL_COPIES
    frozen = _names(model) - trainable
    for name in (
        "decoder.embed_tokens.weight",
        "lm_head.weight",
        "decoder.norm.weight",
        "decoder.layers.0.self_attn.q_proj.weight",
        "decoder.layers.0.self_attn.o_proj.weight",
        "decoder.layers.1.mlp.gate_proj.weight",
        "decoder.layers.1.self_attn.k_proj.text.weight",
        "decoder.layers.0.input_layernorm.text.weight",
    ):
        assert name in frozen
    assert not any(".text." in name for name in trainable)
    assert expected_trainable(model, STAGE1) == trainable


def test_stage2_all_trains_everything(model):
    apply_trainable(model, STAGE1)
    apply_trainable(model, ["all"])
    assert trainable_names(model) == _names(model)


@pytest.mark.parametrize(
    ("part", "expected"),
    [
        ("vision", lambda m: _names(m, "vision.")),
        ("abstractor", lambda m: _names(m, "abstractor.")),
        ("decoder", lambda m: _names(m, "decoder.")),
        ("decoder.visual", lambda m: VISUAL_COPIES),
        ("lm_head", lambda m: {"lm_head.weight"}),
        ("all", lambda m: _names(m)),
    ],
)
def test_each_part_alone(model, part, expected):
    apply_trainable(model, ["all"])
    apply_trainable(model, [part])  # freezes what the previous spec had on
    assert trainable_names(model) == expected(model)


def test_decoder_part_is_embeddings_layers_and_norm_but_not_the_head(model):
    apply_trainable(model, ["decoder"])
    trainable = trainable_names(model)
    assert {"decoder.embed_tokens.weight", "decoder.norm.weight"} | VISUAL_COPIES <= trainable
    assert "lm_head.weight" not in trainable
    # Per layer: 2 norms x 2 copies, q, k x 2, v x 2, o, 3 MLP matrices = 13 tensors.
    assert len(trainable) == 1 + 2 * 13 + 1


def test_stage2_with_a_frozen_vision_encoder_leaves_it_without_gradients_or_optimizer_state(model):
    """The ablation's stage 2 (``trainable: [abstractor, decoder, lm_head]``): everything but the ViT trains."""
    parts = ["abstractor", "decoder", "lm_head"]
    apply_trainable(model, parts)
    assert trainable_names(model) == _names(model) - _names(model, "vision.")
    optimizer, groups = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0))
    verify_optimizer_setup(model, optimizer, parts)
    assert {group["module"] for group in groups} == {"abstractor", "decoder"}

    before = {name: p.detach().clone() for name, p in model.vision.named_parameters()}
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6, 7, 8]])
    model.train()
    model(ids, images=torch.randn(1, 3, 56, 56), labels=ids.masked_fill(ids < 0, IGNORE_INDEX)).loss.backward()
    optimizer.step()
    vision = list(model.vision.parameters())
    assert all(param.grad is None for param in vision)
    assert not any(param in optimizer.state for param in vision)
    assert len(optimizer.state) == len(trainable_names(model))  # every other parameter took a step
    assert all(torch.equal(before[name], p) for name, p in model.vision.named_parameters())
    assert model.abstractor.queries.grad.abs().sum() > 0  # gradients still reach the abstractor


def test_decoder_visual_selects_nothing_without_the_mam():
    model = _model("decoder.modality_adaptive=false")
    assert expected_trainable(model, ["decoder.visual"]) == set()
    assert expected_trainable(model, STAGE1) == _names(model, "vision.") | _names(model, "abstractor.")


def test_decoder_visual_is_what_the_model_declares(model, monkeypatch):
    assert model.visual_branch_parameter_names() == VISUAL_COPIES
    # The policy asks the model (through wrappers), it does not look for modality copies itself.
    keys_only = {name for name in VISUAL_COPIES if "_proj." in name}
    monkeypatch.setattr(model, "visual_branch_parameter_names", lambda: keys_only)
    assert expected_trainable(CompiledLike(model), ["decoder.visual"]) == keys_only
    with pytest.raises(TypeError, match=r"visual_branch_parameter_names\(\) hook"):
        expected_trainable(nn.Linear(2, 2), ["decoder.visual"])


def test_optimizer_policy_imports_no_model_code():
    script = "import sys, owl2.train.optim; print(sorted(m for m in sys.modules if m.startswith('owl2.model')))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_unknown_parts_are_rejected(model):
    with pytest.raises(ConfigError, match="unknown part"):
        StageConfig(trainable=["decoder.text"])
    with pytest.raises(ValueError, match="subset of"):
        apply_trainable(model, ["decoder.text"])
    with pytest.raises(ValueError, match="subset of"):
        apply_trainable(model, [])
    with pytest.raises(TypeError, match="list of names"):
        apply_trainable(model, "vision")


# ------------------------------------------------------------------------------------------ groups


def test_every_trainable_parameter_is_in_exactly_one_group(model):
    apply_trainable(model, STAGE1)
    groups = build_param_groups(model, OptimConfig())
    ids = [id(param) for group in groups for param in group["params"]]
    assert len(ids) == len(set(ids))
    params = dict(model.named_parameters())
    assert set(ids) == {id(p) for p in params.values() if p.requires_grad}
    for group in groups:
        assert [params[name] for name in group["param_names"]] == group["params"]
    verify_optimizer_setup(model, groups, STAGE1)


def test_no_weight_decay_exactly_on_norms_biases_embeddings_and_learned_tokens(model):
    exempt = model.no_weight_decay()
    # Independently: every 1-D tensor (norm weights and biases, biases) plus the token-like tensors.
    tokens = {
        "decoder.embed_tokens.weight",
        "vision.cls_token",
        "vision.pos_embed",
        "abstractor.queries",
        "abstractor.eos",
    }
    assert exempt == {name for name, p in model.named_parameters() if p.ndim == 1} | tokens
    assert len(exempt) == 65
    for name in (
        "vision.norm_pre.weight",
        "vision.blocks.1.norm2.bias",
        "vision.blocks.0.attn.qkv.bias",
        "abstractor.layers.0.ffn.norm.weight",
        "abstractor.proj.bias",
        "decoder.layers.1.input_layernorm.text.weight",
        "decoder.layers.1.input_layernorm.visual.weight",
        "decoder.norm.weight",
    ):
        assert name in exempt

    apply_trainable(model, ["all"])
    groups = build_param_groups(model, OptimConfig(weight_decay=0.05))
    for group in groups:
        names = set(group["param_names"])
        if group["name"].endswith(".no_decay"):
            assert group["weight_decay"] == 0.0 and names <= exempt
        else:
            assert group["weight_decay"] == 0.05 and not names & exempt
    assert sum(len(g["params"]) for g in groups if g["weight_decay"] == 0) == 65


def test_layer_wise_decay_and_module_scales_are_exact(model):
    apply_trainable(model, ["all"])
    optim = OptimConfig(lr=1e-3, layer_decay=0.9, vision_lr_scale=0.5, abstractor_lr_scale=0.2, decoder_lr_scale=0.25)
    groups = _by_name(build_param_groups(model, optim))
    # 2 blocks: embeddings 0.9^3, block 0 0.9^2, block 1 0.9, final norm 1 (no decayed tensor there).
    expected = {
        "vision.layer_00.decay": 0.5 * 0.729,
        "vision.layer_00.no_decay": 0.5 * 0.729,
        "vision.layer_01.decay": 0.5 * 0.81,
        "vision.layer_01.no_decay": 0.5 * 0.81,
        "vision.layer_02.decay": 0.5 * 0.9,
        "vision.layer_02.no_decay": 0.5 * 0.9,
        "vision.layer_03.no_decay": 0.5,
        "abstractor.decay": 0.2,
        "abstractor.no_decay": 0.2,
        "decoder.decay": 0.25,
        "decoder.no_decay": 0.25,
    }
    assert list(groups) == list(expected)
    for name, scale in expected.items():
        assert groups[name]["lr_scale"] == pytest.approx(scale, rel=1e-12), name
        assert groups[name]["lr"] == pytest.approx(1e-3 * scale, rel=1e-12), name
    assert set(groups["vision.layer_00.decay"]["param_names"]) == {"vision.patch_embed.proj.weight"}
    assert set(groups["vision.layer_00.no_decay"]["param_names"]) == {
        "vision.cls_token",
        "vision.pos_embed",
        "vision.norm_pre.weight",
        "vision.norm_pre.bias",
    }
    assert set(groups["vision.layer_03.no_decay"]["param_names"]) == {"vision.norm.weight", "vision.norm.bias"}
    assert all(name.startswith("vision.blocks.1.") for name in groups["vision.layer_02.decay"]["param_names"])
    assert "lm_head.weight" in groups["decoder.decay"]["param_names"]


def test_vit_l_depth_gives_the_reference_scales():
    model = _model("vision.num_layers=24")
    info = model.param_group_info
    assert info("vision.pos_embed") == ("vision", 0, 25)
    assert info("vision.blocks.23.mlp.fc2.weight") == ("vision", 24, 25)
    assert info("vision.norm.bias") == ("vision", 25, 25)
    apply_trainable(model, ["vision"])
    groups = _by_name(build_param_groups(model, OptimConfig(layer_decay=0.9)))
    assert groups["vision.layer_25.no_decay"]["lr_scale"] == 1.0
    assert groups["vision.layer_24.decay"]["lr_scale"] == pytest.approx(0.9, rel=1e-12)
    assert groups["vision.layer_00.decay"]["lr_scale"] == pytest.approx(0.9**25, rel=1e-12)
    assert groups["vision.layer_00.decay"]["lr_scale"] == pytest.approx(0.0718, abs=1e-4)


def test_vision_layer_ids_agree_with_timm_group_matcher(model):
    # timm's matcher puts the final norm into the last block's group; ours gives it its own layer id.
    timm_ids = group_parameters(model.vision, model.vision.group_matcher(), reverse=True)
    for name, timm_id in timm_ids.items():
        module, layer_id, num_layers = model.param_group_info(f"vision.{name}")
        assert module == "vision" and num_layers == 3
        assert layer_id == (num_layers if name.startswith("norm.") else timm_id), name
    for name in ("decoder.embed_tokens.weight", "lm_head.weight", "abstractor.queries"):
        assert model.param_group_info(name)[1:] == (0, 0)
    with pytest.raises(KeyError):
        model.param_group_info("vision.head.weight")
    with pytest.raises(KeyError):
        model.param_group_info("projector.weight")


def test_group_table_lists_every_group_and_the_total(model):
    apply_trainable(model, STAGE1)
    optimizer, groups = build_optimizer(model, OptimConfig(lr=1e-4))
    warmup_cosine(optimizer, 10, 100, 0.0)  # the table shows the peak LR, not the warm-up's first step
    rows = group_table_rows(groups)
    assert [row["group"] for row in rows] == [group["name"] for group in groups]
    assert rows[0]["lr"] == pytest.approx(1e-4 * 0.9**3)
    assert sum(row["params"] for row in rows) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    table = format_group_table(groups)
    lines = table.splitlines()
    header = ["group", "module", "layer id", "lr scale", "lr", "weight decay", "tensors", "params"]
    assert lines[0].split() == " ".join(header).split()
    assert len(lines) == len(groups) + 4
    total = sum(len(group["params"]) for group in groups)
    assert lines[-1].split()[:2] == ["total", str(total)]
    assert "decoder.decay" in table and "vision.layer_03.no_decay" in table


# ------------------------------------------------------------------------------------------ schedule


def test_warmup_cosine_exact_values_for_two_scales(model):
    apply_trainable(model, ["vision", "abstractor"])
    optim = OptimConfig(lr=1e-3, layer_decay=0.5, abstractor_lr_scale=0.1)
    optimizer, groups = build_optimizer(model, optim)
    scheduler = warmup_cosine(optimizer, warmup_steps=4, max_steps=12, min_lr_ratio=0.1)
    embeddings = next(i for i, g in enumerate(groups) if g["name"] == "vision.layer_00.decay")  # 0.5^3
    abstractor = next(i for i, g in enumerate(groups) if g["name"] == "abstractor.decay")  # 0.1
    seen = {}
    for step in range(16):
        seen[step] = [optimizer.param_groups[i]["lr"] for i in (embeddings, abstractor)]
        optimizer.step()
        scheduler.step()
    # step: factor. Warm-up (s+1)/4; cosine 0.1 + 0.9 * (1 + cos(pi * (s-4)/8)) / 2; held at 0.1 after 12.
    factors = {0: 0.25, 3: 1.0, 4: 1.0, 8: 0.55, 12: 0.1, 15: 0.1}
    for step, factor in factors.items():
        assert seen[step][0] == pytest.approx(1e-3 * 0.125 * factor, rel=1e-12), step
        assert seen[step][1] == pytest.approx(1e-3 * 0.1 * factor, rel=1e-12), step
        assert lr_factor(step, 4, 12, 0.1) == pytest.approx(factor, rel=1e-12)


def test_schedule_edges():
    assert lr_factor(0, 0, 10, 0.0) == 1.0
    assert lr_factor(10, 0, 10, 0.0) == pytest.approx(0.0, abs=1e-15)
    assert lr_factor(9, 10, 10, 0.2) == 1.0  # warm-up filling the whole stage
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(optimizer, 1000, 10, 0.0)
    with pytest.raises(ValueError, match="max_steps"):
        warmup_cosine(optimizer, 0, 0, 0.0)


# ------------------------------------------------------------------------------------------ verification


@pytest.fixture
def process_group():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_verify_passes_after_ddp(model, process_group):
    apply_trainable(model, STAGE1)
    optimizer, _ = build_optimizer(model, OptimConfig())
    wrapped = nn.parallel.DistributedDataParallel(model)
    assert next(name for name, _ in wrapped.named_parameters()).startswith("module.")
    verify_optimizer_setup(wrapped, optimizer, STAGE1)
    assert expected_trainable(wrapped, STAGE1) == expected_trainable(model, STAGE1)


def test_verify_passes_after_compile(model):
    apply_trainable(model, STAGE1)
    optimizer, _ = build_optimizer(model, OptimConfig())
    verify_optimizer_setup(CompiledLike(model), optimizer, STAGE1)
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until a forward
    assert next(name for name, _ in compiled.named_parameters()).startswith("_orig_mod.")
    verify_optimizer_setup(compiled, optimizer, STAGE1)
    # Groups built through the wrapper carry the bare names.
    _, groups = build_optimizer(compiled, OptimConfig())
    assert not any("_orig_mod" in name for group in groups for name in group["param_names"])


def test_wrapper_components_are_dropped_from_names():
    assert canonical_name("module._orig_mod.decoder.norm.weight") == "decoder.norm.weight"
    assert canonical_name("_orig_mod.module.lm_head.weight") == "lm_head.weight"
    assert (
        canonical_name("decoder.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight")
        == "decoder.layers.0.mlp.up_proj.weight"
    )
    assert canonical_name("_fsdp_wrapped_module.vision.cls_token") == "vision.cls_token"


def test_verify_fails_when_a_parameter_is_frozen_after_grouping(model):
    apply_trainable(model, STAGE1)
    optimizer, _ = build_optimizer(model, OptimConfig())
    model.decoder.layers[1].self_attn.v_proj.visual.weight.requires_grad_(False)
    with pytest.raises(OptimizerSetupError) as error:
        verify_optimizer_setup(model, optimizer, STAGE1)
    message = str(error.value)
    assert "1 parameter(s) of the stage are frozen: decoder.layers.1.self_attn.v_proj.visual.weight" in message
    assert "1 frozen parameter(s) are in a group: decoder.layers.1.self_attn.v_proj.visual.weight (in " in message


def test_verify_fails_when_a_group_misses_a_parameter(model):
    apply_trainable(model, STAGE1)
    groups = build_param_groups(model, OptimConfig())
    groups[0]["params"].pop(0)
    groups[0]["param_names"].pop(0)
    with pytest.raises(OptimizerSetupError, match=r"1 trainable parameter\(s\) are in no group: vision.patch_embed"):
        verify_optimizer_setup(model, groups, STAGE1)


def test_verify_fails_when_a_parameter_is_in_two_groups(model):
    apply_trainable(model, STAGE1)
    groups = build_param_groups(model, OptimConfig())
    groups[-1]["params"].append(groups[0]["params"][0])
    with pytest.raises(OptimizerSetupError) as error:
        verify_optimizer_setup(model, groups, STAGE1)
    message = str(error.value)
    repeated = "vision.patch_embed.proj.weight (in vision.layer_00.decay, decoder.no_decay)"
    assert f"1 parameter(s) are in more than one group: {repeated}" in message
    assert f"group {groups[-1]['name']}: param_names do not name its tensors" in message


def test_verify_fails_on_extra_trainable_and_foreign_tensors(model):
    apply_trainable(model, STAGE1)
    optimizer, _ = build_optimizer(model, OptimConfig())
    model.lm_head.weight.requires_grad_(True)
    optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "param_names": ["stray"], "name": "stray"})
    with pytest.raises(OptimizerSetupError) as error:
        verify_optimizer_setup(model, optimizer, STAGE1)
    message = str(error.value)
    assert "1 parameter(s) train outside the stage's parts: lm_head.weight" in message
    assert "1 trainable parameter(s) are in no group: lm_head.weight" in message
    assert "group stray holds 1 tensor(s) that are not parameters of the model" in message


# ------------------------------------------------------------------------------------------ official bugs


def test_per_module_lr_reaches_the_abstractor(model):
    """The official ``--visual_abstractor_lr`` selected parameters by a name that matched nothing."""
    apply_trainable(model, ["all"])
    base = _by_name(build_param_groups(model, OptimConfig(lr=1e-3, weight_decay=0.0)))
    optimizer, groups = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.0, abstractor_lr_scale=0.2))
    for group in groups:
        scale = 0.2 if group["module"] == "abstractor" else 1.0
        assert group["lr"] == pytest.approx(base[group["name"]]["lr"] * scale, rel=1e-12)
    assert {g["module"] for g in groups if g["lr"] != base[g["name"]]["lr"]} == {"abstractor"}
    # And the optimizer uses it: Adam's first update is lr * sign(grad) (up to eps).
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    moved = {name: (before[name] - p.detach()).abs().mean().item() for name, p in model.named_parameters()}
    assert moved["abstractor.queries"] == pytest.approx(1e-3 * 0.2, rel=1e-4)
    assert moved["abstractor.layers.1.q_proj.weight"] == pytest.approx(1e-3 * 0.2, rel=1e-4)
    assert moved["decoder.layers.0.mlp.up_proj.weight"] == pytest.approx(1e-3, rel=1e-4)
    assert moved["vision.blocks.0.attn.qkv.weight"] == pytest.approx(1e-3 * 0.81, rel=1e-4)


def test_freezing_survives_the_optimizer_and_a_training_step(model):
    """The official LoRA path called ``requires_grad_(True)`` on everything after freezing."""
    apply_trainable(model, STAGE1)
    frozen_before = _names(model) - trainable_names(model)
    optimizer, _ = build_optimizer(model, OptimConfig(lr=1e-2))
    verify_optimizer_setup(model, optimizer, STAGE1)
    assert _names(model) - trainable_names(model) == frozen_before

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6, 7, 8]])
    labels = ids.masked_fill(ids < 0, IGNORE_INDEX)
    images = torch.randn(1, 3, 56, 56)
    model.train()
    model(ids, images=images, labels=labels, use_cache=False).loss.backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert not changed & frozen_before
    assert VISUAL_COPIES <= changed
    assert "abstractor.queries" in changed and "vision.blocks.1.mlp.fc2.weight" in changed
