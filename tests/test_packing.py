"""Sequence packing and the flash path of training batches: a packed batch gives every sample the logits, loss
and gradients it gets unpacked; right-padded rows attend without a mask and give today's masked results."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ConfigError, DataConfig, ModelConfig, OptimConfig, build
from owl2.data.batch import Batch, Collator
from owl2.data.packing import rows_of
from owl2.data.pipeline import EPOCH, ORDER_KEY
from owl2.model import Owl2Config, Owl2ForCausalLM
from owl2.model import decoder as decoder_module
from owl2.model.owl2 import count_labels
from owl2.plan.flops import FlopModel
from owl2.train.optim import build_optimizer
from owl2.train.step import TrainStep
from owl2.train.window import LogWindow

# Grouped-query attention (2 K/V heads for 4 query heads), so that the kernels' GQA paths are covered.
SPEC = ModelConfig.from_preset("debug", {"decoder": {"num_kv_heads": 2}})
PER_IMAGE = SPEC.tokens_per_image  # 9
SIDE = SPEC.vision.image_size
MAX_LENGTH = 40
TOL = {"atol": 1e-5, "rtol": 1e-5}
# (text tokens with placeholders, images, labelled from); None: a bad record. Decoder tokens: 20, 9, -, 26, 7,
# 30, 14 -> packed rows [20 + 9], [26 + 7], [30], [14] within 40 tokens.
SAMPLES = [(12, 1, 5), (9, 0, 4), None, (10, 2, 6), (7, 0, 0), (30, 0, 10), (6, 1, 3)]


def _records(samples: list, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows as ``pipeline.encoded`` hands them to the collator; placeholders after the first token, labels from
    ``labelled from`` on (0: the first token too, which nothing predicts)."""
    generator = np.random.default_rng(seed)
    columns: dict[str, list] = {"id": [], "error": [], "detail": [], "input_ids": [], "labels": [], "num_images": []}
    columns |= {"pixels": [], EPOCH: [], ORDER_KEY: []}
    for key, sample in enumerate(samples):
        columns["id"].append(f"s{key}")
        columns[EPOCH].append(3)
        columns[ORDER_KEY].append(100 + key)
        if sample is None:
            columns["error"].append("missing_file")
            columns["detail"].append("nowhere.png")
            ids, labels, count = np.zeros(0, np.int64), np.zeros(0, np.int64), 0
        else:
            length, count, labelled = sample
            ids = generator.integers(3, 256, length)
            ids[1 : 1 + 2 * count : 2] = IMAGE_TOKEN_INDEX
            labels = np.where((np.arange(length) >= labelled) & (ids != IMAGE_TOKEN_INDEX), ids, IGNORE_INDEX)
            columns["error"].append("")
            columns["detail"].append("")
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        columns["num_images"].append(count)
        columns["pixels"].append(generator.integers(0, 256, (count, 3, SIDE, SIDE), dtype=np.uint8))
    ragged = ("input_ids", "labels", "pixels")
    out = {}
    for name, values in columns.items():
        out[name] = np.empty(len(values), dtype=object) if name in ragged else np.asarray(values)
        if name in ragged:
            out[name][:] = values
    return out


def _collate(samples: list = SAMPLES, packing: bool = True) -> Batch:
    collator = Collator(0, SIDE, MAX_LENGTH, PER_IMAGE) if packing else Collator(0, SIDE)
    return collator(_records(samples))


