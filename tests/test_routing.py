"""Routing by span and the label-position loss: parity with the old formulations, gradients per branch, no host
syncs; ``benchmarks/layer_bench.py`` stays runnable."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ModelConfig
from owl2.model import Owl2Config, Owl2ForCausalLM
from owl2.model.decoder import Multiway, Partition
from owl2.model.owl2 import count_labels

LAYER_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "layer_bench.py"
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _layer_bench():
    spec = importlib.util.spec_from_file_location("layer_bench", LAYER_BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model() -> Owl2ForCausalLM:
    torch.manual_seed(0)
    model = Owl2ForCausalLM(Owl2Config.from_spec(ModelConfig.from_preset("debug"))).eval()
    with torch.no_grad():  # norm copies that differ, so that a token taking the wrong copy shows
        for name, param in model.decoder.named_parameters():
            if "layernorm" in name:
                param.normal_(1.0, 0.3)
    return model


def _rows(images_per_row: list[int], lengths: list[int], left: bool, seed: int = 0) -> dict:
    """A padded batch: row ``i`` has ``lengths[i]`` real tokens with ``images_per_row[i]`` placeholders; every real
    text token is a label (the first one too: it has no prediction)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (count, length) in enumerate(zip(images_per_row, lengths, strict=True)):
        tokens = torch.randint(3, 256, (length,), generator=generator)
        tokens[1 : 1 + 3 * count : 3] = IMAGE_TOKEN_INDEX
        span = slice(width - length, width) if left else slice(0, length)
        ids[row, span], mask[row, span] = tokens, 1
    labels = torch.where((mask == 1) & (ids != IMAGE_TOKEN_INDEX), ids, IGNORE_INDEX)
    images = torch.randn(sum(images_per_row), 3, 56, 56, generator=generator)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "images": images,
        "image_counts": images_per_row,
    }


MIXED = {
    "right_padded": ([0, 1, 2], [10, 8, 12], False),
    "left_padded": ([2, 0, 1], [12, 7, 9], True),
    "equal_lengths": ([1, 0], [9, 9], False),  # the row without an image is padded before its tokens
}


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name.replace(".layer.", "."): param.grad for name, param in model.named_parameters()}


def _assert_same_grads(ours: dict, reference: dict, **tol: float) -> None:
    assert ours.keys() == reference.keys()
    for name, grad in ours.items():
        if reference[name] is None:
            assert grad is None, name
        else:
            torch.testing.assert_close(grad, reference[name], **tol, msg=name)


@pytest.mark.parametrize("case", MIXED)
def test_routing_by_span_matches_torch_where(model, case):
    bench = _layer_bench()
    reference = copy.deepcopy(model)
    reference.decoder.layers = nn.ModuleList(bench.WhereRouted(layer) for layer in reference.decoder.layers)
    assert sum(isinstance(module, bench.WhereMultiway) for module in reference.modules()) == 4 * 2
    batch = _rows(*MIXED[case])
    outputs = {}
    for name, net in (("ours", model), ("where", reference)):
        net.zero_grad(set_to_none=True)
        out = net(**batch, use_cache=False)
        (out.loss + out.logits.square().mean()).backward()
        outputs[name] = out.logits.detach(), out.loss.detach(), _grads(net)
    (logits, loss, grads), (where_logits, where_loss, where_grads) = outputs["ours"], outputs["where"]
    torch.testing.assert_close(logits, where_logits, **TOL)
    torch.testing.assert_close(loss, where_loss, **TOL)
    _assert_same_grads(grads, where_grads, **TOL)
    assert grads["decoder.layers.0.self_attn.k_proj.visual.weight"].abs().sum() > 0


def test_a_branch_learns_from_its_own_rows_only():
    torch.manual_seed(0)
    layer = Multiway(lambda: nn.Linear(8, 4))
    x = torch.randn(3, 6, 8)
    visual_mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(1)) < 0.4
    routing = Partition.of(visual_mask, int(visual_mask.sum()))
    grad = torch.randn(3, 6, 4)
    routing.ungroup(layer(routing.group(x), routing)).backward(grad)
    for branch, rows in ((layer.visual, visual_mask), (layer.text, ~visual_mask)):
        alone = torch.autograd.grad(branch(x[rows]), branch.weight, grad[rows])[0]
        torch.testing.assert_close(branch.weight.grad, alone)

    layer.zero_grad(set_to_none=True)
    all_text = Partition.of(torch.zeros(3, 6, dtype=torch.bool), 0)  # how FSDP2 runs a text-only micro-batch
    all_text.ungroup(layer(all_text.group(x), all_text)).backward(grad)
    assert not layer.visual.weight.grad.any() and layer.text.weight.grad.any()


