"""Other projects' ``config.json`` files read as owl2 configs: the released mPLUG-Owl2 checkpoint's and a
transformers LLaMA's.

Each translation refuses, with a :class:`~owl2.config.ConfigError` naming the field, what owl2 cannot
represent (RoPE scaling, tied embeddings, other activations or variants), instead of building a model that
silently computes something else.
"""

from __future__ import annotations

from typing import Any

from owl2.config import AbstractorConfig, ConfigError, DecoderConfig, ModelConfig, VisionConfig

# Decoder fields a LLaMA config must agree on with the spec: they fix the weights' shapes or the
# numerics. Context length and special-token ids are the spec's to choose.
_LLAMA_FIELDS: dict[str, str] = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
}


def _pick(source: dict[str, Any], where: str, **names: str) -> dict[str, Any]:
    """Rename the foreign fields to ours (``ours="theirs"``); a missing field is an error naming it."""
    missing = [theirs for theirs in names.values() if theirs not in source]
    if missing:
        raise ConfigError(f"{where} lacks field(s) {missing}")
    return {ours: source[theirs] for ours, theirs in names.items()}


def _special_tokens(source: dict[str, Any]) -> dict[str, int]:
    """pad/bos/eos ids, LLaMA-2's where absent or null (it has no pad token; the official Owl2 pads with unk = 0)."""
    fields = {}
    for name, default in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        value = source.get(name)
        fields[name] = default if value is None else value
    return fields


# ------------------------------------------------------------------------------------------------ mPLUG-Owl2


def model_config_from_official(official: dict[str, Any]) -> ModelConfig:
    """Read the released checkpoint's ``config.json`` (model_type ``mplug_owl2``)."""
    if official.get("model_type") != "mplug_owl2":
        raise ConfigError(f"config.json model_type is {official.get('model_type')!r}, expected 'mplug_owl2'")
    if official.get("rope_scaling"):
        raise ConfigError("config.json rope_scaling is set; owl2 supports plain RoPE only (rope_scaling: null)")
    if official.get("tie_word_embeddings"):
        raise ConfigError("config.json tie_word_embeddings is true; mPLUG-Owl2 has an untied lm_head")
    visual = official.get("visual_config") or {}
    vit, abstractor = visual.get("visual_model") or {}, visual.get("visual_abstractor") or {}
    if vit.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ConfigError(f"visual_config.visual_model.hidden_act is {vit['hidden_act']!r}; only quick_gelu")
    if not vit.get("use_cls_token", True) or not abstractor.get("use_cls_token", True):
        raise ConfigError("visual_config use_cls_token=false (the Owl2.1 ViT-G variant) is not supported")
    if abstractor.get("add_v2t_pos_emb"):
        raise ConfigError("visual_config.visual_abstractor.add_v2t_pos_emb=true is not supported")
    vision = VisionConfig(
        **_pick(
            vit,
            "visual_config.visual_model",
            hidden_size="hidden_size",
            num_layers="num_hidden_layers",
            num_heads="num_attention_heads",
            intermediate_size="intermediate_size",
            image_size="image_size",
            patch_size="patch_size",
            layer_norm_eps="layer_norm_eps",
        )
    )
    return ModelConfig(
        vision=vision, abstractor=_official_abstractor(abstractor, vision), decoder=_official_decoder(official)
    )


def _official_abstractor(abstractor: dict[str, Any], vision: VisionConfig) -> AbstractorConfig:
    """``visual_config.visual_abstractor``, which must read the whole grid of ``vision`` at its width."""
    grid = abstractor.get("grid_size", vision.grid_size)
    if grid != vision.grid_size:
        raise ConfigError(
            f"visual_config.visual_abstractor.grid_size ({grid}) must equal image_size/patch_size ({vision.grid_size})"
        )
    encoder_width = abstractor.get("encoder_hidden_size", vision.hidden_size)
    if encoder_width != vision.hidden_size:
        raise ConfigError(
            f"visual_config.visual_abstractor.encoder_hidden_size ({encoder_width}) must equal the vision "
            f"hidden_size ({vision.hidden_size})"
        )
    return AbstractorConfig(
        **_pick(
            abstractor,
            "visual_config.visual_abstractor",
            hidden_size="hidden_size",
            num_layers="num_hidden_layers",
            num_heads="num_attention_heads",
            intermediate_size="intermediate_size",
            num_queries="num_learnable_queries",
            layer_norm_eps="layer_norm_eps",
        )
    )


