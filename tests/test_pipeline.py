"""The Ray Data pipeline end to end: bad records counted exactly, good ones all through, order and resume,
and each worker reading only its own files.

Order, weights, passes and shares are pure functions; the tests of their logic run them without Ray
(:func:`_local_samples`), and one Ray test checks that the pipeline yields exactly what they say.
"""

import io
import json
import math
import pickle
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owl2.config import IMAGE_TOKEN_INDEX, DataConfig, build
from owl2.data import readers
from owl2.data.batch import Collator, iterate
from owl2.data.pipeline import EPOCH, ORDER_KEY, Copies, deal, encoded, samples, worker_files
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


def _listing(source) -> list[str]:
    """The files of a source, as ``readers.list_files`` names them (here: local files, or folders of them)."""
    paths = [source.path] if isinstance(source.path, str) else source.path
    files = [file for path in paths for file in (Path(path).rglob("*") if Path(path).is_dir() else [Path(path)])]
    return sorted(str(file) for file in files if file.suffix[1:] in readers.FILE_EXTENSIONS[source.format])


def _local_samples(config, epoch=0, rank=0, world_size=1, after_key=-1, epochs=1):
    """What :func:`samples` yields, computed in this process from its pure parts: deal the files, parse this
    worker's, copy and filter each sample, sort by (epoch, key)."""
    plans = worker_files(
        [_listing(s) for s in config.sources], config.seed, range(epoch, epoch + epochs), rank, world_size
    )
    rows = []
    for source, plan in zip(config.sources, plans, strict=True):
        copies = Copies(source.weight, config.seed, plan, epoch, after_key)
        for path in sorted(plan):
            for sample in readers.parse_file(Path(path).read_bytes(), path, source):
                rows += copies(sample)
    return sorted(rows, key=lambda row: (row[EPOCH], row[ORDER_KEY]))


