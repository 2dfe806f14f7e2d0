"""Explicit key-mapping tables from other checkpoint layouts to owl2's, and the conversion they drive.

Each table row maps one source key pattern to one or more owl2 keys, optionally through a tensor
transform. Patterns use ``{i}`` for a layer number and ``{p}`` for ``weight``/``bias``. A source key
no row matches is *unexpected*; a row with no target drops a key on purpose (buffers that owl2
recomputes).

Tables: ``OFFICIAL`` (the released mPLUG-Owl2 checkpoint), ``LLAMA`` (a transformers LLaMA-2 folder:
K/V and norms are copied into both modality branches; ``LLAMA_SHARED`` for a decoder without them),
``MAM_TO_SHARED`` and ``SHARED_TO_MAM`` (owl2 weights into the other decoder layout, see
``DecoderConfig.modality_adaptive``), and one table per CLIP ViT naming in ``CLIP_LAYOUTS``
(OpenAI/OpenCLIP, timm, transformers) for the vision encoder. A ``{rest}`` placeholder matches any suffix:
it drops whole sub-trees on purpose (CLIP's text tower) or keeps every key no other row names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from owl2.config import ModelConfig
from owl2.model.vision import resample_position_embedding

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


# The parts of the decoder that have one copy in LLaMA-2, in the released checkpoint and in owl2.
_SHARED_DECODER: tuple[Rule, ...] = (
    _rule("model.embed_tokens.weight", "decoder.embed_tokens.weight"),
    _rule("model.layers.{i}.self_attn.q_proj.weight", "decoder.layers.{i}.self_attn.q_proj.weight"),
    _rule("model.layers.{i}.self_attn.o_proj.weight", "decoder.layers.{i}.self_attn.o_proj.weight"),
    _rule("model.layers.{i}.mlp.gate_proj.weight", "decoder.layers.{i}.mlp.gate_proj.weight"),
    _rule("model.layers.{i}.mlp.up_proj.weight", "decoder.layers.{i}.mlp.up_proj.weight"),
    _rule("model.layers.{i}.mlp.down_proj.weight", "decoder.layers.{i}.mlp.down_proj.weight"),
    _rule("model.norm.weight", "decoder.norm.weight"),
    _rule("lm_head.weight", "lm_head.weight"),
    _rule("model.layers.{i}.self_attn.rotary_emb.inv_freq"),  # recomputed from the config
)

OFFICIAL: tuple[Rule, ...] = _SHARED_DECODER + (
    # Decoder: modality copies multiway.0 (text) and multiway.1 (visual).
    _rule("model.layers.{i}.self_attn.k_proj.multiway.0.weight", "decoder.layers.{i}.self_attn.k_proj.text.weight"),
    _rule("model.layers.{i}.self_attn.k_proj.multiway.1.weight", "decoder.layers.{i}.self_attn.k_proj.visual.weight"),
    _rule("model.layers.{i}.self_attn.v_proj.multiway.0.weight", "decoder.layers.{i}.self_attn.v_proj.text.weight"),
    _rule("model.layers.{i}.self_attn.v_proj.multiway.1.weight", "decoder.layers.{i}.self_attn.v_proj.visual.weight"),
    _rule("model.layers.{i}.input_layernorm.multiway.0.weight", "decoder.layers.{i}.input_layernorm.text.weight"),
    _rule("model.layers.{i}.input_layernorm.multiway.1.weight", "decoder.layers.{i}.input_layernorm.visual.weight"),
    _rule(
        "model.layers.{i}.post_attention_layernorm.multiway.0.weight",
        "decoder.layers.{i}.post_attention_layernorm.text.weight",
    ),
    _rule(
        "model.layers.{i}.post_attention_layernorm.multiway.1.weight",
        "decoder.layers.{i}.post_attention_layernorm.visual.weight",
    ),
    # Vision encoder (official ViT -> timm names).
    _rule("model.vision_model.embeddings.cls_token", "vision.cls_token"),
    _rule("model.vision_model.embeddings.position_embedding", "vision.pos_embed"),
    _rule("model.vision_model.embeddings.patch_embed.weight", "vision.patch_embed.proj.weight"),
    _rule("model.vision_model.embeddings.pre_layernorm.{p}", "vision.norm_pre.{p}"),
    _rule("model.vision_model.encoder.layers.{i}.input_layernorm.{p}", "vision.blocks.{i}.norm1.{p}"),
    _rule(
        "model.vision_model.encoder.layers.{i}.self_attn.query_key_value.{p}",
        "vision.blocks.{i}.attn.qkv.{p}",
        transform=interleaved_qkv_to_grouped,
    ),
    _rule("model.vision_model.encoder.layers.{i}.self_attn.dense.{p}", "vision.blocks.{i}.attn.proj.{p}"),
    _rule("model.vision_model.encoder.layers.{i}.post_attention_layernorm.{p}", "vision.blocks.{i}.norm2.{p}"),
    _rule("model.vision_model.encoder.layers.{i}.mlp.fc1.{p}", "vision.blocks.{i}.mlp.fc1.{p}"),
    _rule("model.vision_model.encoder.layers.{i}.mlp.fc2.{p}", "vision.blocks.{i}.mlp.fc2.{p}"),
    _rule("model.vision_model.post_layernorm.{p}", "vision.norm.{p}"),
    # Visual abstractor.
    _rule("model.visual_abstractor.query_embeds", "abstractor.queries"),
    _rule("model.visual_abstractor.vit_eos", "abstractor.eos"),
    _rule("model.visual_abstractor.visual_fc.{p}", "abstractor.proj.{p}"),
    _rule(
        "model.visual_abstractor.encoder.layers.{i}.crossattention.norm1.{p}", "abstractor.layers.{i}.norm_queries.{p}"
    ),
    _rule(
        "model.visual_abstractor.encoder.layers.{i}.crossattention.normk.{p}", "abstractor.layers.{i}.norm_image.{p}"
    ),
    _rule(
        "model.visual_abstractor.encoder.layers.{i}.crossattention.attention.query.{p}",
        "abstractor.layers.{i}.q_proj.{p}",
    ),
    _rule(
        "model.visual_abstractor.encoder.layers.{i}.crossattention.attention.key.{p}",
        "abstractor.layers.{i}.k_proj.{p}",
    ),
    _rule(
        "model.visual_abstractor.encoder.layers.{i}.crossattention.attention.value.{p}",
        "abstractor.layers.{i}.v_proj.{p}",
    ),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.attention.q_pos_embed"),
    _rule("model.visual_abstractor.encoder.layers.{i}.crossattention.attention.k_pos_embed"),
    _rule(
        "model.visual_abstractor.encoder.layers.{i}.crossattention.output.out_proj.{p}",
        "abstractor.layers.{i}.out_proj.{p}",
    ),
    _rule(
        "model.visual_abstractor.encoder.layers.{i}.crossattention.output.norm2.{p}",
        "abstractor.layers.{i}.norm_ffn.{p}",
    ),
    _rule(
        "model.visual_abstractor.encoder.layers.{i}.crossattention.output.mlp.w1.{p}",
        "abstractor.layers.{i}.ffn.w1.{p}",
    ),
    _rule(
        "model.visual_abstractor.encoder.layers.{i}.crossattention.output.mlp.w2.{p}",
        "abstractor.layers.{i}.ffn.w2.{p}",
    ),
    _rule(
        "model.visual_abstractor.encoder.layers.{i}.crossattention.output.mlp.w3.{p}",
        "abstractor.layers.{i}.ffn.w3.{p}",
    ),
    _rule(
        "model.visual_abstractor.encoder.layers.{i}.crossattention.output.mlp.ffn_ln.{p}",
        "abstractor.layers.{i}.ffn.norm.{p}",
    ),
)

# The parts that the modality-adaptive module (MAM) duplicates, by their path in a decoder layer.
_MODALITY_PARTS = ("self_attn.k_proj", "self_attn.v_proj", "input_layernorm", "post_attention_layernorm")
_BRANCHES = ("text", "visual")

# One LLaMA projection/norm initialises both modality copies.
LLAMA: tuple[Rule, ...] = _SHARED_DECODER + tuple(
    _rule(f"model.layers.{{i}}.{part}.weight", *(f"decoder.layers.{{i}}.{part}.{b}.weight" for b in _BRANCHES))
    for part in _MODALITY_PARTS
)

# LLaMA into a decoder without the MAM (``decoder.modality_adaptive: false``): the same names, one copy.
LLAMA_SHARED: tuple[Rule, ...] = _SHARED_DECODER + tuple(
    _rule(f"model.layers.{{i}}.{part}.weight", f"decoder.layers.{{i}}.{part}.weight") for part in _MODALITY_PARTS
)

# ------------------------------------------------------------------------------------------ with or without the MAM
# owl2 weights of one decoder layout -> the other; every other key stays as it is.
_UNCHANGED = _rule("{rest}", "{rest}")

MAM_TO_SHARED: tuple[Rule, ...] = tuple(
    row
    for part in _MODALITY_PARTS
    for row in (
        # The text copies are the ones the released LLaMA-2 weights started (the visual ones learned images).
        _rule(f"decoder.layers.{{i}}.{part}.text.weight", f"decoder.layers.{{i}}.{part}.weight"),
        _rule(f"decoder.layers.{{i}}.{part}.visual.weight"),
    )
) + (_UNCHANGED,)

SHARED_TO_MAM: tuple[Rule, ...] = tuple(
    _rule(f"decoder.layers.{{i}}.{part}.weight", *(f"decoder.layers.{{i}}.{part}.{b}.weight" for b in _BRANCHES))
    for part in _MODALITY_PARTS
) + (_UNCHANGED,)

# ------------------------------------------------------------------------------------------------ CLIP
# CLIP ViT-L/14 (224 px: 257 position rows = CLS + 16x16) -> owl2's vision encoder. Weights are copied
# as they are; CLIP's LayerNorms use eps 1e-5 and Owl2's 1e-6, and the eps of the built model is the
# config's (vision.layer_norm_eps), as in the official Owl2, whose ViT started from CLIP with eps 1e-6.
# The position table is resampled to the config's grid (16x16 -> 32x32 for 448 px).


def clip_position_embedding(tensor: torch.Tensor, spec: ModelConfig) -> torch.Tensor:
    """``[1 + g*g, D]`` or ``[1, 1 + g*g, D]`` CLIP table -> ``[1, 1 + G*G, D]`` on the config's grid G."""
    table = tensor if tensor.dim() == 3 else tensor.unsqueeze(0)
    return resample_position_embedding(table, spec.vision.grid_size)


