"""State-dict adapters: explicit key-mapping tables from other layouts to owl2's, and checkpoint I/O.

Each table row maps one source key pattern to one or more owl2 keys, optionally through a tensor
transform. Patterns use ``{i}`` for a layer number and ``{p}`` for ``weight``/``bias``. A source key
no row matches is *unexpected*; a row with no target drops a key on purpose (buffers that owl2
recomputes). Loading reports missing and unexpected keys and refuses shape mismatches.

Tables: ``OFFICIAL`` (the released mPLUG-Owl2 checkpoint), ``LLAMA`` (a transformers LLaMA-2 folder:
K/V and norms are copied into both modality branches).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from owl2.config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor, ModelConfig], torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """``source`` pattern -> ``targets`` (owl2 keys, same placeholders), through ``transform``."""

    source: str
    targets: tuple[str, ...]
    transform: Transform | None = None


def _rule(source: str, *targets: str, transform: Transform | None = None) -> Rule:
    return Rule(source, targets, transform)


def interleaved_qkv_to_grouped(tensor: torch.Tensor, spec: ModelConfig) -> torch.Tensor:
    """Official fused QKV rows are per head ``[q_h; k_h; v_h]``; timm wants ``[q; k; v]`` over all heads."""
    heads = spec.vision.num_heads
    rest = tensor.shape[1:]
    head_dim = tensor.shape[0] // (3 * heads)
    return tensor.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(tensor.shape)


OFFICIAL: tuple[Rule, ...] = (
    # Decoder: modality copies multiway.0 (text) and multiway.1 (visual).
    _rule("model.embed_tokens.weight", "decoder.embed_tokens.weight"),
    _rule("model.layers.{i}.self_attn.q_proj.weight", "decoder.layers.{i}.self_attn.q_proj.weight"),
    _rule("model.layers.{i}.self_attn.o_proj.weight", "decoder.layers.{i}.self_attn.o_proj.weight"),
    _rule("model.layers.{i}.self_attn.k_proj.multiway.0.weight", "decoder.layers.{i}.self_attn.k_proj.text.weight"),
    _rule("model.layers.{i}.self_attn.k_proj.multiway.1.weight", "decoder.layers.{i}.self_attn.k_proj.visual.weight"),
    _rule("model.layers.{i}.self_attn.v_proj.multiway.0.weight", "decoder.layers.{i}.self_attn.v_proj.text.weight"),
    _rule("model.layers.{i}.self_attn.v_proj.multiway.1.weight", "decoder.layers.{i}.self_attn.v_proj.visual.weight"),
    _rule("model.layers.{i}.self_attn.rotary_emb.inv_freq"),
    _rule("model.layers.{i}.input_layernorm.multiway.0.weight", "decoder.layers.{i}.input_layernorm.text.weight"),
    _rule("model.layers.{i}.input_layernorm.multiway.1.weight", "decoder.layers.{i}.input_layernorm.visual.weight"),
    _rule("model.layers.{i}.post_attention_layernorm.multiway.0.weight",
          "decoder.layers.{i}.post_attention_layernorm.text.weight"),
    _rule("model.layers.{i}.post_attention_layernorm.multiway.1.weight",
          "decoder.layers.{i}.post_attention_layernorm.visual.weight"),
    _rule("model.layers.{i}.mlp.gate_proj.weight", "decoder.layers.{i}.mlp.gate_proj.weight"),
    _rule("model.layers.{i}.mlp.up_proj.weight", "decoder.layers.{i}.mlp.up_proj.weight"),
    _rule("model.layers.{i}.mlp.down_proj.weight", "decoder.layers.{i}.mlp.down_proj.weight"),
    _rule("model.norm.weight", "decoder.norm.weight"),
    _rule("lm_head.weight", "lm_head.weight"),
    # Vision encoder (official ViT -> timm names).
    _rule("model.vision_model.embeddings.cls_token", "vision.cls_token"),
    _rule("model.vision_model.embeddings.position_embedding", "vision.pos_embed"),
    _rule("model.vision_model.embeddings.patch_embed.weight", "vision.patch_embed.proj.weight"),
    _rule("model.vision_model.embeddings.pre_layernorm.{p}", "vision.norm_pre.{p}"),
    _rule("model.vision_model.encoder.layers.{i}.input_layernorm.{p}", "vision.blocks.{i}.norm1.{p}"),
    _rule("model.vision_model.encoder.layers.{i}.self_attn.query_key_value.{p}", "vision.blocks.{i}.attn.qkv.{p}",
          transform=interleaved_qkv_to_grouped),
    _rule("model.vision_model.encoder.layers.{i}.self_attn.dense.{p}", "vision.blocks.{i}.attn.proj.{p}"),
    _rule("model.vision_model.encoder.layers.{i}.post_attention_layernorm.{p}", "vision.blocks.{i}.norm2.{p}"),
    _rule("model.vision_model.encoder.layers.{i}.mlp.fc1.{p}", "vision.blocks.{i}.mlp.fc1.{p}"),
    _rule("model.vision_model.encoder.layers.{i}.mlp.fc2.{p}", "vision.blocks.{i}.mlp.fc2.{p}"),
    _rule("model.vision_model.post_layernorm.{p}", "vision.norm.{p}"),
    # Visual abstractor.
    _rule("model.visual_abstractor.query_embeds", "abstractor.queries"),
    _rule("model.visual_abstractor.vit_eos", "abstractor.eos"),
    _rule("model.visual_abstractor.visual_fc.{p}", "abstractor.proj.{p}"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.norm1.{p}", "abstractor.layers.{i}.norm_queries.{p}"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.normk.{p}", "abstractor.layers.{i}.norm_image.{p}"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.attention.query.{p}",
          "abstractor.layers.{i}.q_proj.{p}"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.attention.key.{p}",
          "abstractor.layers.{i}.k_proj.{p}"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.attention.value.{p}",
          "abstractor.layers.{i}.v_proj.{p}"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.attention.q_pos_embed"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.attention.k_pos_embed"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.output.out_proj.{p}",
          "abstractor.layers.{i}.out_proj.{p}"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.output.norm2.{p}",
          "abstractor.layers.{i}.norm_ffn.{p}"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.output.mlp.w1.{p}", "abstractor.layers.{i}.ffn.w1.{p}"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.output.mlp.w2.{p}", "abstractor.layers.{i}.ffn.w2.{p}"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.output.mlp.w3.{p}", "abstractor.layers.{i}.ffn.w3.{p}"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.output.mlp.ffn_ln.{p}",
          "abstractor.layers.{i}.ffn.norm.{p}"),
)

LLAMA: tuple[Rule, ...] = (
    _rule("model.embed_tokens.weight", "decoder.embed_tokens.weight"),
    _rule("model.layers.{i}.self_attn.q_proj.weight", "decoder.layers.{i}.self_attn.q_proj.weight"),
    _rule("model.layers.{i}.self_attn.o_proj.weight", "decoder.layers.{i}.self_attn.o_proj.weight"),
    # One LLaMA projection/norm initialises both modality copies.
    _rule("model.layers.{i}.self_attn.k_proj.weight",
          "decoder.layers.{i}.self_attn.k_proj.text.weight", "decoder.layers.{i}.self_attn.k_proj.visual.weight"),
    _rule("model.layers.{i}.self_attn.v_proj.weight",
          "decoder.layers.{i}.self_attn.v_proj.text.weight", "decoder.layers.{i}.self_attn.v_proj.visual.weight"),
    _rule("model.layers.{i}.self_attn.rotary_emb.inv_freq"),
    _rule("model.layers.{i}.input_layernorm.weight",
          "decoder.layers.{i}.input_layernorm.text.weight", "decoder.layers.{i}.input_layernorm.visual.weight"),
    _rule("model.layers.{i}.post_attention_layernorm.weight",
          "decoder.layers.{i}.post_attention_layernorm.text.weight",
          "decoder.layers.{i}.post_attention_layernorm.visual.weight"),
    _rule("model.layers.{i}.mlp.gate_proj.weight", "decoder.layers.{i}.mlp.gate_proj.weight"),
    _rule("model.layers.{i}.mlp.up_proj.weight", "decoder.layers.{i}.mlp.up_proj.weight"),
    _rule("model.layers.{i}.mlp.down_proj.weight", "decoder.layers.{i}.mlp.down_proj.weight"),
    _rule("model.norm.weight", "decoder.norm.weight"),
    _rule("lm_head.weight", "lm_head.weight"),
)


def _compile(pattern: str) -> re.Pattern[str]:
    regex = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(regex + "$")


@dataclass
class Conversion:
    """Converted tensors plus what the table dropped on purpose or did not know."""

    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def convert(state_dict: dict[str, torch.Tensor], rules: Iterable[Rule], spec: ModelConfig) -> Conversion:
    """Rename (and transform) every key of ``state_dict`` by the first rule whose pattern matches it."""
    compiled = [(_compile(rule.source), rule) for rule in rules]
    result = Conversion()
    for key, tensor in state_dict.items():
        for regex, rule in compiled:
            match = regex.match(key)
            if match is None:
                continue
            if not rule.targets:
                result.dropped.append(key)
            value = rule.transform(tensor, spec) if rule.transform else tensor
            for target in rule.targets:
                result.state_dict[target.format(**match.groupdict())] = value
            break
        else:
            result.unexpected.append(key)
    return result


def target_keys(source_key: str, rules: Iterable[Rule]) -> tuple[str, ...] | None:
    """owl2 keys a source key maps to (empty when dropped on purpose), or None when no rule knows it."""
    for rule in rules:
        match = _compile(rule.source).match(source_key)
        if match:
            return tuple(t.format(**match.groupdict()) for t in rule.targets)
    return None


# ------------------------------------------------------------------------------------------------ files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file or folder: safetensors (single or sharded) or legacy ``.bin`` shards.

    Legacy pickles are read with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = path / index_name
            if index.is_file():
                shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                files = [path / name for name in shard_names]
                break
            if (path / single_name).is_file():
                files = [path / single_name]
                break
        else:
            raise FileNotFoundError(
                f"{path} holds no model.safetensors[.index.json] or pytorch_model.bin[.index.json]"
            )
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state_dict.update(load_file(str(file)))
        else:
            state_dict.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return state_dict


def read_config(folder: str | Path) -> dict[str, Any]:
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

    def log(self, what: str) -> None:
        logger.info("loaded %s: %d missing, %d unexpected, %d dropped on purpose (recomputed buffers)",
                    what, len(self.missing), len(self.unexpected), len(self.dropped))
        for kind, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
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
    return LoadReport(sorted(result.missing_keys), sorted(result.unexpected_keys + conversion.unexpected),
                      sorted(conversion.dropped))


def is_official_config(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "mplug_owl2"


def official_spec(folder: str | Path) -> ModelConfig:
    config = read_config(folder)
    if not is_official_config(config):
        raise ConfigError(f"{folder}/config.json is not an official mPLUG-Owl2 config (model_type mplug_owl2)")
    return ModelConfig.from_official(config)
