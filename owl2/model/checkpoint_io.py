"""Checkpoint files: reading safetensors and legacy ``.bin`` shards safely, ``config.json``, and loading
converted tensors into a model with a report of what was missing, unexpected or dropped.

Loading refuses shape mismatches and TorchScript archives (code, not just weights).
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from owl2.folders import has_manifest, verify
from owl2.model.keymaps import Conversion

logger = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or folder: safetensors (single or sharded) or legacy ``.bin`` shards.

    Legacy pickles are read with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        for index_name, single_name in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            index = path / index_name
            if index.is_file():
                shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                files = [path / name for name in shard_names]
                break
            if (path / single_name).is_file():
                files = [path / single_name]
                break
        else:
            raise FileNotFoundError(f"{path} holds no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state_dict.update(load_file(str(file)))
        elif _is_torchscript(file):
            raise ValueError(
                f"{file} is a TorchScript archive, which holds code as well as weights: extract the weights once "
                "with torch.jit.load(path).state_dict() (trusted files only) and save them with safetensors"
            )
        else:
            state_dict.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return state_dict


def _is_torchscript(file: Path) -> bool:
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        return any(
            name.endswith("/constants.pkl") or name.startswith("code/") or "/code/" in name
            for name in archive.namelist()
        )


def read_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a model folder; a folder with owl2's manifest (a checkpoint, a converted model) is
    verified first, whole. Folders without one (released models, checkpoints older than manifests) load as
    before; resuming training requires the manifest (``owl2.train.checkpoint``)."""
    if has_manifest(folder):
        verify(folder)
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    return json.loads(config_file.read_text())


@dataclass
class LoadReport:
    """What a load left out: model keys nobody provided, and provided keys the model does not have."""

    missing: list[str]
    unexpected: list[str]
    dropped: list[str]

    def log(self, what: str, fresh: tuple[str, ...] = ()) -> None:
        """Log the counts; keys under the ``fresh`` prefixes are new on purpose, not missing."""
        new = [key for key in self.missing if key.startswith(fresh)]
        missing = [key for key in self.missing if not key.startswith(fresh)]
        logger.info(
            "loaded %s: %d new (freshly initialised), %d missing, %d unexpected, %d dropped on purpose",
            what,
            len(new),
            len(missing),
            len(self.unexpected),
            len(self.dropped),
        )
        for kind, keys in (("missing", missing), ("unexpected", self.unexpected)):
            if keys:
                logger.warning("%s %s keys: %s", what, kind, ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))


def load_into(model: torch.nn.Module, conversion: Conversion) -> LoadReport:
    """Copy converted tensors into ``model``; shape mismatches are errors naming every offending key."""
    own = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
        for key, value in conversion.state_dict.items()
        if key in own and value.shape != own[key].shape
    ]
    if mismatched:
        raise ValueError("shape mismatch while loading weights:\n  " + "\n  ".join(mismatched))
    result = model.load_state_dict(conversion.state_dict, strict=False)
    return LoadReport(
        sorted(result.missing_keys), sorted(result.unexpected_keys + conversion.unexpected), sorted(conversion.dropped)
    )