def test_a_batch_without_images_leaves_the_visual_branch_alone(model):
    model.zero_grad(set_to_none=True)
    batch = _rows([0, 0], [7, 5], left=False)
    del batch["images"]
    model(**batch, use_cache=False, label_counts=count_labels(batch["input_ids"], batch["labels"])).loss.backward()
    visual = model.visual_branch_parameter_names()
    grads = dict(model.named_parameters())
    assert visual and all(grads[name].grad is None for name in visual)
    assert grads["decoder.layers.0.self_attn.k_proj.text.weight"].grad is not None


def test_partition_groups_and_restores_tokens():
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    routing = Partition.of(mask, 3)
    x = torch.arange(8.0).view(2, 4, 1)
    grouped = routing.group(x)
    assert grouped.flatten().tolist() == [0, 3, 5, 6, 7, 1, 2, 4]
    assert routing.chosen.tolist() == mask.flatten().nonzero().flatten().tolist()
    assert torch.equal(routing.ungroup(grouped), x)
    with pytest.raises(ValueError, match="cannot have 9"):
        Partition.of(mask, 9)


@pytest.mark.parametrize("case", MIXED)
def test_loss_on_label_positions_equals_the_full_loss(model, case):
    batch = _rows(*MIXED[case], seed=3)
    counts = count_labels(batch["input_ids"], batch["labels"])
    results = []
    for label_counts in (None, counts):
        model.zero_grad(set_to_none=True)
        out = model(**batch, use_cache=False, label_counts=label_counts)
        out.loss.backward()
        results.append((out, _grads(model)))
    (full, full_grads), (labelled, labelled_grads) = results
    assert labelled.logits is None and full.logits is not None
    torch.testing.assert_close(labelled.loss, full.loss, atol=1e-6, rtol=1e-6)
    _assert_same_grads(labelled_grads, full_grads, atol=1e-6, rtol=1e-5)
    assert torch.equal(labelled.labels, full.labels)


class _FunctionNames(TorchFunctionMode):
    """Names of the torch functions and tensor methods called under it (``tolist``, ``item``, ``__bool__``...)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_a_training_step_reads_nothing_back(model, op_recorder):
    model.train()
    batch = _rows([1, 2, 0], [9, 12, 6], left=False, seed=5)
    labels = count_labels(batch["input_ids"], batch["labels"])  # on the host, from the collate's tensors
    functions = _FunctionNames()
    try:
        with op_recorder, functions:
            model(**batch, use_cache=False, label_counts=labels).loss.backward()
    finally:
        model.eval()
    assert not op_recorder.syncing
    assert not functions.names & {"tolist", "item", "__bool__", "nonzero", "__int__", "__float__"}


def test_layer_bench_prints_its_json():
    environment = {**os.environ, "PYTHONPATH": str(LAYER_BENCH.parents[1]), "OMP_NUM_THREADS": "1"}
    args = ["--hidden", "64", "--heads", "2", "--layers", "2", "--tokens", "24", "--warmup", "0", "--iters", "1"]
    compiled = ["--compile", "--backend", "eager"]  # Dynamo alone: the compiled stack's code, not its speed
    done = subprocess.run(
        [sys.executable, str(LAYER_BENCH), *args, *compiled, "--json"], capture_output=True, text=True, env=environment
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    keys = ("mam_s", "llama_s", "ratio", "before_s", "compiled_s", "compile_speedup", "compile_s")
    assert all(result[key] > 0 for key in keys)
    assert result["visual_tokens"] == 3 and result["intermediate"] == 192  # 24 x 65/512; 64 x 11008/4096 -> 32s
    assert result["backend"] == "eager"

    bad = subprocess.run(
        [sys.executable, str(LAYER_BENCH), "--hidden", "66", "--heads", "4"],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "decoder.num_heads" in bad.stderr
    unknown = subprocess.run(
        [sys.executable, str(LAYER_BENCH), *args, "--compile", "--backend", "fast"],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1 and "'fast'" in unknown.stderr


def test_step_bench_times_this_tree_beside_a_git_revision():
    step_bench = LAYER_BENCH.parent / "step_bench.py"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--against", "HEAD", "--batch", "1", "--iters", "1", "--rounds", "1", "--json"]
    done = subprocess.run([sys.executable, str(step_bench), *args], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result) == {"this", "HEAD"} and result["this"]["1"] > 0 and result["HEAD"]["1"] > 0
    worktrees = subprocess.run(["git", "-C", str(LAYER_BENCH.parents[1]), "worktree", "list"], capture_output=True)
    assert b"against" not in worktrees.stdout  # the revision's checkout is gone again

    bad = subprocess.run([sys.executable, str(step_bench), "--against", "no-such-revision"], capture_output=True)
    assert bad.returncode == 2 and b"no-such-revision" in bad.stderr
