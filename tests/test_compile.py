"""``torch.compile`` of every layer (``stage.compile``): no graph breaks, a fixed set of graphs whatever the sequence
length and mix of images, losses and gradients equal to eager, state-dict keys unchanged; with activation
checkpointing (as the 7B recipe trains) and under FSDP2.

Graph breaks and recompiles are Dynamo's doing, the same for every backend. The main test compiles with
``aot_eager``: AOTAutograd traces the backward (the routing's gathers, the decoder's checkpoint) as it hands it to
inductor, without inductor's C++ compiles; the FSDP2 test, about where FSDP2's hooks run, with Dynamo alone
(``eager``). One test runs inductor itself on the decoder layers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ModelConfig, StageConfig
from owl2.data.batch import Batch
from owl2.model import Owl2Config, Owl2ForCausalLM
from owl2.model.owl2 import count_labels
from owl2.train import parallel

CPU = torch.device("cpu")
TOL = {"atol": 1e-5, "rtol": 1e-5}
LENGTHS = (9, 14, 20)
# Images per row: a text-only batch (no routing), a batch of images, and a row with images beside one without.
PATTERNS = {"text_only": [0, 0], "images": [1, 2], "mixed": [2, 0]}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own graphs and graph breaks (the compiled code is shared by every model)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(seed: int = 0) -> Owl2ForCausalLM:
    torch.manual_seed(seed)
    model = Owl2ForCausalLM(Owl2Config.from_spec(ModelConfig.from_preset("debug"))).train()
    with torch.no_grad():  # norm copies that differ, so that a token taking the wrong copy shows
        for name, param in model.decoder.named_parameters():
            if "layernorm" in name:
                param.normal_(1.0, 0.3)
    return model


def _batch(length: int, counts: list[int], seed: int) -> Batch:
    """A training batch as the collator makes it: rows of ``length`` tokens with ``counts[i]`` image placeholders,
    the last row right-padded by 2."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (len(counts), length), generator=generator)
    for row, count in enumerate(counts):
        ids[row, 1 : 1 + 3 * count : 3] = IMAGE_TOKEN_INDEX
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0
    labels = torch.where((ids == IMAGE_TOKEN_INDEX) | (mask == 0), IGNORE_INDEX, ids)
    pixels = torch.randint(0, 256, (sum(counts), 3, 56, 56), dtype=torch.uint8, generator=generator)
    return Batch(ids, mask, labels, pixels, counts, ids=[str(row) for row in counts], epoch=0, last_key=seed)