def clip_class_embedding(tensor: torch.Tensor, spec: ModelConfig) -> torch.Tensor:
    """CLIP's ``[D]`` class embedding -> timm's ``[1, 1, D]`` ``cls_token``."""
    return tensor.reshape(1, 1, -1)


# transformers keeps q/k/v apart; timm fuses them. Rows send each to a partial key ``<qkv key>@q|k|v``,
# which :func:`fuse_qkv_parts` concatenates afterwards (a row maps one source key, never three).
_QKV_PART = re.compile(r"(?P<key>.+)@(?P<part>[qkv])$")

CLIP_OPENAI: tuple[Rule, ...] = (
    # OpenAI CLIP and OpenCLIP image towers; the file is a whole CLIP model.
    _rule("visual.class_embedding", "vision.cls_token", transform=clip_class_embedding),
    _rule("visual.positional_embedding", "vision.pos_embed", transform=clip_position_embedding),
    _rule("visual.conv1.weight", "vision.patch_embed.proj.weight"),
    _rule("visual.ln_pre.{p}", "vision.norm_pre.{p}"),
    _rule("visual.transformer.resblocks.{i}.ln_1.{p}", "vision.blocks.{i}.norm1.{p}"),
    # nn.MultiheadAttention packs [q; k; v] over all heads, the layout timm's qkv expects.
    _rule("visual.transformer.resblocks.{i}.attn.in_proj_weight", "vision.blocks.{i}.attn.qkv.weight"),
    _rule("visual.transformer.resblocks.{i}.attn.in_proj_bias", "vision.blocks.{i}.attn.qkv.bias"),
    _rule("visual.transformer.resblocks.{i}.attn.out_proj.{p}", "vision.blocks.{i}.attn.proj.{p}"),
    _rule("visual.transformer.resblocks.{i}.ln_2.{p}", "vision.blocks.{i}.norm2.{p}"),
    _rule("visual.transformer.resblocks.{i}.mlp.c_fc.{p}", "vision.blocks.{i}.mlp.fc1.{p}"),
    _rule("visual.transformer.resblocks.{i}.mlp.c_proj.{p}", "vision.blocks.{i}.mlp.fc2.{p}"),
    _rule("visual.ln_post.{p}", "vision.norm.{p}"),
    # Dropped on purpose: the projection into CLIP's joint image-text space (the abstractor reads the
    # ViT tokens at their own width) and the whole text tower, which Owl2 replaces by LLaMA.
    _rule("visual.proj"),
    _rule("token_embedding.weight"),
    _rule("positional_embedding"),
    _rule("transformer.{rest}"),
    _rule("ln_final.{p}"),
    _rule("text_projection"),
    _rule("logit_scale"),
    # Scalars the OpenAI TorchScript export keeps beside the weights.
    _rule("input_resolution"),
    _rule("context_length"),
    _rule("vocab_size"),
)

