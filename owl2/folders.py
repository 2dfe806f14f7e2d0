"""Folders written whole: a manifest of their files, written last and verified before use, and replacement of
an old folder with no moment at which neither the old nor the new one exists on disk.

A folder is written into a temporary sibling (:func:`replacing`); its files, then the manifest, are flushed to
disk (``fsync``) with the folder itself; then the old folder, if any, is renamed aside, the new one renamed
into place, and the old one deleted. A crash leaves the old folder (in place or aside) or the complete new
one, never half of one. Copies made later (Ray Train uploads checkpoints to its storage) are checked against
the manifest by :func:`verify`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Not plain manifest.json: other folders have files of that name (the golden vectors beside this repository).
MANIFEST = "owl2_manifest.json"
FORMAT_VERSION = 1
_CHUNK = 8 * 1024 * 1024


class DamagedFolder(ValueError):
    """A folder whose files do not match its manifest (or that has none); the message is one line."""


def sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | Path, step: int | None = None) -> dict[str, Any]:
    """Write ``manifest.json`` listing every other file under ``folder`` (size, sha256); call it last."""
    folder = Path(folder)
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name != MANIFEST)
    manifest = {
        "format": FORMAT_VERSION,
        "step": step,
        "files": {
            path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": sha256(path)} for path in files
        },
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def has_manifest(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


# Folders this process verified, with the size and modification time of each file then: a worker reads a
# checkpoint's hashes once, not once for the weights and once more for the optimizer state.
_verified: set[tuple[str, tuple[tuple[str, int, int], ...]]] = set()


def _stamp(folder: Path, names: list[str]) -> tuple[str, tuple[tuple[str, int, int], ...]]:
    stats = [(name, (folder / name).stat()) for name in [MANIFEST, *names]]
    return str(folder.resolve()), tuple((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats)


def verify(folder: str | Path, shown_as: str | None = None) -> dict[str, Any]:
    """The manifest of ``folder`` once every file it lists has its size and sha256; else :class:`DamagedFolder`
    naming the folder (``shown_as``: where it was downloaded from) and the first missing or bad file."""
    folder = Path(folder)
    manifest = looks_complete(folder, shown_as)
    files = manifest["files"]
    stamp = _stamp(folder, list(files))
    if stamp not in _verified:
        for name, expected in files.items():
            problem = _file_problem(folder / name, expected, hashed=True)
            if problem:
                raise DamagedFolder(f"checkpoint {shown_as or folder} is damaged: {name} {problem}")
        _verified.add(stamp)
    return manifest


def looks_complete(folder: str | Path, shown_as: str | None = None) -> dict[str, Any]:
    """The manifest of ``folder`` once every file it lists is there with its size (no hashing: cheap for a
    7B checkpoint); else :class:`DamagedFolder`. :func:`verify` checks the hashes too."""
    folder = Path(folder)
    manifest_file = folder / MANIFEST

    def damaged(problem: str) -> DamagedFolder:
        return DamagedFolder(f"checkpoint {shown_as or folder} is damaged: {problem}")

    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        version = manifest["format"]
    except FileNotFoundError:
        raise damaged(f"{MANIFEST} is missing (it is written last: the folder is incomplete)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise damaged(f"{MANIFEST} is unreadable ({error.__class__.__name__}: {error})") from None
    if version != FORMAT_VERSION:
        raise damaged(f"{MANIFEST} has format {version!r}; this owl2 reads format {FORMAT_VERSION}")
    for name, expected in files.items():
        problem = _file_problem(folder / name, expected, hashed=False)
        if problem:
            raise damaged(f"{name} {problem}")
    return manifest


def _file_problem(path: Path, expected: dict[str, Any], hashed: bool) -> str | None:
    """What is wrong with one file: its presence and size (cheap, checked for every file first), or its hash."""
    if hashed:
        return "does not match its sha256 in the manifest" if sha256(path) != expected["sha256"] else None
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != expected["size"]:
        return f"has {size:,} bytes; the manifest says {expected['size']:,}"
    return None


@contextmanager
def replacing(folder: str | Path, step: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``folder`` to write into; when the block ends without an error, add
    the manifest, flush everything to disk and put the new folder in place of the old (see the module
    docstring). On an error the temporary folder is removed and ``folder`` is left as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.new-", dir=folder.parent))
    try:
        yield staging
        write_manifest(staging, step)
        _sync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap(staging, folder)


def _swap(staging: Path, folder: Path) -> None:
    aside = None
    if folder.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, aside / folder.name)  # the old folder stays whole until the new one is in place
    os.replace(staging, folder)
    _sync_folder(folder.parent)
    if aside is not None:
        shutil.rmtree(aside)


def _sync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())
    for path in [*(p for p in folder.rglob("*") if p.is_dir()), folder]:
        _sync_folder(path)


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