def test_order_is_deterministic_per_seed_and_epoch_and_resumes_exactly(corpus, spm_tokenizer_dir):
    def keys(**kwargs):
        config = _config(corpus, spm_tokenizer_dir, **{k: v for k, v in kwargs.items() if k == "seed"})
        rest = {k: v for k, v in kwargs.items() if k != "seed"}
        return [(row["order_key"], row["id"]) for row in _local_samples(config, **rest)]

    first = keys(seed=1)
    assert first == keys(seed=1) and [k for k, _ in first] == sorted(k for k, _ in first)
    assert [i for _, i in first] != [i for _, i in keys(seed=2)]
    assert [i for _, i in first] != [i for _, i in keys(seed=1, epoch=1)]
    # Resuming after the 5th sample yields exactly the rest.
    assert keys(seed=1, after_key=first[4][0]) == first[5:]
    # Two workers split the epoch without overlap or loss.
    shards = [keys(seed=1, rank=r, world_size=2) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(first) and not set(shards[0]) & set(shards[1])


def test_one_pass_over_several_epochs_is_those_epochs_in_a_row(corpus, spm_tokenizer_dir):
    config = _config(corpus, spm_tokenizer_dir, seed=3)

    def rows(**kwargs):
        return [(row["epoch"], row["order_key"], row["id"]) for row in _local_samples(config, **kwargs)]

    per_epoch = [rows(epoch=e, rank=1, world_size=2) for e in range(1, 4)]
    assert all(epoch == e for e, rows_ in zip(range(1, 4), per_epoch, strict=True) for epoch, _, _ in rows_)
    assert rows(epoch=1, rank=1, world_size=2, epochs=3) == per_epoch[0] + per_epoch[1] + per_epoch[2]
    # A resumed pass starts after the position in its first epoch and takes the later epochs whole.
    after = per_epoch[0][2][1]
    assert rows(epoch=1, rank=1, world_size=2, after_key=after, epochs=2) == per_epoch[0][3:] + per_epoch[1]


def test_weights_repeat_or_thin_a_source_deterministically(corpus, spm_tokenizer_dir, tmp_path):
    data = str(corpus / "data.json")

    def ids(weight, epoch=0):
        config = build(
            DataConfig,
            {"sources": [{"format": "llava", "path": data, "weight": weight}], "tokenizer": str(spm_tokenizer_dir)},
            "data",
        )
        return sorted(row["id"] for row in _local_samples(config, epoch=epoch))

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
    sources = [row["source"] for row in _local_samples(mixed)]
    assert sources.count("b") == 2 * sources.count("a") == 2 * len(once)
    assert np.mean([s == "a" for s in sources[: len(sources) // 2]]) < 0.9  # interleaved, not concatenated


def _write_shards(folder: Path, name: str, files: int, rows: int) -> list[str]:
    """``files`` LLaVA JSONL files of ``rows`` text-only records each."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        records = [{"id": f"{name}{f}-{r}", "conversations": _turns(f"Q{r}?", f"A{r}")} for r in range(rows)]
        (folder / f"{name}-{f:02d}.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    return sorted(str(path) for path in folder.glob("*.jsonl"))


def _rows(rows) -> list[tuple]:
    return [(int(row[EPOCH]), int(row[ORDER_KEY]), row["source"], row["origin"]) for row in rows]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("num_files", [1, 2, 3, 4, 8, 9])
def test_dealing_gives_each_part_of_each_file_to_one_rank_in_balanced_shares(num_files, world_size):
    files = [f"s3://bucket/shard-{i:02d}.tar" for i in range(num_files)]
    hands = deal(files, seed=5, epoch=2, world_size=world_size, first_rank=1)
    assert hands == deal(files, seed=5, epoch=2, world_size=world_size, first_rank=1)  # deterministic
    (parts,) = {share.parts for hand in hands for share in hand.values()}
    held = Counter((path, share.part) for hand in hands for path, share in hand.items())
    assert held == Counter({(path, part): 1 for path in files for part in range(parts)})
    assert all(share.epoch == 2 for hand in hands for share in hand.values())
    counts = sorted(len(hand) for hand in hands)
    if num_files >= world_size:  # whole files, at most one more for some ranks
        assert parts == 1 and counts[-1] - counts[0] <= 1
    else:  # every rank the same share: n / gcd files, each in world_size / gcd parts
        common = math.gcd(num_files, world_size)
        assert parts == world_size // common and counts == [num_files // common] * world_size


def test_files_change_hands_between_epochs_and_sources_continue_the_deal():
    files = [f"/data/part-{i}.json" for i in range(8)]
    by_epoch = [[sorted(hand) for hand in deal(files, seed=0, epoch=e, world_size=4)] for e in range(3)]
    assert by_epoch[0] != by_epoch[1] != by_epoch[2]
    assert deal(files, seed=0, epoch=0, world_size=4) != deal(files, seed=1, epoch=0, world_size=4)
    # Two sources of 5 files on 4 workers: the second starts where the first stopped, so no rank gets both
    # sources' extra file.
    listings = [[f"/a/{i}.json" for i in range(5)], [f"/b/{i}.json" for i in range(5)]]

    def files_read(epochs):
        plans = [worker_files(listings, 0, epochs, rank, 4) for rank in range(4)]
        return [sum(len(shares) for plan in plans_ for shares in plan.values()) for plans_ in plans]

    assert sorted(files_read(range(1))) == [2, 2, 3, 3]
    # The deal goes on into the next epoch: the ranks short of a file in one get it in the next.
    assert files_read(range(2)) == [5, 5, 5, 5] and files_read(range(6, 8)) == [5, 5, 5, 5]


def test_the_workers_shares_hold_every_sample_copy_once(tmp_path, spm_tokenizer_dir):
    # Source a: 5 files, weight 1.5 (dealt by file on 2 and 3 workers, in parts on 6); b: 2 files (in parts).
    _write_shards(tmp_path / "a", "a", 5, 6)
    config = build(
        DataConfig,
        {
            "sources": [
                {"format": "llava", "path": str(tmp_path / "a"), "weight": 1.5, "name": "a"},
                {"format": "llava", "path": _write_shards(tmp_path / "b", "b", 2, 7), "name": "b"},
            ],
            "tokenizer": str(spm_tokenizer_dir),
            "seed": 11,
        },
        "data",
    )
    whole = _rows(_local_samples(config, epoch=4, epochs=2))
    assert {source for _, _, source, _ in whole} == {"a", "b"} and {e for e, _, _, _ in whole} == {4, 5}
    for world_size in (2, 3, 6):
        shares = [
            _rows(_local_samples(config, epoch=4, rank=r, world_size=world_size, epochs=2)) for r in range(world_size)
        ]
        assert all(share == sorted(share) and share for share in shares)
        assert Counter(row for share in shares for row in share) == Counter(whole)


def _logging_parser(parse, log: Path):
    """``parse``, noting each file it is given in ``log`` (appended from the Ray tasks)."""

    def logged(data, path, source, *limits):
        with open(log, "a") as file:
            file.write(path + "\n")
        return parse(data, path, source, *limits)

    return logged


def test_each_worker_reads_only_its_files_and_together_they_read_the_epoch_once(
    ray_cluster, tmp_path, spm_tokenizer_dir, monkeypatch
):
    files = _write_shards(tmp_path / "shards", "s", 8, 6)
    log = tmp_path / "opened.log"
    monkeypatch.setitem(readers.PARSERS, "llava", _logging_parser(readers.PARSERS["llava"], log))
    source = {"format": "llava", "path": str(tmp_path / "shards"), "weight": 1.5}
    config = build(DataConfig, {"sources": [source], "tokenizer": str(spm_tokenizer_dir), "seed": 2}, "data")

    def run(rank, world_size):
        log.write_text("")
        rows = _rows(samples(config, epoch=1, rank=rank, world_size=world_size).take_all())
        return rows, log.read_text().split()

    shares = [run(rank, 4) for rank in range(4)]
    for rank, (rows, opened) in enumerate(shares):
        assert len(opened) == len(set(opened)) == 2, opened  # its own 2 files, each read once
        assert {origin.rsplit(":", 1)[0] for _, _, _, origin in rows} == set(opened)
        assert rows == _rows(_local_samples(config, epoch=1, rank=rank, world_size=4))  # what the pure parts say
    assert sorted(path for _, opened in shares for path in opened) == files
    # Together: the epoch of a single worker (reading all 8 files), every sample copy exactly once.
    whole = _rows(_local_samples(config, epoch=1))
    assert len(whole) > 8 * 6 and Counter(row for rows, _ in shares for row in rows) == Counter(whole)


def test_the_pipeline_steps_run_without_importing_torch(ray_cluster, corpus, spm_tokenizer_dir, tmp_path):
    """Ray Data's worker processes import what the pipeline's steps need; torch would cost each fresh one
    seconds. A block read here is encoded in a process that imports the pipeline but never torch."""
    config = _config(corpus, spm_tokenizer_dir)
    (tmp_path / "config.pkl").write_bytes(pickle.dumps((config, samples(config).take_batch(32, batch_format="numpy"))))
    script = textwrap.dedent(
        f"""
        import pickle, sys
        from owl2.data import pipeline
        config, rows = pickle.loads(open({str(tmp_path / "config.pkl")!r}, "rb").read())
        out = pipeline.encode(rows, config, tokens_per_image={TOKENS_PER_IMAGE})
        print(sorted(str(i) for i, error in zip(out["id"], out["error"]) if not error), "torch" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    good = ["good-16bit", "good-cmyk", "good-palette", "good-rgb", "good-rgba", "good-text"]
    assert done.stdout.strip() == f"{good} False"