CLIP_TIMM: tuple[Rule, ...] = (
    # timm ``vit_large_patch14_clip_224.openai``: already our names, with a 224 px position table.
    # (timm builds that model name with GELU; the weights are QuickGELU-trained, which owl2 uses.)
    _rule("cls_token", "vision.cls_token"),
    _rule("pos_embed", "vision.pos_embed", transform=clip_position_embedding),
    _rule("patch_embed.proj.weight", "vision.patch_embed.proj.weight"),
    _rule("norm_pre.{p}", "vision.norm_pre.{p}"),
    _rule("blocks.{i}.norm1.{p}", "vision.blocks.{i}.norm1.{p}"),
    _rule("blocks.{i}.attn.qkv.{p}", "vision.blocks.{i}.attn.qkv.{p}"),
    _rule("blocks.{i}.attn.proj.{p}", "vision.blocks.{i}.attn.proj.{p}"),
    _rule("blocks.{i}.norm2.{p}", "vision.blocks.{i}.norm2.{p}"),
    _rule("blocks.{i}.mlp.fc1.{p}", "vision.blocks.{i}.mlp.fc1.{p}"),
    _rule("blocks.{i}.mlp.fc2.{p}", "vision.blocks.{i}.mlp.fc2.{p}"),
    _rule("norm.{p}", "vision.norm.{p}"),
    # The CLIP projection (timm keeps it as a classifier head): unused, as in the OpenAI table.
    _rule("head.{p}"),
)