def _model() -> Owl2ForCausalLM:
    torch.manual_seed(0)
    model = Owl2ForCausalLM(Owl2Config.from_spec(SPEC)).train()
    with torch.no_grad():  # norm copies that differ, so that a token taking the wrong copy shows
        for name, param in model.decoder.named_parameters():
            if "layernorm" in name:
                param.normal_(1.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model() -> Owl2ForCausalLM:
    return _model()


def _spans(batch: Batch) -> list[tuple[int, int, int]]:
    """(row, first decoder token, decoder tokens) of each sample, in order."""
    spans = []
    for row, lengths in enumerate(batch.layout.expanded(PER_IMAGE)):
        start = 0
        for length in lengths:
            spans.append((row, start, length))
            start += length
    return spans


def _train_forward(model: Owl2ForCausalLM, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training step's forward and backward: its loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    labels = count_labels(batch.input_ids, batch.labels, batch.sample_ids)
    loss = model(**batch.to("cpu"), use_cache=False, label_counts=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_packing_keeps_order_whole_samples_and_the_resume_position() -> None:
    padded, packed = _collate(packing=False), _collate()
    assert packed.layout.tokens == ((12, 9), (10, 7), (30,), (6,))
    assert packed.ids == padded.ids == ["s0", "s1", "s3", "s4", "s5", "s6"]
    assert (packed.epoch, packed.last_key) == (padded.epoch, padded.last_key) == (3, 106)
    assert all(sum(row) <= MAX_LENGTH for row in packed.layout.expanded(PER_IMAGE))
    assert torch.equal(packed.images, padded.images) and packed.image_counts == [1, 2, 0, 1]
    # Each row is its samples back to back, each whole: the padded rows, in order, then padding.
    good = [i for i, sample in enumerate(SAMPLES) if sample]
    records = _records(SAMPLES)
    sample = 0
    for row, lengths in enumerate(packed.layout.tokens):
        start = 0
        for number, length in enumerate(lengths):
            ids = torch.from_numpy(records["input_ids"][good[sample]])
            assert torch.equal(packed.input_ids[row, start : start + length], ids)
            assert (packed.sample_ids[row, start : start + length] == number).all()
            start, sample = start + length, sample + 1
        assert (packed.attention_mask[row, :start] == 1).all() and (packed.attention_mask[row, start:] == 0).all()
        assert (packed.sample_ids[row, start:] == len(lengths) - 1).all()  # padding runs with the last sample
    # The first label of every packed sample is dropped, as a row's first one is: nothing predicts it.
    assert count_labels(packed.input_ids, packed.labels, packed.sample_ids) == [7, 5, 4, 6, 20, 3]
    assert count_labels(padded.input_ids, padded.labels) == [7, 5, 4, 7, 20, 3]


def test_a_packed_batch_gives_each_sample_its_unpacked_logits_and_loss(model) -> None:
    padded, packed = _collate(packing=False), _collate()
    positions = []
    hook = model.decoder.rotary_emb.register_forward_hook(lambda module, args, out: positions.append(args[1]))
    with torch.no_grad():
        out_padded = model(**padded.to("cpu"), use_cache=False)
        out_packed = model(**packed.to("cpu"), use_cache=False)
    hook.remove()
    assert out_packed.logits.shape[:2] == (4, 26 + 7)  # as wide as the longest row needs, nothing wider
    for (row, start, length), (alone, _, same) in zip(_spans(packed), _spans(padded), strict=True):
        assert same == length
        assert torch.equal(positions[1][row, start : start + length], torch.arange(length))  # restart per sample
        ours, theirs = out_packed.logits[row, start : start + length], out_padded.logits[alone, :length]
        torch.testing.assert_close(ours, theirs, **TOL)
        visual = out_packed.visual_mask[row, start : start + length]
        assert torch.equal(visual, out_padded.visual_mask[alone, :length])
        # The sample's loss, summed over its label tokens.
        targets = out_packed.labels[row, start + 1 : start + length]
        assert torch.equal(targets, out_padded.labels[alone, 1:length])
        loss = F.cross_entropy(ours[:-1], targets, ignore_index=IGNORE_INDEX, reduction="sum")
        reference = F.cross_entropy(theirs[:-1], targets, ignore_index=IGNORE_INDEX, reduction="sum")
        torch.testing.assert_close(loss, reference, **TOL)


def test_a_packed_batch_gives_the_unpacked_loss_and_gradients(model) -> None:
    loss, grads = _train_forward(model, _collate())
    reference_loss, reference = _train_forward(model, _collate(packing=False))
    torch.testing.assert_close(loss, reference_loss, **TOL)
    assert grads.keys() == reference.keys() == {name for name, _ in model.named_parameters()}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], **TOL, msg=name)


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[tuple[bool, bool]]:
    """(mask given, is_causal) of every SDPA call in the decoder (the vision tower's are not recorded)."""
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def scaled_dot_product_attention(*args, **kwargs):
            calls.append((kwargs.get("attn_mask") is not None, kwargs.get("is_causal", False)))
            return F.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(decoder_module, "F", Spy())
    return calls


@pytest.mark.parametrize(
    "samples",
    [[(12, 1, 5), (9, 0, 4), (10, 2, 6)], [(10, 1, 4), (10, 0, 2), (10, 2, 3)]],
    ids=["padded", "every_row_ends_with_a_real_token"],
)
def test_right_padded_rows_attend_without_a_mask_and_match_the_masked_path(model, samples, sdpa_calls) -> None:
    batch = _collate(samples, packing=False)
    inputs = batch.to("cpu")
    with torch.no_grad():
        flash = model(**inputs, use_cache=False)
        assert sdpa_calls and set(sdpa_calls) == {(False, True)}  # is_causal, no mask: the flash kernel may run
        sdpa_calls.clear()
        masked = model(**{**inputs, "layout": None}, use_cache=False)
        assert set(sdpa_calls) == {(True, False)}
    if samples[0][0] == samples[1][0]:  # no padding in input_ids: the masked path puts the splice's padding first
        assert not masked.attention_mask[:, -1].eq(0).any() and masked.attention_mask[:, 0].eq(0).any()
    for row in range(len(samples)):
        ours, theirs = flash.attention_mask[row].bool(), masked.attention_mask[row].bool()
        assert ours[: int(ours.sum())].all()  # right-aligned
        torch.testing.assert_close(flash.logits[row][ours], masked.logits[row][theirs], **TOL)
    torch.testing.assert_close(flash.loss, masked.loss, **TOL)


def test_packed_rows_take_a_block_diagonal_mask_off_cuda(model, sdpa_calls) -> None:
    with torch.no_grad():
        model(**_collate().to("cpu"), use_cache=False)
    assert sdpa_calls and set(sdpa_calls) == {(True, False)}


def _varlen_reference(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size, enable_gqa):
    """``varlen_attn`` as specified, on any device: causal SDPA over each ``[T, H, Dh]`` sequence."""
    assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
    bounds = cu_seq_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    pieces = [
        F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, enable_gqa=True
        ).transpose(0, 1)
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    assert enable_gqa == (q.shape[1] != k.shape[1])
    return torch.cat(pieces)


def test_the_varlen_path_gives_the_block_diagonal_result(model, monkeypatch) -> None:
    """The CUDA path's bookkeeping (sample starts, the longest span, the token layout) checked on the CPU, with
    the flash kernel replaced by its specification."""
    import torch.nn.attention.varlen as varlen

    packed = _collate().to("cpu")
    with torch.no_grad():
        reference = model(**packed, use_cache=False).logits
        monkeypatch.setattr(decoder_module, "varlen_dtype", lambda x: torch.float32)
        monkeypatch.setattr(varlen, "varlen_attn", _varlen_reference)
        ours = model(**packed, use_cache=False).logits
    torch.testing.assert_close(ours, reference, **TOL)


def test_a_packed_training_step_never_waits_for_the_device(op_recorder) -> None:
    model = _model()
    optimizer, _ = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0))
    stepper = TrainStep(model, optimizer, accumulation=2, grad_clip=1.0, device=torch.device("cpu"))
    flops = FlopModel(SPEC, ["all"], image_size=SIDE)
    batches = [_collate(), _collate(SAMPLES[::-1])]
    feed = iter(batches * 2)
    stepper.run(lambda: next(feed), LogWindow(), flops)  # the first step allocates the optimizer state
    window = LogWindow()
    with op_recorder:
        stepper.run(lambda: next(feed), window, flops)
    assert "aten.convolution" in op_recorder.ops and "aten._fused_adamw_" in op_recorder.ops
    assert not op_recorder.syncing and not op_recorder.host_copies
    # FLOPs are counted per sample, as when unpacked.
    unpacked = LogWindow()
    for batch in (_collate(packing=False), _collate(SAMPLES[::-1], packing=False)):
        unpacked.add(batch, torch.tensor(1.0), flops, count_labels(batch.input_ids, batch.labels))
    assert window.model_flops == pytest.approx(unpacked.model_flops) and window.samples == unpacked.samples == 12


