"""Checks of a data config that the driver runs before Ray starts: every local path it names exists.

A wrong path found by a Ray Data task costs a cluster start, worker start-up and retries, then reports a
traceback; found here it costs a ``stat`` and one line naming the key. URIs (``s3://...``) are left to the
readers: checking them would need credentials and network round trips on the driver.
"""

from __future__ import annotations

from pathlib import Path

from owl2.config import ConfigError, DataConfig


def check_data(data: DataConfig, where: str = "data") -> None:
    """Raise :class:`ConfigError` naming the key (``stages.stage1.data.sources[0].path``) of the first local
    path that does not exist, an image root that is not a folder, or a tokenizer folder without tokenizer.model."""
    problem = first_problem(data)
    if problem is not None:
        key, message = problem
        raise ConfigError(f"{where}.{key} {message}")


def first_problem(data: DataConfig) -> tuple[str, str] | None:
    """``(key, message)`` of the first missing local path, e.g. ``("sources[0].path", "/x does not exist")``."""
    for index, source in enumerate(data.sources):
        for path in [source.path] if isinstance(source.path, str) else source.path:
            local = _local(path)
            if local is not None and not local.exists():
                return f"sources[{index}].path", f"{path} does not exist"
        root = _local(source.image_root)
        if root is not None and not root.is_dir():
            return f"sources[{index}].image_root", f"{source.image_root} {_missing_or(root, 'is not a folder')}"
    tokenizer = _local(data.tokenizer)
    if tokenizer is not None and not (tokenizer / "tokenizer.model").is_file():
        return "tokenizer", f"{data.tokenizer} {_missing_or(tokenizer, 'has no tokenizer.model')}"
    return None


def _local(path: str | None) -> Path | None:
    """The local path a config value names, or None for an empty value or a remote URI."""
    if not path or ("://" in path and not path.startswith("file://")):
        return None
    return Path(path.removeprefix("file://")).expanduser()


def _missing_or(path: Path, otherwise: str) -> str:
    return otherwise if path.exists() else "does not exist"