def _hf_clip_vision_rules(prefix: str) -> tuple[Rule, ...]:
    """transformers CLIP image-tower rows under ``prefix`` (``vision_model.`` or none, see CLIP_LAYOUTS)."""
    layer = prefix + "encoder.layers.{i}."
    return (
        _rule(prefix + "embeddings.class_embedding", "vision.cls_token", transform=clip_class_embedding),
        _rule(prefix + "embeddings.position_embedding.weight", "vision.pos_embed", transform=clip_position_embedding),
        _rule(prefix + "embeddings.patch_embedding.weight", "vision.patch_embed.proj.weight"),
        _rule(prefix + "embeddings.position_ids"),  # an arange buffer, saved by transformers < 4.31
        _rule(prefix + "pre_layrnorm.{p}", "vision.norm_pre.{p}"),  # sic: transformers' spelling
        _rule(layer + "layer_norm1.{p}", "vision.blocks.{i}.norm1.{p}"),
        _rule(layer + "self_attn.q_proj.{p}", "vision.blocks.{i}.attn.qkv.{p}@q"),
        _rule(layer + "self_attn.k_proj.{p}", "vision.blocks.{i}.attn.qkv.{p}@k"),
        _rule(layer + "self_attn.v_proj.{p}", "vision.blocks.{i}.attn.qkv.{p}@v"),
        _rule(layer + "self_attn.out_proj.{p}", "vision.blocks.{i}.attn.proj.{p}"),
        _rule(layer + "layer_norm2.{p}", "vision.blocks.{i}.norm2.{p}"),
        _rule(layer + "mlp.fc1.{p}", "vision.blocks.{i}.mlp.fc1.{p}"),
        _rule(layer + "mlp.fc2.{p}", "vision.blocks.{i}.mlp.fc2.{p}"),
        _rule(prefix + "post_layernorm.{p}", "vision.norm.{p}"),
    )


# Dropped on purpose from a transformers CLIPModel / CLIPVisionModelWithProjection: the text tower and
# the projections into the joint space, as in the OpenAI table.
_HF_CLIP_UNUSED: tuple[Rule, ...] = (
    _rule("text_model.{rest}"),
    _rule("visual_projection.weight"),
    _rule("text_projection.weight"),
    _rule("logit_scale"),
)

# ``CLIPModel`` and ``CLIPVisionModel`` files written by transformers 4 keep the image tower under
# ``vision_model.``; transformers 5 writes ``CLIPVisionModel`` without that prefix.
CLIP_HF: tuple[Rule, ...] = _hf_clip_vision_rules("vision_model.") + _HF_CLIP_UNUSED
CLIP_HF_BARE: tuple[Rule, ...] = _hf_clip_vision_rules("") + _HF_CLIP_UNUSED

CLIP_LAYOUTS: dict[str, tuple[Rule, ...]] = {
    "openai": CLIP_OPENAI,
    "timm": CLIP_TIMM,
    "hf": CLIP_HF,
    "hf-bare": CLIP_HF_BARE,
}

# One key that only the layout of that name has (its class embedding), checked in this order.
_CLIP_MARKERS: dict[str, str] = {
    "openai": "visual.class_embedding",
    "timm": "cls_token",
    "hf": "vision_model.embeddings.class_embedding",
    "hf-bare": "embeddings.class_embedding",
}