def test_rows_take_consecutive_samples_and_run_the_fewest_tokens() -> None:
    assert rows_of([20, 9, 26, 7, 30, 14], 40) == [2, 2, 1, 1]  # 4 x 33 tokens; 3 rows cannot hold them
    # Rows filled as far as they go would be 5 + 3 samples, 2 x 176 tokens (unpacked: 8 x 43); balanced, 2 x 140.
    assert rows_of([27, 43, 35, 31, 40, 29, 38, 33], 192) == [4, 4]
    assert rows_of([35] * 8, 192) == [1] * 8  # no padding to save: more, shorter rows
    assert rows_of([30, 10, 10, 10], 40) == [1, 3]  # 2 x 30, where filling runs 2 x 40
    assert rows_of([50, 5, 5], 40) == [1, 1, 1]  # a sample beyond max_length: the batch stays unpacked
    assert rows_of([], 40) == []


def _tokens_run(lengths: list[int], rows: list[int]) -> tuple[int, int, int]:
    """(rows x the longest row, -rows, the longest row) of a split of ``lengths`` into rows of ``rows`` samples."""
    widths = np.add.reduceat(lengths, np.cumsum([0, *rows[:-1]])).tolist()
    return len(rows) * max(widths), -len(rows), max(widths)


def test_rows_of_finds_the_best_split_an_exhaustive_search_finds() -> None:
    generator = random.Random(0)
    for _ in range(200):
        max_length = generator.randint(20, 120)
        lengths = [generator.randint(1, 20) for _ in range(generator.randint(1, 8))]
        splits = []
        for cuts in itertools.product((False, True), repeat=len(lengths) - 1):  # a cut before sample i + 1
            rows = [1]
            for cut in cuts:
                rows = [*rows, 1] if cut else [*rows[:-1], rows[-1] + 1]
            if _tokens_run(lengths, rows)[2] <= max_length:
                splits.append(_tokens_run(lengths, rows)[:2])
        found = rows_of(lengths, max_length)
        assert sum(found) == len(lengths) and _tokens_run(lengths, found)[2] <= max_length
        assert _tokens_run(lengths, found)[:2] == min(splits), (lengths, max_length)


def test_packing_must_be_a_boolean() -> None:
    assert build(DataConfig, {"packing": True}, "data").packing
    with pytest.raises(ConfigError, match="data.packing must be bool, got 'yes'"):
        build(DataConfig, {"packing": "yes"}, "data")
    with pytest.raises(ConfigError, match="data.packing must be true or false, got 1"):
        DataConfig(packing=1)
