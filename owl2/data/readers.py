"""Readers: the image-text formats people have -> a ``ray.data.Dataset`` of samples (see ``sample.py``).

* LLaVA conversations: a JSON array or JSONL of ``{"id", "image", "conversations": [{"from", "value"}]}``
  (``<image>`` or ``<|image|>`` placeholders, multi-turn, text-only rows, ``image`` a path or a list).
* Caption pairs: JSONL, CSV or parquet with an image path or the image bytes, and a caption.
* webdataset shards: ``.tar`` files whose samples are ``{key}.jpg|png|...`` plus ``{key}.txt`` (a caption)
  or ``{key}.json`` (a caption or a LLaVA record).

Every reader reads whole files as bytes with Ray Data (local paths or any URI pyarrow reads, such as
``s3://``) and parses them in tasks, so a broken row becomes a sample with ``error="malformed_record"``
instead of failing the dataset, and every sample gets a unique ``origin`` (``file:row``) from which the
deterministic order is derived. A file that cannot be parsed at all (a truncated JSON array, a corrupt
tar, a JSON or CSV file that is not UTF-8) fails the read with a one-line error naming the file (and the byte
offset); a JSONL line that is not UTF-8 is one skipped sample (``not_utf8``). Image paths are checked here
(web URLs; paths out of the image root, see ``SourceConfig.allow_paths_outside_root``), and shard members
over the byte limits (:class:`ReadLimits`) are skipped without being inflated.

:func:`list_files` names a source's files without reading them, and :func:`read` can read a chosen few of
them: a training worker reads only its own share (``pipeline.py``).
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import ray.data

from owl2.config import IMAGE_PLACEHOLDER, SourceConfig
from owl2.config.data import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_TEXT_BYTES
from owl2.data.sample import WEB_SCHEMES, make_sample

FILE_EXTENSIONS = {"llava": ("json", "jsonl"), "captions": ("jsonl", "csv", "parquet"), "webdataset": ("tar",)}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
LLAVA_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_IMAGE_PATH_COLUMNS = ("image", "image_path", "file_name", "path", "filepath")
_IMAGE_BYTES_COLUMNS = ("image_bytes", "jpg", "jpeg", "png", "webp", "bytes")
_CAPTION_COLUMNS = ("caption", "text", "txt")


@dataclass(frozen=True)
class ReadLimits:
    """Byte limits on what a file holds (``data.max_image_bytes``, ``data.max_text_bytes``): the members of a
    webdataset shard, which a compressed shard would otherwise inflate without bound."""

    image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    text_bytes: int = DEFAULT_MAX_TEXT_BYTES


def read(source: SourceConfig, files: list[str] | None = None, limits: ReadLimits = ReadLimits()) -> ray.data.Dataset:
    """The samples of one source, in file order: of all its files, or only of ``files`` (from
    :func:`list_files`)."""
    parse = PARSERS[source.format]  # looked up here, in the driver: the tasks take this very function
    if files is not None:
        paths = [_with_scheme(path, source) for path in files]
    else:
        paths = [source.path] if isinstance(source.path, str) else list(source.path)
    # Files named one by one: one read task each. Left to Ray, a file (one row: its bytes) is "split" into
    # 2 x CPUs blocks, which keeps the parsing out of the read task: one more task to start.
    named = all(_is_data_file(path, source.format) for path in paths)
    files_read = ray.data.read_binary_files(
        paths,
        include_paths=True,
        file_extensions=list(FILE_EXTENSIONS[source.format]),
        override_num_blocks=len(paths) if named else None,
    )

    def parse_row(row: dict[str, Any]) -> list[dict[str, Any]]:
        return list(parse(row["bytes"], row["path"], source, limits))

    return files_read.flat_map(parse_row)


def list_files(source: SourceConfig) -> list[str]:
    """The data files of a source (folders expanded, hidden files left out), sorted, named as the samples'
    ``origin`` names them (a URI without its scheme). Lists, reads nothing."""
    extensions = list(FILE_EXTENSIONS[source.format])
    try:
        files = ray.data.read_binary_files(source.path, include_paths=True, file_extensions=extensions).input_files()
    except ValueError as error:  # Ray's, e.g. when no file has one of the extensions
        raise ValueError(f"data source {source.label!r} ({source.path}): {error}") from error
    return sorted(files)


def parse_file(
    data: bytes, path: str, source: SourceConfig, limits: ReadLimits = ReadLimits()
) -> Iterator[dict[str, Any]]:
    """The samples of one file's bytes, in file order (what :func:`read` does in its tasks)."""
    return PARSERS[source.format](data, path, source, limits)


