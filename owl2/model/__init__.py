"""The mPLUG-Owl2 model: vision encoder, visual abstractor, modality-adaptive decoder."""

from owl2.model.owl2 import Owl2Config, Owl2ForCausalLM

__all__ = ["Owl2Config", "Owl2ForCausalLM"]
