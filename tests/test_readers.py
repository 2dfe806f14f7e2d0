"""Readers: each format, written here to disk, becomes samples; broken rows become counted samples."""

import csv
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from owl2.config import IMAGE_PLACEHOLDER, SourceConfig
from owl2.data.readers import ReadLimits, list_files, parse_file, read
from owl2.data.sample import decode_messages


def _rows(source: SourceConfig) -> dict[str, dict]:
    return {row["id"]: row for row in read(source).take_all()}


def test_llava_json_conversations_placeholders_and_text_only_rows(ray_cluster, tmp_path):
    records = [
        {
            "id": "a",
            "image": "imgs/a.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A cat."},
                {"from": "human", "value": "Colour?"},
                {"from": "gpt", "value": "Grey."},
            ],
        },
        {
            "id": "b",
            "image": ["x.png", "y.png"],
            "conversations": [{"from": "human", "value": "<|image|><|image|>Same?"}, {"from": "gpt", "value": "No."}],
        },
        {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "d", "conversations": "not a list"},
        ["not", "a", "record"],
        {"id": "f", "conversations": [{"from": "robot", "value": "?"}]},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    rows = _rows(SourceConfig(format="llava", path=str(tmp_path / "train.json"), image_root="/data/coco"))

    a = rows["a"]
    assert a["task"] == "chat" and a["error"] == "" and a["source"] == "train"
    assert a["images"] == ["/data/coco/imgs/a.jpg"]
    assert decode_messages(a["messages"]) == [
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nWhat is it?"},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Grey."},
    ]
    assert rows["b"]["images"] == ["/data/coco/x.png", "/data/coco/y.png"]
    assert decode_messages(rows["b"]["messages"])[0]["content"].count(IMAGE_PLACEHOLDER) == 2
    assert rows["c"]["images"] == [] and rows["c"]["error"] == ""
    malformed = [row for row in rows.values() if row["error"]]
    assert len(malformed) == 3 and {row["error"] for row in malformed} == {"malformed_record"}
    assert all(str(tmp_path / "train.json") in row["detail"] for row in malformed)
    assert len({row["origin"] for row in rows.values()}) == 6


def test_llava_jsonl_with_a_broken_line_and_images_beside_the_file(ray_cluster, tmp_path):
    lines = [
        json.dumps(
            {
                "id": "ok",
                "image": "a.png",
                "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}],
            }
        ),
        "{not json",
        "",
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines))
    rows = list(read(SourceConfig(format="llava", path=str(tmp_path / "data.jsonl"))).take_all())
    assert len(rows) == 2
    good = next(row for row in rows if not row["error"])
    assert good["images"] == [str(tmp_path / "a.png")]
    bad = next(row for row in rows if row["error"])
    assert bad["error"] == "malformed_record" and "row 1" in bad["detail"] and "invalid JSON" in bad["detail"]


def test_a_truncated_json_array_names_the_file(ray_cluster, tmp_path):
    (tmp_path / "broken.json").write_text('[{"id": "a"')
    with pytest.raises(Exception, match="broken.json is not valid JSON"):
        read(SourceConfig(format="llava", path=str(tmp_path / "broken.json"))).take_all()


