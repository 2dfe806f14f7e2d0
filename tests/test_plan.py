"""``owl2 plan``: the FLOP rule against PyTorch's FLOP counter, the memory estimate against measured training steps,
the 7B recipe's verdicts, the GPU table and the training pre-check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from owl2.cli import main
from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ConfigError, ModelConfig, load_experiment
from owl2.model.owl2 import Owl2Config, Owl2ForCausalLM, count_labels
from owl2.plan.flops import FlopModel, Flops, Trainable
from owl2.plan.gpus import GPUS, UnknownGPU, peak_tflops
from owl2.plan.memory import Workload, estimate_memory
from owl2.plan.report import plan_stage, stage_parameters
from owl2.train.optim import apply_trainable
from owl2.train.parallel import apply_activation_checkpointing
from owl2.train.trainer import check_memory_plan

PIPELINE_7B = Path(__file__).resolve().parents[1] / "experiments" / "owl2_7b" / "pipeline.yaml"
PIPELINE_TINY = PIPELINE_7B.parents[1] / "tiny_cpu" / "pipeline.yaml"
STAGE1 = ["vision", "abstractor", "decoder.visual"]


def _batch(spec: ModelConfig, rows: int, text: int, image_size: int) -> dict:
    ids = torch.randint(3, spec.decoder.vocab_size - 1, (rows, text + 1))
    ids[:, 1] = IMAGE_TOKEN_INDEX  # one image after the first token of each row; rows of equal length (no padding)
    images = torch.randn(rows, 3, image_size, image_size)
    return {"input_ids": ids, "images": images, "labels": ids.clamp(min=0), "image_counts": [1] * rows}


# ------------------------------------------------------------------------------------------ FLOPs


MLP, NO_MAM = ["projector=mlp"], ["decoder.modality_adaptive=false"]
FROZEN_VISION = ["abstractor", "decoder", "lm_head"]  # the frozen-ViT ablation's stage 2


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("parts", [STAGE1, ["all"]], ids=["stage1", "stage2"])
def test_flop_rule_matches_the_flop_counter(parts: list[str], checkpointing: bool) -> None:
    _check_flop_rule(ModelConfig.from_preset("tiny-cpu"), parts, checkpointing)


@pytest.mark.parametrize(
    ("switches", "parts", "checkpointing"),
    [
        (MLP, STAGE1, False),
        (MLP, ["all"], True),
        (MLP, ["abstractor"], False),  # LLaVA's stage 1: the projector alone
        (MLP, FROZEN_VISION, False),
        (NO_MAM, STAGE1, False),  # decoder.visual selects nothing: the decoder is frozen, gradients pass
        (NO_MAM, ["all"], True),  # nothing routed: the down projection is not recomputed
        ([], FROZEN_VISION, True),
    ],
    ids=[
        "mlp-stage1",
        "mlp-stage2-ckpt",
        "mlp-projector",
        "mlp-frozen-vit",
        "no_mam-stage1",
        "no_mam-stage2-ckpt",
        "frozen-vit-ckpt",
    ],
)
def test_flop_rule_follows_the_ablation_switches(switches: list[str], parts: list[str], checkpointing: bool) -> None:
    _check_flop_rule(ModelConfig.from_preset("tiny-cpu", switches), parts, checkpointing)


def _check_flop_rule(spec: ModelConfig, parts: list[str], checkpointing: bool) -> None:
    torch.manual_seed(0)
    model = Owl2ForCausalLM(Owl2Config.from_spec(spec))
    apply_trainable(model, parts)
    model.train()
    if checkpointing:
        apply_activation_checkpointing(model)
    rows, text = 2, 40
    # The CPU's fused attention is invisible to FlopCounterMode; the math backend runs it as counted matmuls.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**_batch(spec, rows, text, spec.vision.image_size), use_cache=False).loss.backward()
    counted = counter.get_total_flops()

    flops = FlopModel(spec, parts, spec.vision.image_size, checkpointing).batch([text] * rows, [1] * rows)
    # Exact: the counter counts matmuls only, as the rule does. A loose tolerance would hide a wrong projector
    # term, a few percent of this tiny model's work.
    assert flops.hardware == pytest.approx(counted, rel=1e-9)
    # The model count leaves out the upper triangle of causal attention and the unused K/V copy.
    assert flops.model < flops.hardware


def test_hardware_flops_count_the_lm_head_on_label_positions_only() -> None:
    spec = ModelConfig.from_preset("tiny-cpu")
    torch.manual_seed(0)
    model = Owl2ForCausalLM(Owl2Config.from_spec(spec))
    apply_trainable(model, ["all"])
    model.train()
    rows, text = 2, 40
    batch = _batch(spec, rows, text, spec.vision.image_size)
    batch["labels"][:, : text // 2] = IGNORE_INDEX  # a prompt: its first half is not supervised
    labels = count_labels(batch["input_ids"], batch["labels"])
    assert labels == [text // 2 + 1] * rows  # the image placeholder's label is not one
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch, use_cache=False, label_counts=labels).loss.backward()
    counted = counter.get_total_flops()

    rule = FlopModel(spec, ["all"], spec.vision.image_size)
    every_token, labelled = rule.batch([text] * rows, [1] * rows), rule.batch([text] * rows, [1] * rows, labels)
    assert labelled.hardware == pytest.approx(counted, rel=0.05)
    assert every_token.hardware != pytest.approx(counted, rel=0.05)
    assert labelled.model == every_token.model  # the MFU numerator counts the model as specified


def test_plan_counts_the_mlp_projectors_tokens_at_each_stage_resolution() -> None:
    experiment = load_experiment(PIPELINE_TINY, ["model.overrides.projector=mlp"])
    spec = ModelConfig.from_preset("tiny-cpu", MLP)
    for name, patches in (("stage1", 4 * 4), ("stage2", 8 * 8)):  # 56 px, then 112 px, in 14 px patches
        stage = experiment.stages[name]
        plan = plan_stage(experiment, name)
        assert plan.text_tokens == stage.data.max_length - patches and plan.workload.length == stage.data.max_length
        flops = FlopModel(spec, stage.trainable, stage.image_size, stage.activation_checkpointing).sample(
            plan.text_tokens, 1
        )
        assert (plan.flops_model, plan.flops_hardware) == (flops.model, flops.hardware)


def test_flop_rule_by_hand_for_a_text_row() -> None:
    spec = ModelConfig.from_preset("debug")
    d, t = spec.decoder, 10
    width, kv = d.hidden_size, d.num_kv_heads * d.head_dim
    matmuls = (
        d.num_layers * (2 * t * width * (2 * width + 2 * kv + 3 * d.intermediate_size)) + 2 * t * width * d.vocab_size
    )
    causal = d.num_layers * 2 * width * t * (t + 1)  # Q K^T and P V over the lower triangle
    square = d.num_layers * 4 * width * t * t
    trained = FlopModel(spec, ["all"], spec.vision.image_size).sample(t, 0)
    assert trained == Flops(3 * (matmuls + causal), 3 * (matmuls + square))
    head_only = FlopModel(spec, ["lm_head"], spec.vision.image_size).sample(t, 0)
    head = 2 * t * width * d.vocab_size
    assert head_only.model == matmuls - head + causal + 2 * head  # nothing before the head trains: 1x, head 2x
    rows = FlopModel(spec, ["all"], spec.vision.image_size, activation_checkpointing=True)
    assert rows.batch([t, 2 * t], [0, 0]) == rows.sample(t, 0) + rows.sample(2 * t, 0)
    assert rows.sample(t, 0).hardware > trained.hardware  # recomputation


def test_decoder_forward_flops_match_the_flop_counter() -> None:
    # With nothing trainable the rule counts forwards: the decoder's share is the whole forward less the towers'.
    spec = ModelConfig.from_preset("tiny-cpu")
    torch.manual_seed(0)
    model = Owl2ForCausalLM(Owl2Config.from_spec(spec)).eval().requires_grad_(False)
    text = 40
    batch = _batch(spec, 1, text, spec.vision.image_size)
    # Frozen weights rather than no_grad, under which FlopCounterMode's module tracker raises (torch 2.14).
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as whole:
            model(input_ids=batch["input_ids"], images=batch["images"], image_counts=[1], use_cache=False)
        with FlopCounterMode(display=False) as towers:
            model.encode_images(batch["images"])
    rule = FlopModel(spec, (), spec.vision.image_size)
    assert rule.sample(text, 1).hardware == pytest.approx(whole.get_total_flops(), rel=0.05)
    decoder = rule.decoder(text, 1)
    assert decoder.hardware == pytest.approx(whole.get_total_flops() - towers.get_total_flops(), rel=0.05)
    assert decoder.model < decoder.hardware  # causal attention's lower triangle only


def test_trainable_parts_map_to_towers() -> None:
    assert Trainable.from_parts(STAGE1) == Trainable(True, True, False, True, False)
    assert Trainable.from_parts(["decoder"]).visual and not Trainable.from_parts(["decoder"]).lm_head
    # Without the MAM the image tokens use the shared norms and K/V: decoder.visual trains nothing there.
    assert Trainable.from_parts(STAGE1, modality_adaptive=False) == Trainable(True, True, False, False, False)
    assert Trainable.from_parts(["decoder"], modality_adaptive=False).visual


# ------------------------------------------------------------------------------------------ memory


class _LiveStorages(TorchDispatchMode):
    """Peak bytes of the tensor storages created under it (storages in ``known`` excluded), checked after every op."""

    def __init__(self, known: set[int]) -> None:
        super().__init__()
        self.known, self.live, self.peak = known, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.known and (key not in self.live or self.live[key][0].expired()):
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def _built(spec: ModelConfig) -> Owl2ForCausalLM:
    with torch.device("meta"):
        model = Owl2ForCausalLM(Owl2Config.from_spec(spec))
    model.to_empty(device="cpu")
    model.reset_fixed_buffers()
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.02, 0.02)  # values do not matter here, and this is quicker than the real init
    return model.train()


def _measure_step(model: Owl2ForCausalLM, parts: list[str], batch: dict, optimizer_step: bool = True) -> dict:
    """Bytes of one fp32 training step of ``parts`` (the model's trainable set is switched to them): weights,
    gradients, the AdamW state after the step (left out without ``optimizer_step``) and the peak of the tensors
    the forward and backward create."""
    apply_trainable(model, parts)
    trainable = [param for param in model.parameters() if param.requires_grad]
    for param in model.parameters():
        # as after an earlier micro-batch of gradient accumulation: the backward adds to gradients that exist
        param.grad = torch.zeros_like(param) if param.requires_grad else None
    static = [*model.parameters(), *model.buffers(), *(param.grad for param in trainable)]
    tracker = _LiveStorages({tensor.untyped_storage().data_ptr() for tensor in static})
    with tracker:
        model(**batch, use_cache=False).loss.backward()
    measured = {
        "weights": sum(param.nbytes for param in model.parameters()),
        "gradients": sum(param.grad.nbytes for param in trainable),
        "activations": tracker.peak,
    }
    if optimizer_step:
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        optimizer.step()
        states = optimizer.state.values()
        measured["optimizer"] = sum(value.nbytes for state in states for value in state.values() if value.dim())
    return measured


def _check_estimate(spec: ModelConfig, parts: list[str], work: Workload, measured: dict) -> None:
    params = stage_parameters(spec, parts, work.image_size)
    estimate = estimate_memory(spec, Trainable.from_parts(parts), params.layout, work)
    for part, value in measured.items():
        assert getattr(estimate, part) == pytest.approx(value, rel=0.15), (parts, part)
    assert estimate.total == pytest.approx(sum(measured.values()), rel=0.05), parts


@pytest.mark.slow
def test_memory_estimate_matches_measured_training_steps() -> None:
    # True widths (decoder 4096 wide, 32 heads, MLP 11008; ViT 1024 wide, 16 heads; the paper's abstractor) at two
    # layers each and a 1,024-token vocabulary (the 32k one would only add RAM). One model, four steps: stage 1
    # and a set that trains the decoder, without and with checkpointing. In the decoder sets the whole gradient of
    # an MLP matrix (172 MiB, built before it is added to .grad) outweighs the per-token activations of these
    # short rows. About 5.5 GB of RAM in all.
    spec = ModelConfig.from_preset(
        "owl2-7b",
        {
            "vision": {"num_layers": 2, "image_size": 224},
            "abstractor": {"num_layers": 2},
            "decoder": {"num_layers": 2, "vocab_size": 1024},
        },
    )
    model = _built(spec)
    rows, length = 1, 160
    batch = _batch(spec, rows, length - spec.tokens_per_image, 224)
    stage1 = _measure_step(model, STAGE1, batch)
    _check_estimate(spec, STAGE1, Workload("ddp", 1, False, rows, length, 1, 224, False), stage1)
    # The AdamW state is measured once: a decoder set's would add 4 GB of RAM, at stage 1's bytes per parameter.
    adam_per_gradient_byte = stage1["optimizer"] / stage1["gradients"]

    def check(parts: list[str], checkpointing: bool) -> None:
        measured = _measure_step(model, parts, batch, optimizer_step=False)
        measured["optimizer"] = adam_per_gradient_byte * measured["gradients"]
        _check_estimate(spec, parts, Workload("ddp", 1, False, rows, length, 1, 224, checkpointing), measured)

    check(["all"], checkpointing=False)
    apply_activation_checkpointing(model)
    check(STAGE1, checkpointing=True)
    check(FROZEN_VISION, checkpointing=True)


@pytest.mark.slow
def test_memory_estimate_at_the_loss_and_the_lm_head() -> None:
    # A 32k vocabulary on a narrow decoder: the peak is the loss's backward (12 B per logit) when the head is
    # frozen, the head weight's gradient when it trains.
    spec = ModelConfig.from_preset(
        "owl2-7b",
        {
            "vision": {"num_layers": 1, "image_size": 224},
            "abstractor": {"num_layers": 1},
            "decoder": {
                "num_layers": 1,
                "hidden_size": 1024,
                "num_heads": 8,
                "num_kv_heads": 8,
                "intermediate_size": 2816,
                "vocab_size": 32000,
            },
        },
    )
    model = _built(spec)
    rows, length = 1, 160
    batch = _batch(spec, rows, length - spec.tokens_per_image, 224)
    work = Workload("ddp", 1, False, rows, length, 1, 224, False)
    for parts in (STAGE1, ["all"]):
        _check_estimate(spec, parts, work, _measure_step(model, parts, batch))


def test_bf16_policy_stores_frozen_weights_in_bf16_and_fsdp_shards() -> None:
    spec = ModelConfig.from_preset("owl2-7b")
    params = stage_parameters(spec, STAGE1, 224)
    assert params.total == 8_197_859_328 - 768 * 1024  # the 448 px position table resampled to 224 px
    frozen = params.total - params.trainable
    ddp = estimate_memory(
        spec, Trainable.from_parts(STAGE1), params.layout, Workload("ddp", 8, True, 1, 512, 1, 224, True)
    )
    assert ddp.weights == 2 * frozen + (4 + 2) * params.trainable  # bf16 frozen; fp32 masters + autocast casts
    assert (ddp.gradients, ddp.optimizer, ddp.buffers) == (4 * params.trainable, 8 * params.trainable, 0)
    fsdp = estimate_memory(
        spec, Trainable.from_parts(STAGE1), params.layout, Workload("fsdp", 8, True, 1, 512, 1, 224, True)
    )
    assert fsdp.weights == (2 * frozen + 4 * params.trainable) / 8 and fsdp.optimizer == ddp.optimizer / 8
    assert fsdp.buffers > 0 and fsdp.activations == ddp.activations


# ------------------------------------------------------------------------------------------ CLI and GPUs


def _plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
    status = main(["plan", "--config", str(PIPELINE_7B), "--json", *args])
    captured = capsys.readouterr()
    return status, json.loads(captured.out) if captured.out else {}, captured.err


@pytest.mark.parametrize("gpu", ["h100-80gb", "a100-40gb"])
def test_the_7b_recipe_fits(capsys: pytest.CaptureFixture[str], gpu: str) -> None:
    status, plan, _ = _plan_json(capsys, "--gpu", gpu)
    assert status == 0
    stages = plan["stages"]
    assert set(stages) == {"stage1", "stage2"} and all(stage["fits"] for stage in stages.values())
    assert stages["stage2"]["params_total"] == 8_197_859_328  # the released model (448 px)
    assert stages["stage2"]["params_trainable"] == 8_197_859_328
    assert stages["stage1"]["params_trainable"] == 1_458_657_280  # ViT, abstractor, the decoder's visual copies
    for stage in stages.values():
        memory = stage["memory_gb"]
        parts = sum(memory[name] for name in ("weights", "gradients", "optimizer", "buffers", "activations"))
        assert memory["total"] == pytest.approx(parts, abs=0.05)
        assert memory["total"] < stage["gpu_memory_gb"] == GPUS[gpu].memory_gib
        assert stage["flops_per_sample"] > 0


def test_a_stage_that_does_not_fit_exits_1_with_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    status, plan, err = _plan_json(capsys, "--gpu", "l4", "stages.stage1.strategy=ddp")
    assert status == 1
    assert plan["stages"]["stage1"]["fits"] is False and plan["stages"]["stage2"]["fits"] is True
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "stage stage1 needs" in lines[0] and "l4" in lines[0]


def test_plan_tables_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", str(PIPELINE_7B), "--gpu-memory-gb", "200", "--text-tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert "stage stage1" in out and "stage stage2" in out and "1 image + 100 text" in out and "fits" in out
    assert main(["plan", "--config", str(PIPELINE_7B), "--gpu", "h100"]) == 2
    err = capsys.readouterr().err
    assert "unknown GPU 'h100'" in err and "h100-80gb" in err and "a100-40gb" in err


def test_gpu_table() -> None:
    assert {"h100-80gb", "h200", "a100-40gb", "a100-80gb", "l40s", "a10g", "l4"} <= set(GPUS)
    assert peak_tflops("h100-80gb") == 989.4 and peak_tflops("a100-40gb") == 312.0
    with pytest.raises(UnknownGPU, match="known GPUs: h100-80gb"):
        peak_tflops("v100")


def test_resources_gpu_is_validated_and_train_refuses_a_stage_that_cannot_fit() -> None:
    with pytest.raises(ConfigError, match=r"resources.gpu 'tpu' must be one of \['h100-80gb'"):
        load_experiment(PIPELINE_7B, ["resources.gpu=tpu"])
    with pytest.raises(ConfigError, match="resources.peak_tflops must be positive"):
        load_experiment(PIPELINE_7B, ["resources.peak_tflops=0"])
    too_small = ["resources.gpu=l4", "stages.stage1.strategy=ddp"]
    with pytest.raises(ConfigError, match=r"stages.stage1: .*l4.*resources.ignore_memory_plan=true"):
        check_memory_plan(load_experiment(PIPELINE_7B, too_small))
    check_memory_plan(load_experiment(PIPELINE_7B, too_small), stages=["stage2"])  # only stage 2 runs: it fits
    check_memory_plan(load_experiment(PIPELINE_7B, [*too_small, "resources.ignore_memory_plan=true"]))