def _official_decoder(official: dict[str, Any]) -> DecoderConfig:
    """The LLaMA part of the official ``config.json`` (its top-level fields)."""
    fields = _pick(
        official,
        "config.json",
        vocab_size="vocab_size",
        hidden_size="hidden_size",
        intermediate_size="intermediate_size",
        num_layers="num_hidden_layers",
        num_heads="num_attention_heads",
        rms_norm_eps="rms_norm_eps",
        max_position_embeddings="max_position_embeddings",
    )
    fields["num_kv_heads"] = official.get("num_key_value_heads") or fields["num_heads"]
    rope_theta = official.get("rope_theta")
    fields["rope_theta"] = float(10000.0 if rope_theta is None else rope_theta)
    return DecoderConfig(**fields, **_special_tokens(official))


# ------------------------------------------------------------------------------------------------ LLaMA


def decoder_config_from_llama(llama: dict[str, Any], where: str = "LLaMA config.json") -> DecoderConfig:
    """The decoder section for a transformers LLaMA ``config.json`` (transformers 4 or 5 field names).

    Raises :class:`ConfigError` for what owl2's decoder cannot represent (tied embeddings, RoPE scaling,
    biases, another activation or head size).
    """
    if llama.get("model_type") != "llama":
        raise ConfigError(f"{where} has model_type {llama.get('model_type')!r}, expected 'llama'")
    rope = llama.get("rope_parameters") or {}  # transformers 5 nests RoPE settings here
    rope_type = rope.get("rope_type") or (llama.get("rope_scaling") or {}).get("rope_type") or "default"
    if rope_type != "default" or llama.get("rope_scaling"):
        raise ConfigError(f"{where} uses RoPE scaling ({rope_type!r}); owl2 supports plain RoPE only")
    if llama.get("tie_word_embeddings"):
        raise ConfigError(f"{where} has tie_word_embeddings=true; owl2 has an untied lm_head")
    if llama.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where} hidden_act is {llama['hidden_act']!r}; owl2's MLP uses silu")
    for name in ("attention_bias", "mlp_bias"):
        if llama.get(name):
            raise ConfigError(f"{where} has {name}=true; owl2's decoder has no biases")
    fields: dict[str, Any] = {
        "rope_theta": float(rope.get("rope_theta", llama.get("rope_theta", 10000.0))),
        "num_kv_heads": llama.get("num_key_value_heads") or llama.get("num_attention_heads"),
    }
    fields.update(_pick(llama, where, **{ours: theirs for ours, theirs in _LLAMA_FIELDS.items() if ours not in fields}))
    head_dim = llama.get("head_dim")
    if head_dim is not None and head_dim * fields["num_heads"] != fields["hidden_size"]:
        raise ConfigError(f"{where} head_dim={head_dim} is not hidden_size/num_attention_heads; owl2 needs it to be")
    fields.update(_special_tokens(llama))
    fields["max_position_embeddings"] = llama.get("max_position_embeddings", 2048)
    return DecoderConfig(**fields)


def check_llama_matches(llama: DecoderConfig, spec: DecoderConfig, where: str = "LLaMA config.json") -> None:
    """Raise :class:`ConfigError` naming the first architecture field where the LLaMA and the spec differ."""
    for ours, theirs in _LLAMA_FIELDS.items():
        if getattr(llama, ours) != getattr(spec, ours):
            raise ConfigError(
                f"{where} {theirs}={getattr(llama, ours)!r} does not match the spec's "
                f"decoder.{ours}={getattr(spec, ours)!r}"
            )
