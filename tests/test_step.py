"""The training step without Ray: no host sync per step, one device read per logging window, NaN/inf steps
skipped without touching the weights or the optimizer, no NaN/inf ever checkpointed."""

from __future__ import annotations

import pytest
import torch

from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ModelConfig, OptimConfig
from owl2.data.batch import Batch
from owl2.data.sample import SkipStats
from owl2.model import Owl2Config, Owl2ForCausalLM
from owl2.plan.flops import FlopModel
from owl2.train import checkpoint as ckpt
from owl2.train.checkpoint import TrainState
from owl2.train.optim import build_optimizer
from owl2.train.step import TrainStep
from owl2.train.window import LogWindow, window_metrics

SPEC = ModelConfig.from_preset("debug")
FLOPS = FlopModel(SPEC, ["all"], image_size=SPEC.vision.image_size)
# Groups of different learning rates and weight decays (layer decay, module scales, no-decay norms).
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.05, grad_clip=0.5, layer_decay=0.8, abstractor_lr_scale=0.3)
CPU = torch.device("cpu")


def _model(seed: int = 0) -> Owl2ForCausalLM:
    torch.manual_seed(seed)
    return Owl2ForCausalLM(Owl2Config.from_spec(SPEC)).train()


def _batch(seed: int, images: bool = True) -> Batch:
    """Two rows of 12 tokens as the collator makes them (uint8 pixels); with ``images`` row 0 holds one image
    and row 1 two; labels skip placeholders and row 1's padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    counts = [1, 2] if images else [0, 0]
    if images:
        ids[0, 1] = ids[1, 1] = ids[1, 6] = IMAGE_TOKEN_INDEX
    labels = torch.where((ids == IMAGE_TOKEN_INDEX) | (mask == 0), IGNORE_INDEX, ids)
    side = SPEC.vision.image_size
    pixels = torch.randint(0, 256, (sum(counts), 3, side, side), dtype=torch.uint8, generator=generator)
    return Batch(ids, mask, labels, pixels, counts, ids=["a", "b"], epoch=0, last_key=seed)


def _stepper(model: Owl2ForCausalLM, accumulation: int = 2) -> TrainStep:
    optimizer, _ = build_optimizer(model, OPTIM)
    return TrainStep(model, optimizer, accumulation=accumulation, grad_clip=OPTIM.grad_clip, device=CPU)


def _step(stepper: TrainStep, batches: list[Batch], window: LogWindow | None = None) -> LogWindow:
    window = window or LogWindow()
    feed = iter(batches)
    stepper.run(lambda: next(feed), window, FLOPS)
    return window


def _snapshot(stepper: TrainStep) -> dict[str, torch.Tensor]:
    """Parameters and optimizer state, cloned."""
    tensors = {f"param {name}": p.detach().clone() for name, p in stepper.model.named_parameters()}
    for index, state in enumerate(stepper.optimizer.state.values()):
        tensors.update({f"state {index} {key}": value.clone() for key, value in state.items()})
    return tensors


@pytest.mark.parametrize("images", [True, False], ids=["images", "text_only"])
def test_a_training_step_never_waits_for_the_device(op_recorder, images: bool) -> None:
    stepper = _stepper(_model())
    _step(stepper, [_batch(1, images), _batch(2, images)])  # the first step allocates the optimizer state
    window = LogWindow()
    with op_recorder:
        _step(stepper, [_batch(3, images), _batch(4, images)], window)
    assert ("aten.convolution" in op_recorder.ops) == images  # the vision encoder ran, or not
    assert "aten._fused_adamw_" in op_recorder.ops and "aten.linalg_vector_norm" in op_recorder.ops
    assert not op_recorder.syncing
    assert not op_recorder.host_copies


def test_the_window_read_is_one_copy_and_one_gather(op_recorder) -> None:
    stepper = _stepper(_model())
    window = _step(stepper, [_batch(1), _batch(2)])
    gathers = []

    def gather(value):
        gathers.append(value)
        return [value]

    state = TrainState(stage="s", step=1)
    with op_recorder:
        metrics = window_metrics(window, state, SkipStats(), [0.1], [{"name": "all"}], stepper.nonfinite, gather)
    assert len(gathers) == 1 and op_recorder.host_copies == ["aten._to_copy"] and not op_recorder.syncing
    assert metrics["grad_norm"] == pytest.approx(float(window.grad_norm)) and metrics["grad_norm"] > 0
    assert metrics["nonfinite_steps"] == 0 and metrics["samples"] == 4
    assert metrics["loss"] == pytest.approx(float(window.loss_sum) / window.supervised)


def _infinite_gradient(model: Owl2ForCausalLM) -> torch.utils.hooks.RemovableHandle:
    """A finite loss whose backward overflows: one weight's gradient becomes inf."""
    return model.abstractor.proj.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))


