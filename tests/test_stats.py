"""``owl2 data stats`` on a shapes world with a few broken records added, and with poison records."""

import json
import os
import shutil

import pytest

from owl2.cli import main
from owl2.data.packing import padding_efficiency
from owl2.data.sample import SKIP_REASONS


@pytest.fixture(scope="module")
def world(tmp_path_factory, shapes_world):
    root = tmp_path_factory.mktemp("world") / "shapes_world"
    shutil.copytree(shapes_world, root)  # a copy to break: the shared world stays intact
    records = json.loads((root / "llava" / "train.json").read_text())
    images = [r for r in records if "image" in r]
    images[0]["image"] = "images/train/missing.png"
    (root / "images" / "train" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    images[1]["image"] = "images/train/broken.png"
    records.append({"id": "lonely", "conversations": [{"from": "human", "value": "Hello?"}]})
    (root / "llava" / "train.json").write_text(json.dumps(records))
    return root, len(records)


def test_stats_counts_skips_and_summarises_lengths(ray_cluster, world, capsys):
    root, total = world
    args = [
        "data",
        "stats",
        "--format",
        "llava",
        "--path",
        str(root / "llava" / "train.json"),
        "--image-root",
        str(root),
        "--tokenizer",
        str(root / "tokenizer"),
        "--preset",
        "tiny-cpu",
        "--image-size",
        "112",
        "--template",
        "mplug_owl2",
        "--micro-batch-size",
        "4",
    ]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total"] == total
    assert summary["skipped"] == {"missing_file": 1, "no_assistant_turn": 1, "not_an_image": 1}
    assert summary["ok"] == total - 3
    assert "missing.png" in summary["skip_examples"]["missing_file"][0]
    lengths = summary["token_length"]
    assert lengths["min"] <= lengths["p50"] <= lengths["p99"] <= lengths["max"] <= 2048
    assert set(summary["images_per_sample"]) <= {"0", "1"} and summary["tokens_per_image"] == 17
    assert sum(summary["images_per_sample"].values()) == summary["ok"]
    # Rows of one sample pad to each micro-batch's longest; packed, every micro-batch of 4 fits one row of 2048.
    assert summary["micro_batch_size"] == 4 and summary["max_length"] == 2048
    assert 0.3 < summary["padding_efficiency"]["padded"] < 1 and summary["padding_efficiency"]["packed"] == 1.0


def test_padding_efficiency_counts_real_tokens_over_the_tokens_run() -> None:
    # [10, 30, 20] pads to 3 rows of 30, or packs to [10 + 30] and [20] in 2 rows of 40; [40] is full either way.
    assert padding_efficiency([[10, 30, 20], [40]], 40) == {
        "padded": round(100 / 130, 4),
        "packed": round(100 / 120, 4),
    }
    assert padding_efficiency([[], [7]], 40) == {"padded": 1.0, "packed": 1.0}  # a batch of only bad records
    assert padding_efficiency([], 40) == {}


def test_stats_rejects_a_bad_template_before_any_work(capsys):
    with pytest.raises(SystemExit):
        main(["data", "stats", "--format", "llava", "--path", "x.json", "--tokenizer", "t", "--template", "chatml"])
    assert "invalid choice: 'chatml'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, shapes_world):
    """A JSONL copy of the world's LLaVA records plus one poison record of each kind the pipeline must survive."""
    from PIL import Image

    root = tmp_path_factory.mktemp("poisoned") / "shapes_world"
    shutil.copytree(shapes_world, root)
    os.mkfifo(root / "images" / "train" / "pipe.png")  # opening it would hang the worker
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "cam"
    raw = bytearray(exif.tobytes())
    raw[6 + 11], raw[6 + 18] = 41, 229  # Pillow's EXIF rotation raises struct.error on this one
    Image.new("RGB", (8, 6)).save(root / "images" / "train" / "rotated.jpg", "JPEG", exif=bytes(raw))
    records = json.loads((root / "llava" / "train.json").read_text())
    template = next(record for record in records if "image" in record)
    poison = {
        "bad_path": "images/train/a\0b.png",
        "not_a_file": "images/train/pipe.png",
        "web_url": "https://example.com/cat.png",
        "outside_image_root": "../../etc/passwd",
        "image_error": "images/train/rotated.jpg",
    }
    lines = [json.dumps(record).encode() for record in records]
    lines += [json.dumps({**template, "id": reason, "image": image}).encode() for reason, image in poison.items()]
    lines.append(b'{"id": "latin-1", "caf\xe9": 1}')
    (root / "llava" / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root, len(lines), [*poison, "not_utf8"]


def test_stats_survive_every_poison_record_and_name_each_reason_with_its_origin(ray_cluster, poisoned, capsys):
    root, total, reasons = poisoned
    data = root / "llava" / "train.jsonl"
    args = ["data", "stats", "--format", "llava", "--path", str(data), "--image-root", str(root)]
    args += ["--tokenizer", str(root / "tokenizer"), "--preset", "tiny-cpu", "--image-size", "112"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total"] == total and summary["skipped"] == {reason: 1 for reason in reasons}
    assert summary["skip_reasons"] == {reason: SKIP_REASONS[reason] for reason in sorted(reasons)}
    for row, reason in enumerate(reasons, start=total - len(reasons)):
        [example] = summary["skip_examples"][reason]
        assert example.startswith(f"{data}:{row}: ") or f"{data} row {row}: " in example, (reason, example)