def test_captions_in_jsonl_csv_and_parquet_with_paths_or_bytes(ray_cluster, tmp_path):
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"image": "p/1.jpg", "caption": " a dog "}) + "\n" + json.dumps({"image": "p/2.jpg"}) + "\n"
    )
    with open(tmp_path / "c.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["id", "file_name", "text"])
        writer.writeheader()
        writer.writerow({"id": "csv1", "file_name": "q.png", "text": "a bird"})
    pq.write_table(
        pa.table({"id": ["pq1"], "image_bytes": [b"\x89PNG..."], "caption": ["a fish"]}), tmp_path / "c.parquet"
    )

    jsonl = list(
        read(SourceConfig(format="captions", path=str(tmp_path / "c.jsonl"), image_root="s3://b/imgs")).take_all()
    )
    good = next(row for row in jsonl if not row["error"])
    assert good["task"] == "caption" and good["images"] == ["s3://b/imgs/p/1.jpg"]
    assert decode_messages(good["messages"]) == [
        {"role": "user", "content": IMAGE_PLACEHOLDER},
        {"role": "assistant", "content": "a dog"},
    ]
    assert [row["error"] for row in jsonl if row["error"]] == ["malformed_record"]

    csv_row = _rows(SourceConfig(format="captions", path=str(tmp_path / "c.csv")))["csv1"]
    assert csv_row["images"] == [str(tmp_path / "q.png")]
    parquet_row = _rows(SourceConfig(format="captions", path=str(tmp_path / "c.parquet")))["pq1"]
    assert parquet_row["images"] == [] and parquet_row["image_bytes"] == [b"\x89PNG..."]


def _tar(path, members):
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_webdataset_shards_with_captions_and_conversations(ray_cluster, tmp_path):
    conversation = {
        "id": "conv",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "This."}],
    }
    _tar(
        tmp_path / "shard-000000.tar",
        [
            ("s1.jpg", b"jpegbytes"),
            ("s1.txt", b"a red ball"),
            ("s2.png", b"pngbytes"),
            ("s2.json", json.dumps(conversation).encode()),
            ("s3.txt", b"caption without an image"),
            ("s4.jpg", b"x"),
            ("s4.json", b"{broken"),
        ],
    )
    rows = list(read(SourceConfig(format="webdataset", path=str(tmp_path))).take_all())
    by_id = {row["id"]: row for row in rows}
    assert by_id["s1"]["task"] == "caption" and by_id["s1"]["image_bytes"] == [b"jpegbytes"]
    assert by_id["conv"]["task"] == "chat" and by_id["conv"]["image_bytes"] == [b"pngbytes"]
    assert decode_messages(by_id["conv"]["messages"])[0]["content"] == f"{IMAGE_PLACEHOLDER}\nWhat?"
    assert sorted(row["error"] for row in rows if row["error"]) == ["malformed_record", "malformed_record"]


def test_listing_names_the_files_and_reads_none_and_a_worker_reads_only_the_files_it_names(ray_cluster, tmp_path):
    def record(name):
        return json.dumps(
            {"id": name, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
        )

    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "a.jsonl").write_text(record("a"))
    (tmp_path / "deep" / "er" / "b.json").write_text(f"[{record('b')}]")
    (tmp_path / "c.json").write_text('[{"id": "c", ')  # would fail a read that parsed it
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / ".hidden.jsonl").write_text(record("hidden"))
    source = SourceConfig(format="llava", path=str(tmp_path))
    files = list_files(source)
    assert files == [str(tmp_path / "a.jsonl"), str(tmp_path / "c.json"), str(tmp_path / "deep" / "er" / "b.json")]
    rows = read(source, files=[files[0], files[2]]).take_all()
    assert sorted(row["id"] for row in rows) == ["a", "b"] and not any(row["error"] for row in rows)
    assert sorted(row["origin"] for row in rows) == [f"{files[0]}:0", f"{files[2]}:0"]
    with pytest.raises(ValueError, match=r"data source 'x' \(.*\): No input files found.*\['tar'\]"):
        list_files(SourceConfig(format="webdataset", path=str(tmp_path), name="x"))


def test_unknown_format_is_a_config_error():
    from owl2.config import ConfigError

    with pytest.raises(ConfigError, match="format 'coco' must be one of"):
        SourceConfig(format="coco", path="x")


# ------------------------------------------------------------------------------------------------ poison records