def test_an_infinite_gradient_skips_the_step_bitwise() -> None:
    batches = [[_batch(step)] for step in range(3)]
    reference = _stepper(_model(), accumulation=1)
    for step in (0, 2):  # the run that never saw step 1
        _step(reference, batches[step])

    stepper = _stepper(_model(), accumulation=1)
    _step(stepper, batches[0])
    before = _snapshot(stepper)
    hook = _infinite_gradient(stepper.model)
    window = _step(stepper, batches[1])
    hook.remove()

    assert torch.isfinite(window.loss_sum) and not torch.isfinite(window.grad_norm)
    after = _snapshot(stepper)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed  # parameters, exp_avg, exp_avg_sq and step all untouched
    assert stepper.nonfinite_steps() == 1
    ckpt.check_finite(stepper.model.state_dict(), stepper.optimizer.state_dict())  # nothing to refuse

    # The next step continues as if the skipped one never happened (same step count for bias correction).
    _step(stepper, batches[2])
    for (name, ours), theirs in zip(stepper.model.named_parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(ours, theirs), name


def test_a_nan_loss_skips_the_step_on_every_kind_of_group() -> None:
    stepper = _stepper(_model(), accumulation=1)
    _step(stepper, [_batch(1)])
    before = _snapshot(stepper)
    groups = stepper.optimizer.param_groups
    assert len({group["lr"] for group in groups}) > 2 and {group["weight_decay"] for group in groups} == {0.0, 0.05}
    with torch.no_grad():
        stepper.model.lm_head.weight[0, 0] = float("nan")  # every position's softmax goes through it
        before["param lm_head.weight"][0, 0] = float("nan")
    window = _step(stepper, [_batch(2)])
    assert not torch.isfinite(window.loss_sum)
    after = _snapshot(stepper)
    changed = [name for name in before if not torch.equal(before[name].nan_to_num(), after[name].nan_to_num())]
    assert not changed
    assert stepper.nonfinite_steps() == 1


def test_a_checkpoint_with_a_nan_or_inf_is_refused_naming_the_tensor() -> None:
    stepper = _stepper(_model(), accumulation=1)
    _step(stepper, [_batch(1)])
    model_state, optimizer_state = stepper.model.state_dict(), stepper.optimizer.state_dict()
    ckpt.check_finite(model_state, optimizer_state)

    names = {
        key: name
        for group in optimizer_state["param_groups"]
        for key, name in zip(group["params"], group["param_names"], strict=True)
    }
    optimizer_state["state"][3]["exp_avg_sq"].view(-1)[0] = float("inf")
    name = names[3]
    message = f"refusing to write a checkpoint: optimizer exp_avg_sq of {name} holds NaN/inf values"
    with pytest.raises(FloatingPointError, match=f"^{message}$"):
        ckpt.check_finite(model_state, optimizer_state)

    with torch.no_grad():
        stepper.model.decoder.norm.weight[1] = float("nan")
    with pytest.raises(FloatingPointError, match="^refusing to write a checkpoint: model weight decoder.norm.weight "):
        ckpt.check_finite(stepper.model.state_dict(), optimizer_state)  # the model's tensors come first


def test_a_resumed_count_continues_on_the_device() -> None:
    model = _model()
    optimizer, _ = build_optimizer(model, OPTIM)
    stepper = TrainStep(model, optimizer, accumulation=1, grad_clip=0.0, device=CPU, nonfinite_steps=4)
    hook = _infinite_gradient(model)
    window = _step(stepper, [_batch(1)])
    hook.remove()
    assert stepper.nonfinite_steps() == 5 and not torch.isfinite(window.grad_norm)
    window = _step(stepper, [_batch(2)])  # grad_clip 0: the norm is still computed, the gradients not clipped
    assert stepper.nonfinite_steps() == 5 and float(window.grad_norm) > 0


def test_a_step_needs_the_fused_optimizer() -> None:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    with pytest.raises(ValueError, match="fused optimizer"):
        TrainStep(model, optimizer, accumulation=1, grad_clip=1.0, device=CPU)


def test_set_image_size_rebuilds_the_abstractor_table(monkeypatch) -> None:
    import owl2.model.abstractor as abstractor

    resized = _model().eval()
    resized.set_image_size(2 * SPEC.vision.image_size)
    direct_spec = ModelConfig.from_preset("debug", [f"vision.image_size={2 * SPEC.vision.image_size}"])
    direct = Owl2ForCausalLM(Owl2Config.from_spec(direct_spec)).eval()
    direct.load_state_dict(resized.state_dict())
    pixels = torch.randn(2, 3, 2 * SPEC.vision.image_size, 2 * SPEC.vision.image_size)

    def no_table(*args, **kwargs):
        raise AssertionError("a forward built a position table")

    monkeypatch.setattr(abstractor, "sincos_2d_with_cls", no_table)
    with torch.no_grad():
        ours, theirs = resized.encode_images(pixels), direct.encode_images(pixels)
    assert resized.abstractor.image_pos.shape[0] == (2 * SPEC.vision.grid_size) ** 2 + 1
    assert torch.equal(resized.abstractor.image_pos, direct.abstractor.image_pos)
    assert torch.equal(ours, theirs)