def _step(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward as the training step runs them (no padding mask, loss on label positions); the loss
    and the gradients."""
    model.zero_grad(set_to_none=True)
    labels = count_labels(batch.input_ids, batch.labels)
    loss = model(**batch.to(CPU), use_cache=False, label_counts=labels).loss
    loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad  # FSDP2: a DTensor
    return loss.detach(), grads


def _assert_same(
    ours: tuple[torch.Tensor, dict], eager: tuple[torch.Tensor, dict], where: str, *, sharded: bool = False
) -> None:
    """Same loss and gradients. ``sharded``: FSDP2 runs every unit on every batch, so where eager has no gradient
    (the vision side on a text-only batch) it has zeros."""
    torch.testing.assert_close(ours[0], eager[0], **TOL, msg=f"loss, {where}")
    assert eager[1].keys() <= ours[1].keys() if sharded else eager[1].keys() == ours[1].keys(), where
    for name, grad in ours[1].items():
        reference = eager[1].get(name, torch.zeros_like(grad))
        torch.testing.assert_close(grad, reference, **TOL, msg=f"{name}, {where}")


def _graphs(model: Owl2ForCausalLM) -> dict[str, int]:
    """Graphs Dynamo compiled for each tower's layer ``forward`` (its cache entries: one per compile, whichever
    layer of the tower caused it)."""
    return {
        path: len(_debug_get_cache_entry_list(type(stack[0]).forward.__code__))
        for path, stack in parallel.layer_stacks(model).items()
    }


def test_compiled_layers_equal_eager_without_graph_breaks_or_recompiles_per_length(tmp_path):
    eager, compiled = _model(), _model()
    stage = StageConfig(activation_checkpointing=True, compile=True)
    parallel.prepare_layers(eager, dataclasses.replace(stage, compile=False), CPU)
    parallel.prepare_layers(compiled, stage, CPU, backend="aot_eager")
    graphs = []
    for length in LENGTHS:
        for pattern, counts in PATTERNS.items():
            batch = _batch(length, counts, seed=length)
            _assert_same(_step(compiled, batch), _step(eager, batch), f"{pattern} at {length} tokens")
        graphs.append(_graphs(compiled))

    assert not counters["graph_break"], dict(counters["graph_break"])
    # Per tower, one graph for each kind of batch, from the first length on: the decoder's without and with
    # routing, whatever the share of visual rows; the vision blocks' and the abstractor layers' for any number
    # of images above one.
    assert graphs == [{"vision.blocks": 1, "abstractor.layers": 1, "decoder.layers": 2}] * len(LENGTHS)

    # In place: the bare model's keys, and a checkpoint that loads into a compiled model, which runs as saved.
    state = parallel.model_state_for_checkpoint(compiled)
    assert list(state) == list(eager.state_dict()) and not any("_orig_mod" in key for key in state)
    compiled.save_pretrained(tmp_path, safe_serialization=True)
    restored = Owl2ForCausalLM.from_pretrained(tmp_path).train()
    parallel.prepare_layers(restored, stage, CPU, backend="aot_eager")
    parallel.load_model_state(restored, state)
    batch = _batch(LENGTHS[0], PATTERNS["images"], seed=1)
    _assert_same(_step(restored, batch), _step(compiled, batch), "restored")


def test_checkpointed_and_compiled_under_fsdp2_equals_eager(single_process_group):
    eager = _model()
    model = _model()
    stage = StageConfig(activation_checkpointing=True, compile=True)
    parallel.prepare_layers(model, stage, CPU, backend="eager")
    parallel.shard(model)  # the rest of wrap's FSDP2 branch; its hooks run around the compiled forwards
    for pattern in ("text_only", "images"):
        batch = _batch(LENGTHS[0], PATTERNS[pattern], seed=5)
        _assert_same(_step(model, batch), _step(eager, batch), pattern, sharded=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # A text-only micro-batch visits every FSDP2 unit with one black image and a routing of no visual rows: the
    # decoder compiles the empty visual group apart (size 0 is static), the towers a graph for one image. The
    # vision blocks compile each once more for the backward's recompute: FSDP2 hands their forward a view of
    # the input, the checkpoint's recompute a plain tensor.
    assert _graphs(model) == {"vision.blocks": 4, "abstractor.layers": 2, "decoder.layers": 2}


@pytest.mark.parametrize(("setting", "compiled"), [("auto", False), (True, True), (False, False)])
def test_the_stage_decides_what_compiles(setting, compiled):
    model = _model()
    stage = dataclasses.replace(StageConfig(), compile=setting, activation_checkpointing=True)
    parallel.prepare_layers(model, stage, CPU)
    layers = [layer for stack in parallel.layer_stacks(model).values() for layer in stack]
    assert {layer._compiled_call_impl is not None for layer in layers} == {compiled}
    assert parallel.use_compile(dataclasses.replace(stage, compile="auto"), torch.device("cuda"))
    assert all(layer.gradient_checkpointing for layer in model.decoder.layers)


def test_inductor_compiled_decoder_layers_equal_eager():
    """The real backend on the decoder layers (the vision and abstractor layers are plain timm/torch blocks)."""
    eager, compiled = _model(), _model()
    for layer in compiled.decoder.layers:
        parallel.compile_layer(layer)
    batch = _batch(LENGTHS[0], PATTERNS["mixed"], seed=3)
    ours, reference = _step(compiled, batch), _step(eager, batch)
    torch.testing.assert_close(ours[0], reference[0], atol=1e-4, rtol=1e-4)
    for name, grad in reference[1].items():
        torch.testing.assert_close(ours[1][name], grad, atol=1e-4, rtol=1e-4, msg=name)
    assert not counters["graph_break"]
    assert _graphs(compiled)["decoder.layers"] == 1