def _llava(image=None, id="r"):
    record = {"id": id, "conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]}
    return {**record, "image": image} if image is not None else record


def _parsed(path, source):
    return list(parse_file(path.read_bytes(), str(path), source))


def test_a_jsonl_line_that_is_not_utf8_is_a_named_skip_with_its_line(ray_cluster, tmp_path):
    good = json.dumps(_llava("a.png", "good")).encode()
    (tmp_path / "data.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good[:-2] + b"\xff\xfe}\n" + good + b"\n")
    rows = list(read(SourceConfig(format="llava", path=str(tmp_path / "data.jsonl"))).take_all())
    assert sorted(row["error"] for row in rows) == ["", "", "not_utf8"]  # the byte-order mark is no problem
    bad = next(row for row in rows if row["error"])
    assert bad["origin"] == f"{tmp_path / 'data.jsonl'}:1" and "row 1: not UTF-8 at byte" in bad["detail"]


def test_json_and_csv_files_that_are_not_utf8_name_the_file_and_the_offset_and_a_csv_bom_is_read(tmp_path):
    (tmp_path / "bad.json").write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"bad\.json is not UTF-8: byte 12 \(0xe9\)"):
        _parsed(tmp_path / "bad.json", SourceConfig(format="llava", path=str(tmp_path / "bad.json")))
    (tmp_path / "bad.csv").write_bytes(b"image,caption\na.png,caf\xe9\n")
    with pytest.raises(ValueError, match=r"bad\.csv is not UTF-8: byte 23 \(0xe9\)"):
        _parsed(tmp_path / "bad.csv", SourceConfig(format="captions", path=str(tmp_path / "bad.csv")))
    (tmp_path / "bom.csv").write_bytes("\ufeffimage,caption\na.png,café\n".encode())
    [row] = _parsed(tmp_path / "bom.csv", SourceConfig(format="captions", path=str(tmp_path / "bom.csv")))
    assert row["error"] == "" and row["images"] == [str(tmp_path / "a.png")]
    assert decode_messages(row["messages"])[1]["content"] == "café"


def test_image_paths_are_kept_inside_the_root_unless_the_source_allows_otherwise(tmp_path):
    records = [
        _llava("imgs/ok.png", "inside"),
        _llava("imgs/../imgs/ok.png", "dots-inside"),
        _llava("../secret.png", "dots-out"),
        _llava("/etc/passwd", "absolute"),
        _llava(str(tmp_path / "root" / "x.png"), "absolute-inside"),
        _llava("s3://other-bucket/x.png", "other-bucket"),
        _llava("https://example.com/x.png", "web"),
        _llava(["imgs/ok.png", "/dev/zero"], "second-out"),
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    source = SourceConfig(format="llava", path=str(tmp_path / "data.json"), image_root=str(tmp_path / "root"))
    rows = _parsed(tmp_path / "data.json", source)
    outside = "outside_image_root"
    assert [row["error"] for row in rows] == ["", "", outside, outside, "", outside, "web_url", outside]
    assert rows[1]["images"] == [str(tmp_path / "root" / "imgs/../imgs/ok.png")]  # kept as named, once checked
    assert "row 3: image '/etc/passwd' is outside the image root" in rows[3]["detail"]

    lenient = SourceConfig(
        format="llava",
        path=str(tmp_path / "data.json"),
        image_root=str(tmp_path / "root"),
        allow_paths_outside_root=True,
    )
    errors = [row["error"] for row in _parsed(tmp_path / "data.json", lenient)]
    assert errors == ["", "", "", "", "", "", "web_url", ""]  # web URLs are never read

    captions = tmp_path / "c.jsonl"
    captions.write_text(json.dumps({"image": "../up.png", "caption": "c"}) + "\n")
    [caption] = _parsed(captions, SourceConfig(format="captions", path=str(captions)))  # root: the file's folder
    assert caption["error"] == "outside_image_root"


def test_a_compressed_shard_never_inflates_an_oversized_member(tmp_path):
    shard = tmp_path / "shard.tar"  # gzip inside, as webdataset writers name them
    with tarfile.open(shard, "w:gz") as archive:
        for name, data in [
            ("ok.jpg", b"jpeg"),
            ("ok.txt", b"fine"),
            ("huge.png", bytes(4096)),  # zeros: a bomb in miniature
            ("huge.txt", b"x"),
            ("long.jpg", b"j"),
            ("long.json", b" " * 2048),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    source = SourceConfig(format="webdataset", path=str(shard))
    rows = list(parse_file(shard.read_bytes(), str(shard), source, ReadLimits(image_bytes=1024, text_bytes=1024)))
    assert [row["error"] for row in rows] == ["", "too_many_bytes", "too_many_bytes"]
    assert "'huge.png' has 4,096 bytes, over the 1,024 limit" in rows[1]["detail"]
    assert "'long.json' has 2,048 bytes" in rows[2]["detail"]