def _compile(pattern: str) -> re.Pattern[str]:
    regex = (
        re.escape(pattern)
        .replace(r"\{i\}", r"(?P<i>\d+)")
        .replace(r"\{p\}", r"(?P<p>weight|bias)")
        .replace(r"\{rest\}", r"(?P<rest>.+)")
    )
    return re.compile(regex + "$")


@dataclass
class Conversion:
    """Converted tensors plus what the table dropped on purpose or did not know."""

    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # owl2 key -> the checkpoint key it came from
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
            for target in (t.format(**match.groupdict()) for t in rule.targets):
                if target in result.state_dict:
                    # Two source keys for one weight (e.g. a file mixing two namings): never pick silently.
                    raise ValueError(f"checkpoint keys {result.sources[target]!r} and {key!r} both map to {target}")
                result.state_dict[target] = value
                result.sources[target] = key
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


def detect_clip_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """Which ``CLIP_LAYOUTS`` naming a CLIP checkpoint uses: ``openai``, ``timm``, ``hf`` or ``hf-bare``."""
    for layout, marker in _CLIP_MARKERS.items():
        if marker in state_dict:
            return layout
    sample = ", ".join(sorted(state_dict)[:8]) or "(no keys)"
    raise ValueError(
        "state dict matches no known CLIP vision layout: expected one of the keys "
        f"{list(_CLIP_MARKERS.values())} (OpenAI/OpenCLIP, timm, transformers); its first keys are: {sample}"
    )


def fuse_qkv_parts(conversion: Conversion) -> Conversion:
    """Concatenate partial keys ``<key>@q``, ``@k``, ``@v`` into ``<key>`` as ``[q; k; v]`` rows, in place.

    A key with only some of its parts is an error naming it and the absent parts.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key in [key for key in conversion.state_dict if _QKV_PART.match(key)]:
        match = _QKV_PART.match(key)
        parts.setdefault(match["key"], {})[match["part"]] = conversion.state_dict.pop(key)
    for key, found in sorted(parts.items()):
        absent = [part for part in "qkv" if part not in found]
        if absent:
            raise ValueError(
                f"cannot build {key}: the checkpoint has its {sorted(found)} projection(s) but not {absent}"
            )
        conversion.state_dict[key] = torch.cat([found["q"], found["k"], found["v"]], dim=0)
    return conversion


def convert_clip(state_dict: dict[str, torch.Tensor], spec: ModelConfig, layout: str | None = None) -> Conversion:
    """CLIP vision-tower weights (any ``CLIP_LAYOUTS`` naming, detected unless given) -> owl2 ``vision.*``."""
    layout = layout or detect_clip_layout(state_dict)
    if layout not in CLIP_LAYOUTS:
        raise ValueError(f"unknown CLIP layout {layout!r}; choose one of {sorted(CLIP_LAYOUTS)}")
    return fuse_qkv_parts(convert(state_dict, CLIP_LAYOUTS[layout], spec))


# ------------------------------------------------------------------------------------------ decoder layouts
_MODALITY_COPY = re.compile(r"decoder\.layers\.\d+\.self_attn\.k_proj\.(text|visual)\.weight$")
_SINGLE_COPY = re.compile(r"decoder\.layers\.\d+\.self_attn\.k_proj\.weight$")


def has_modality_copies(state_dict: dict[str, torch.Tensor]) -> bool | None:
    """Whether owl2-named weights come from a decoder with the MAM (True) or without (False); None: no K/V."""
    if any(_MODALITY_COPY.match(key) for key in state_dict):
        return True
    if any(_SINGLE_COPY.match(key) for key in state_dict):
        return False
    return None


def match_modality_layout(conversion: Conversion, spec: ModelConfig) -> Conversion:
    """``conversion`` (owl2 names) in the decoder layout of ``spec``, through ``MAM_TO_SHARED`` (the text copies
    kept, the visual ones dropped) or ``SHARED_TO_MAM`` (both copies from the one); itself when it already is."""
    found = has_modality_copies(conversion.state_dict)
    if found is None or found == spec.decoder.modality_adaptive:
        return conversion
    rules = SHARED_TO_MAM if spec.decoder.modality_adaptive else MAM_TO_SHARED
    result = convert(conversion.state_dict, rules, spec)
    result.sources = {key: conversion.sources.get(source, source) for key, source in result.sources.items()}
    result.dropped = conversion.dropped + result.dropped
    result.unexpected = conversion.unexpected + result.unexpected
    return result
