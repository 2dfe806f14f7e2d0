"""``owl2 data stats`` on a shapes world with a few broken records added."""

import json
import shutil

import pytest

from owl2.cli import main


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


def test_stats_rejects_a_bad_template_before_any_work(capsys):
    with pytest.raises(SystemExit):
        main(["data", "stats", "--format", "llava", "--path", "x.json", "--tokenizer", "t", "--template", "chatml"])
    assert "invalid choice: 'chatml'" in capsys.readouterr().err
