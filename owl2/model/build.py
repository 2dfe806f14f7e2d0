"""A fresh Owl2 assembled from a transformers LLaMA-2 folder and a CLIP vision tower: the starting point of
stage-1 pre-training (the abstractor is the only new part).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from owl2.config import AbstractorConfig, ModelConfig, VisionConfig
from owl2.model.checkpoint_io import read_config, read_state_dict
from owl2.model.foreign_config import check_llama_matches, decoder_config_from_llama
from owl2.model.keymaps import LLAMA, LLAMA_SHARED, Conversion, convert, convert_clip
from owl2.model.owl2 import Owl2Config, Owl2ForCausalLM


def build_from_llama_and_clip(
    llama_dir: str | Path,
    clip_path: str | Path,
    spec: ModelConfig | None = None,
    image_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> Owl2ForCausalLM:
    """A fresh Owl2 from a transformers LLaMA-2 folder and a CLIP vision tower; the abstractor (or the MLP projector
    of ``model.projector: mlp``) is new.

    Args:
        llama_dir: folder with ``config.json`` (model_type llama) and safetensors or ``.bin`` weights.
            Its K/V projections and norms initialise both modality branches (or the one copy of a decoder
            without the modality-adaptive module, ``decoder.modality_adaptive: false``).
        clip_path: a CLIP checkpoint file or folder in any ``CLIP_LAYOUTS`` naming (detected). The OpenAI
            TorchScript ``.pt`` archive must first be turned into a plain state dict (``torch.jit.load``
            then ``state_dict()``): archives are refused, like every pickle with more than tensors.
        spec: the architecture. None: the decoder from the LLaMA config, a ViT-L/14 vision encoder and the
            default abstractor. A given spec's decoder must match the LLaMA config (shapes, eps, RoPE).
        image_size: input resolution (default 448 without a spec), replacing the spec's when given; the
            CLIP position table is resampled to its grid.
        dtype: parameter dtype (e.g. ``torch.bfloat16`` to build the 7B model in half the memory).

    Returns:
        The model in eval mode; ``model.load_report`` lists the abstractor's (freshly initialised)
        weights as missing. Any other missing weight, and any checkpoint key that neither table nor
        model knows, raises ``ValueError``.
    """
    llama_dir = Path(llama_dir)
    where = f"{llama_dir}/config.json"
    llama = decoder_config_from_llama(read_config(llama_dir), where)
    if spec is None:
        spec = ModelConfig(
            vision=VisionConfig(image_size=image_size or 448), abstractor=AbstractorConfig(), decoder=llama
        )
    else:
        check_llama_matches(llama, spec.decoder, where)
        if image_size is not None:
            spec = dataclasses.replace(spec, vision=dataclasses.replace(spec.vision, image_size=image_size))

    decoder_part = convert(read_state_dict(llama_dir), LLAMA if spec.decoder.modality_adaptive else LLAMA_SHARED, spec)
    vision_part = convert_clip(read_state_dict(clip_path), spec)
    conversion = Conversion(
        state_dict={**decoder_part.state_dict, **vision_part.state_dict},
        dropped=decoder_part.dropped + vision_part.dropped,
        unexpected=decoder_part.unexpected + vision_part.unexpected,
    )
    source = f"{llama_dir} + {clip_path}"
    model = Owl2ForCausalLM.from_state_dict(
        Owl2Config.from_spec(spec), conversion, dtype=dtype, strict=True, fresh=("abstractor.",), source=source
    )
    return model.eval()
