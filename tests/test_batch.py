"""Batch invariance: padding side and batch composition never change a row's result."""

import pytest
import torch
import torch.nn.functional as F

from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ModelConfig
from owl2.model import Owl2Config, Owl2ForCausalLM

IMG = IMAGE_TOKEN_INDEX
# An image row, a longer text-only row (no dummy image), a row with two images.
SAMPLES = [
    ([1, 17, 33, IMG, 45, 61, 77, 93], 1),
    ([1, 21, 37, 53, 69, 85, 101, 117, 133, 2], 0),
    ([1, 17, IMG, 33, IMG, 45], 2),
]


@pytest.fixture(scope="module")
def model(golden_dir):
    # The golden weights give the text and visual branches different values, so routing errors show.
    return Owl2ForCausalLM.from_pretrained(golden_dir)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(7))


def _labels(ids):
    # Loss on the text after the last image, like an assistant reply.
    last_image = max((i for i, t in enumerate(ids) if t == IMG), default=0)
    return [IGNORE_INDEX if i <= last_image + 1 else t for i, t in enumerate(ids)]


def _batch(padding_side, with_labels):
    length = max(len(ids) for ids, _ in SAMPLES)
    rows, masks, labels = [], [], []
    for ids, _ in SAMPLES:
        pad = length - len(ids)
        ordered = (lambda real, fill: fill + real) if padding_side == "left" else (lambda real, fill: real + fill)
        rows.append(ordered(ids, [0] * pad))
        masks.append(ordered([1] * len(ids), [0] * pad))
        labels.append(ordered(_labels(ids), [IGNORE_INDEX] * pad))
    return {
        "input_ids": torch.tensor(rows),
        "attention_mask": torch.tensor(masks),
        "labels": torch.tensor(labels) if with_labels else None,
    }


def _images_of(row, images):
    start = sum(n for _, n in SAMPLES[:row])
    return images[start : start + SAMPLES[row][1]]


def _single(model, row, images, with_labels=False):
    ids = SAMPLES[row][0]
    with torch.no_grad():
        return model(
            torch.tensor([ids]),
            images=_images_of(row, images) if SAMPLES[row][1] else None,
            labels=torch.tensor([_labels(ids)]) if with_labels else None,
            use_cache=False,
        )


@pytest.mark.parametrize(("padding_side", "with_labels"), [("right", True), ("left", False), ("left", True)])
def test_rows_equal_single_samples(model, images, padding_side, with_labels):
    batch = _batch(padding_side, with_labels)
    with torch.no_grad():
        out = model(**batch, images=images, use_cache=False)
    total_loss, total_tokens = 0.0, 0
    for row in range(len(SAMPLES)):
        alone = _single(model, row, images, with_labels)
        valid = out.attention_mask[row].bool()
        torch.testing.assert_close(out.logits[row][valid], alone.logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(out.visual_mask[row][valid], alone.visual_mask[0])
        if with_labels:
            targets = alone.labels[0, 1:]
            total_loss += F.cross_entropy(alone.logits[0, :-1], targets, reduction="sum").item()
            total_tokens += int((targets != IGNORE_INDEX).sum())
    if with_labels:
        assert out.loss.item() == pytest.approx(total_loss / total_tokens, rel=1e-5)


def test_left_padded_greedy_generation_equals_one_by_one(model, images):
    batch = _batch("left", with_labels=False)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    generated = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], images=images, **kwargs)
    for row in range(len(SAMPLES)):
        ids = torch.tensor([SAMPLES[row][0]])
        alone = model.generate(ids, images=_images_of(row, images) if SAMPLES[row][1] else None, **kwargs)
        assert torch.equal(generated[row, -6:], alone[0, -6:]), f"row {row}"


def test_text_only_rows_need_neither_dummy_images_nor_labels(model, images):
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    with torch.no_grad():
        out = model(ids, use_cache=False)
    assert out.logits.shape == (2, 4, 256) and out.loss is None and not out.visual_mask.any()


@pytest.mark.parametrize("num_images", [1, 3])
def test_placeholder_and_image_counts_must_agree(model, images, num_images):
    ids = torch.tensor([[1, IMG, 5, IMG, 6]])
    with pytest.raises(ValueError, match=rf"2 image placeholders .* but {num_images} images"):
        model(ids, images=images[:num_images])


def test_images_without_placeholders_are_refused(model, images):
    with pytest.raises(ValueError, match="0 image placeholders"):
        model(torch.tensor([[1, 5, 6]]), images=images[:1])


def test_mixed_batch_backward_reaches_every_parameter(images):
    torch.manual_seed(0)
    model = Owl2ForCausalLM(Owl2Config.from_spec(ModelConfig.from_preset("debug"))).train()
    batch = _batch("right", with_labels=True)
    # Loss on every text token, so the token after each image reads the last layer's image outputs.
    batch["labels"] = batch["input_ids"].masked_fill((batch["input_ids"] < 0) | (batch["attention_mask"] == 0), -100)
    model(**batch, images=images, use_cache=False).loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()] == []
    # A text-only batch leaves the visual branch, the vision encoder and the abstractor without gradient.
    model.zero_grad(set_to_none=True)
    text = torch.tensor([[1, 5, 6, 7, 8]])
    model(text, labels=text, use_cache=False).loss.backward()
    untouched = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is None}
    assert untouched == {"vision", "abstractor", "decoder"}
    assert model.decoder.layers[0].self_attn.k_proj.visual.weight.grad is None
    assert model.decoder.layers[0].self_attn.k_proj.text.weight.grad is not None


def test_beam_search_with_several_returns_keeps_images_with_their_rows(model, images):
    batch = _batch("left", with_labels=False)
    kwargs = {
        "max_new_tokens": 4,
        "num_beams": 2,
        "num_return_sequences": 2,
        "do_sample": False,
        "pad_token_id": 0,
        "eos_token_id": None,
    }
    generated = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], images=images, **kwargs)
    assert generated.shape[0] == 2 * len(SAMPLES)
    for row in range(len(SAMPLES)):
        ids = torch.tensor([SAMPLES[row][0]])
        alone = model.generate(ids, images=_images_of(row, images) if SAMPLES[row][1] else None, **kwargs)
        assert torch.equal(generated[2 * row : 2 * row + 2, -4:], alone[:, -4:]), f"row {row}"


def test_forward_with_host_image_counts_never_reads_the_device(model, images, op_recorder):
    batch = _batch("right", with_labels=True)
    counts = [n for _, n in SAMPLES]
    with torch.no_grad():
        reference = model(**batch, images=images, use_cache=False)
        with op_recorder:
            out = model(**batch, images=images, image_counts=counts, use_cache=False)
    assert torch.equal(out.logits, reference.logits) and torch.equal(out.loss, reference.loss)
    assert not op_recorder.syncing
    with pytest.raises(ValueError, match="image_counts has 2 entries for a batch of 3 rows"):
        model(**batch, images=images, image_counts=counts[:2])