# ------------------------------------------------------------------------------------------------ LLaVA


def _parse_llava_file(
    data: bytes, path: str, source: SourceConfig, limits: ReadLimits = ReadLimits()
) -> Iterator[dict[str, Any]]:
    if path.endswith(".jsonl"):
        yield from _jsonl_samples(data, path, source, llava_sample)
        return
    text = _text(data, path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); LLaVA data must be a JSON array or JSONL") from error
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a JSON {type(records).__name__}; LLaVA data must be a JSON array of records")
    for row, record in enumerate(records):
        yield llava_sample(record, path, row, source)


def llava_sample(record: Any, path: str, row: int, source: SourceConfig) -> dict[str, Any]:
    """One LLaVA record -> a sample; structural problems give ``malformed_record``."""
    if not isinstance(record, dict):
        return _malformed(path, row, source, f"record is a {type(record).__name__}, not an object")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        return _malformed(path, row, source, "no 'conversations' list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            return _malformed(path, row, source, f"bad turn {str(turn)[:80]!r}: needs 'from' in {list(ROLES)}")
        content = turn["value"].replace(LLAVA_PLACEHOLDER, IMAGE_PLACEHOLDER)
        messages.append({"role": ROLES[turn["from"]], "content": content})
    images = record.get("image")
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        return _malformed(path, row, source, "'image' must be a path or a list of paths")
    resolved = _images(images, path, row, source)
    if isinstance(resolved, dict):
        return resolved
    return make_sample(
        id=str(record.get("id", f"{path}:{row}")),
        origin=f"{path}:{row}",
        source=source.label,
        task="chat",
        messages=messages,
        images=resolved,
    )


# ------------------------------------------------------------------------------------------------ captions


def _parse_caption_file(
    data: bytes, path: str, source: SourceConfig, limits: ReadLimits = ReadLimits()
) -> Iterator[dict[str, Any]]:
    suffix = path.rsplit(".", 1)[-1].lower()
    if suffix == "jsonl":
        yield from _jsonl_samples(data, path, source, caption_sample)
    elif suffix == "csv":
        for row, record in enumerate(csv.DictReader(io.StringIO(_text(data, path)))):
            yield caption_sample(record, path, row, source)
    elif suffix == "parquet":
        import pyarrow.parquet as pq

        for row, record in enumerate(pq.read_table(io.BytesIO(data)).to_pylist()):
            yield caption_sample(record, path, row, source)
    else:
        raise ValueError(f"{path}: caption files must be .jsonl, .csv or .parquet")


def caption_sample(record: Any, path: str, row: int, source: SourceConfig) -> dict[str, Any]:
    """One caption pair (an image path or bytes, and a caption) -> a ``caption`` sample."""
    if not isinstance(record, dict):
        return _malformed(path, row, source, f"record is a {type(record).__name__}, not an object")
    caption = next((record[c] for c in _CAPTION_COLUMNS if isinstance(record.get(c), str) and record[c].strip()), None)
    image_path = next((record[c] for c in _IMAGE_PATH_COLUMNS if isinstance(record.get(c), str) and record[c]), None)
    image_bytes = next((record[c] for c in _IMAGE_BYTES_COLUMNS if isinstance(record.get(c), bytes)), None)
    if caption is None:
        return _malformed(path, row, source, f"no caption in any of the columns {list(_CAPTION_COLUMNS)}")
    if image_path is None and image_bytes is None:
        return _malformed(
            path, row, source, f"no image path ({list(_IMAGE_PATH_COLUMNS)}) or bytes ({list(_IMAGE_BYTES_COLUMNS)})"
        )
    resolved = [] if image_bytes is not None else _images([image_path], path, row, source)
    if isinstance(resolved, dict):
        return resolved
    return make_sample(
        id=str(record.get("id", f"{path}:{row}")),
        origin=f"{path}:{row}",
        source=source.label,
        task="caption",
        messages=_caption_messages(caption),
        images=resolved,
        image_bytes=[image_bytes] if image_bytes is not None else [],
    )


def _caption_messages(caption: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": IMAGE_PLACEHOLDER}, {"role": "assistant", "content": caption.strip()}]


# ------------------------------------------------------------------------------------------------ webdataset


def _parse_webdataset_file(
    data: bytes, path: str, source: SourceConfig, limits: ReadLimits = ReadLimits()
) -> Iterator[dict[str, Any]]:
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
        members = [member for member in archive.getmembers() if member.isfile()]
    except (tarfile.TarError, EOFError) as error:
        raise ValueError(f"{path} is not a readable tar archive ({error})") from error
    # Samples are groups of adjacent members sharing a key (the name up to its first dot).
    groups: dict[str, dict[str, bytes]] = {}
    oversized: dict[str, str] = {}  # key -> why its sample is skipped
    for member in members:
        name = posixpath.basename(member.name)
        key, _, extension = name.partition(".")
        if not extension or name.startswith("."):
            continue
        key = posixpath.join(posixpath.dirname(member.name), key)
        parts = groups.setdefault(key, {})
        limit = limits.image_bytes if extension.lower() in IMAGE_EXTENSIONS else limits.text_bytes
        if member.size > limit:  # from the header: the member is never inflated
            oversized.setdefault(key, f"member {member.name!r} has {member.size:,} bytes, over the {limit:,} limit")
            continue
        handle = archive.extractfile(member)
        parts[extension.lower()] = handle.read() if handle else b""
    for row, (key, parts) in enumerate(groups.items()):
        if key in oversized:
            yield _skip(path, row, source, "too_many_bytes", oversized[key])
        else:
            yield webdataset_sample(key, parts, path, row, source)


def webdataset_sample(key: str, parts: dict[str, bytes], path: str, row: int, source: SourceConfig) -> dict[str, Any]:
    """One webdataset sample (its members by extension) -> a ``caption`` or ``chat`` sample."""
    image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
    if image is None:
        return _malformed(path, row, source, f"sample {key!r} has no image member ({', '.join(IMAGE_EXTENSIONS)})")
    if "json" in parts:
        try:
            record = json.loads(parts["json"].decode("utf-8"))
        except UnicodeDecodeError as error:
            return _skip(path, row, source, "not_utf8", f"sample {key!r}: the .json member is not UTF-8 ({error})")
        except json.JSONDecodeError as error:
            return _malformed(path, row, source, f"sample {key!r}: invalid JSON ({error})")
        if isinstance(record, dict) and "conversations" in record:
            sample = llava_sample({**record, "image": None}, path, row, source)
            sample.update(id=str(record.get("id", key)), images=[], image_bytes=[image])
            return sample
        if isinstance(record, dict) and any(isinstance(record.get(c), str) for c in _CAPTION_COLUMNS):
            return caption_sample({**record, "image_bytes": image}, path, row, source)
        return _malformed(path, row, source, f"sample {key!r}: JSON has neither 'conversations' nor a caption")
    text = parts.get("txt") or parts.get("caption")
    if text is None:
        return _malformed(path, row, source, f"sample {key!r} has no .txt/.json member")
    try:
        caption = text.decode("utf-8")
    except UnicodeDecodeError as error:
        return _skip(path, row, source, "not_utf8", f"sample {key!r}: caption is not UTF-8 ({error})")
    return caption_sample({"id": key, "caption": caption, "image_bytes": image}, path, row, source)


# The parser of each format: ``(file bytes, file path, source) -> samples``.
PARSERS: dict[str, Callable[[bytes, str, SourceConfig], Iterator[dict[str, Any]]]] = {
    "llava": _parse_llava_file,
    "captions": _parse_caption_file,
    "webdataset": _parse_webdataset_file,
}


# ------------------------------------------------------------------------------------------------ helpers


def _with_scheme(path: str, source: SourceConfig) -> str:
    """A listed path as a URI again: Ray names ``s3://bucket/key`` as ``bucket/key``."""
    first = source.path if isinstance(source.path, str) else source.path[0]
    scheme = first.split("://", 1)[0] if "://" in first else ""
    return f"{scheme}://{path}" if scheme and "://" not in path else path


def _is_data_file(path: str, data_format: str) -> bool:
    """Whether ``path`` names a file of ``data_format`` by its extension (rather than a folder)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return "." in name and name.rsplit(".", 1)[1].lower() in FILE_EXTENSIONS[data_format]


def resolve(image: str, data_file: str, image_root: str | None) -> str:
    """Absolute path/URI of an image named in ``data_file``: under ``image_root`` if given, else beside the file."""
    if "://" in image or image.startswith("/"):
        return image
    base = image_root if image_root is not None else posixpath.dirname(data_file)
    return posixpath.join(base, image) if "://" in base else str(PurePosixPath(base) / image)


def _jsonl_samples(
    data: bytes, path: str, source: SourceConfig, to_sample: Callable[[Any, str, int, SourceConfig], dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """One sample per non-blank line; a line that is not UTF-8 or not JSON becomes a skipped sample."""
    for row, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n")):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield _skip(path, row, source, "not_utf8", f"not UTF-8 at byte {error.start} of the line ({error.reason})")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            yield _malformed(path, row, source, f"invalid JSON: {error}")
            continue
        yield to_sample(record, path, row, source)


def _text(data: bytes, path: str) -> str:
    """A whole file as text (a byte-order mark allowed), or a one-line error naming the file and the offset: a
    JSON array or CSV cannot be cut into records before it is decoded."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8: byte {error.start} ({data[error.start]:#04x}) {error.reason}") from None


def _images(images: list[str], path: str, row: int, source: SourceConfig) -> list[str] | dict[str, Any]:
    """The resolved image paths of a record, or the skipped sample naming the first path that may not be read
    (a web URL; a path out of the root unless ``allow_paths_outside_root``)."""
    root = source.image_root if source.image_root is not None else posixpath.dirname(path)
    resolved = [resolve(image, path, source.image_root) for image in images]
    for image in resolved:
        if image.startswith(WEB_SCHEMES):
            return _skip(
                path, row, source, "web_url", f"image {image!r}: web URLs are not downloaded (fetch them first)"
            )
        if not source.allow_paths_outside_root and not inside(image, root):
            detail = f"image {image!r} is outside the image root {root!r} (source.allow_paths_outside_root is false)"
            return _skip(path, row, source, "outside_image_root", detail)
    return resolved


def inside(image: str, root: str) -> bool:
    """Whether the path/URI ``image`` lies under ``root`` once ``.`` and ``..`` are resolved (no file is read:
    symbolic links inside the root are followed later, as their owner meant)."""
    (image_scheme, image_path), (root_scheme, root_path) = _split_uri(image), _split_uri(root)
    if image_scheme != root_scheme:
        return False
    image_path, root_path = posixpath.normpath(image_path), posixpath.normpath(root_path)
    if root_path == ".":  # a relative root: the current folder
        return not image_path.startswith("/") and image_path != ".." and not image_path.startswith("../")
    return image_path == root_path or image_path.startswith(root_path.rstrip("/") + "/")


def _split_uri(path: str) -> tuple[str, str]:
    scheme, sep, rest = path.partition("://")
    return (scheme, rest) if sep else ("", path)


def _malformed(path: str, row: int, source: SourceConfig, detail: str) -> dict[str, Any]:
    return _skip(path, row, source, "malformed_record", detail)


def _skip(path: str, row: int, source: SourceConfig, reason: str, detail: str) -> dict[str, Any]:
    return make_sample(
        id=f"{path}:{row}",
        origin=f"{path}:{row}",
        source=source.label,
        error=reason,
        detail=f"{path} row {row}: {detail}",
    )
