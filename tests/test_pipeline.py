"""The Ray Data pipeline end to end: bad records counted exactly, good ones all through, order and resume."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from owl2.config import IMAGE_TOKEN_INDEX, DataConfig, build
from owl2.data.pipeline import Collator, encoded, iterate, samples
from owl2.data.sample import SkipStats, TooManyBadRecords

TOKENS_PER_IMAGE = 3
SIZE = 28


def _png(color, mode="RGB", size=(20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG" if mode != "CMYK" else "JPEG")
    return buffer.getvalue()


def _turns(question="<image>\nWhat colour?", answer="red"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A LLaVA file with 6 good records and one record of every bad kind."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "red.png").write_bytes(_png("red"))
    (root / "cmyk.jpg").write_bytes(_png((0, 255, 255, 0), "CMYK"))
    (root / "rgba.png").write_bytes(_png((0, 0, 255, 128), "RGBA"))
    (root / "palette.png").write_bytes(_png(3, "P"))
    (root / "deep.png").write_bytes(_png(40000, "I;16"))
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_bytes(b"plain text")
    (root / "cut.png").write_bytes(_png("red", size=(64, 64))[:60])
    (root / "huge.png").write_bytes(_png("red", size=(3000, 3000)))
    good = [
        {"id": "good-rgb", "image": "red.png", "conversations": _turns()},
        {"id": "good-cmyk", "image": "cmyk.jpg", "conversations": _turns()},
        {"id": "good-rgba", "image": "rgba.png", "conversations": _turns()},
        {"id": "good-palette", "image": "palette.png", "conversations": _turns()},
        {"id": "good-16bit", "image": "deep.png", "conversations": _turns()},
        {"id": "good-text", "conversations": _turns("Say hi.", "hi")},
    ]
    bad = [
        {"id": "missing_file", "image": "nowhere.png", "conversations": _turns()},
        {"id": "empty_file", "image": "empty.png", "conversations": _turns()},
        {"id": "not_an_image", "image": "text.png", "conversations": _turns()},
        {"id": "truncated_image", "image": "cut.png", "conversations": _turns()},
        {"id": "too_many_pixels", "image": "huge.png", "conversations": _turns()},
        {"id": "malformed_record", "conversations": 42},
        {"id": "no_assistant_turn", "conversations": [{"from": "human", "value": "Anyone?"}]},
        {"id": "image_count_mismatch", "image": ["red.png", "red.png"], "conversations": _turns()},
        {"id": "too_long", "conversations": _turns("word " * 200, "ok")},
    ]
    (root / "data.json").write_text(json.dumps(good + bad))
    return root


def _config(root, tokenizer, **overrides):
    return build(
        DataConfig,
        {
            "sources": [{"format": "llava", "path": str(root / "data.json")}],
            "tokenizer": str(tokenizer),
            "max_length": 64,
            "template": "mplug_owl2",
            "image_size": SIZE,
            "max_image_pixels": 4_000_000,
            **overrides,
        },
        "data",
    )


def _collect(config, stats, **kwargs):
    dataset = encoded(config, TOKENS_PER_IMAGE, **kwargs)
    return list(iterate(dataset, Collator(pad_token_id=0, image_size=SIZE), batch_size=4, stats=stats))


def test_every_bad_kind_is_counted_and_every_good_record_arrives(ray_cluster, corpus, spm_tokenizer_dir):
    stats = SkipStats(max_fraction=1.0)
    batches = _collect(_config(corpus, spm_tokenizer_dir), stats)
    ids = [i for batch in batches for i in batch.ids]
    assert sorted(ids) == ["good-16bit", "good-cmyk", "good-palette", "good-rgb", "good-rgba", "good-text"]
    reasons = [
        "empty_file",
        "image_count_mismatch",
        "malformed_record",
        "missing_file",
        "no_assistant_turn",
        "not_an_image",
        "too_long",
        "too_many_pixels",
        "truncated_image",
    ]
    assert stats.as_dict() == {"total": 15, "ok": 6, "skipped": dict.fromkeys(reasons, 1)}
    assert "nowhere.png" in stats.examples["missing_file"][0]

    for batch in batches:
        assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
        assert (batch.input_ids == IMAGE_TOKEN_INDEX).sum(dim=1).tolist() == batch.image_counts
        assert batch.images.shape == (sum(batch.image_counts), 3, SIZE, SIZE)
        lengths = batch.attention_mask.sum(dim=1)
        assert (batch.attention_mask[:, : int(lengths.min())] == 1).all()  # right padding
        kwargs = batch.to("cpu")
        assert kwargs["images"] is None or kwargs["images"].dtype.is_floating_point


def test_bad_fraction_over_the_limit_stops_with_examples(ray_cluster, corpus, spm_tokenizer_dir):
    stats = SkipStats(max_fraction=0.2, min_records=5)
    with pytest.raises(TooManyBadRecords, match=r"records were bad .*limit 20.0%.*e\.g\."):
        _collect(_config(corpus, spm_tokenizer_dir), stats)


def test_order_is_deterministic_per_seed_and_epoch_and_resumes_exactly(ray_cluster, corpus, spm_tokenizer_dir):
    def keys(**kwargs):
        config = _config(corpus, spm_tokenizer_dir, **{k: v for k, v in kwargs.items() if k == "seed"})
        rest = {k: v for k, v in kwargs.items() if k != "seed"}
        return [(row["order_key"], row["id"]) for row in samples(config, **rest).take_all()]

    first = keys(seed=1)
    assert first == keys(seed=1) and [k for k, _ in first] == sorted(k for k, _ in first)
    assert [i for _, i in first] != [i for _, i in keys(seed=2)]
    assert [i for _, i in first] != [i for _, i in keys(seed=1, epoch=1)]
    # Resuming after the 5th sample yields exactly the rest.
    assert keys(seed=1, after_key=first[4][0]) == first[5:]
    # Two workers split the epoch without overlap or loss.
    shards = [keys(seed=1, rank=r, world_size=2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(first) and not set(shards[0]) & set(shards[1])


def test_one_pass_over_several_epochs_is_those_epochs_in_a_row(ray_cluster, corpus, spm_tokenizer_dir):
    config = _config(corpus, spm_tokenizer_dir, seed=3)

    def rows(**kwargs):
        return [(row["epoch"], row["order_key"], row["id"]) for row in samples(config, **kwargs).take_all()]

    per_epoch = [rows(epoch=e, rank=1, world_size=2) for e in range(1, 4)]
    assert all(epoch == e for e, rows_ in zip(range(1, 4), per_epoch, strict=True) for epoch, _, _ in rows_)
    assert rows(epoch=1, rank=1, world_size=2, epochs=3) == per_epoch[0] + per_epoch[1] + per_epoch[2]
    # A resumed pass starts after the position in its first epoch and takes the later epochs whole.
    after = per_epoch[0][2][1]
    assert rows(epoch=1, rank=1, world_size=2, after_key=after, epochs=2) == per_epoch[0][3:] + per_epoch[1]


def test_weights_repeat_or_thin_a_source_deterministically(ray_cluster, corpus, spm_tokenizer_dir, tmp_path):
    data = str(corpus / "data.json")

    def ids(weight, epoch=0):
        config = build(
            DataConfig,
            {"sources": [{"format": "llava", "path": data, "weight": weight}], "tokenizer": str(spm_tokenizer_dir)},
            "data",
        )
        return sorted(row["id"] for row in samples(config, epoch=epoch).take_all())

    once = ids(1.0)
    assert ids(2.0) == sorted(once * 2)
    half = ids(0.5)
    assert set(half) < set(once) and half == ids(0.5) and half != ids(0.5, epoch=3)
    mixed = build(
        DataConfig,
        {
            "sources": [
                {"format": "llava", "path": data, "name": "a"},
                {"format": "llava", "path": data, "name": "b", "weight": 2.0},
            ],
            "tokenizer": str(spm_tokenizer_dir),
        },
        "data",
    )
    sources = [row["source"] for row in samples(mixed).take_all()]
    assert sources.count("b") == 2 * sources.count("a") == 2 * len(once)
    assert np.mean([s == "a" for s in sources[: len(sources) // 2]]) < 0.9  # interleaved, not concatenated
