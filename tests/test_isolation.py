"""Importing and using owl2 must leave other libraries as they were (the official code patches LLaMA)."""

import subprocess
import sys
import textwrap


def test_transformers_llama_is_untouched_by_owl2():
    script = textwrap.dedent(
        """
        import transformers.models.llama.modeling_llama as llama
        from transformers import LlamaConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        names = ["LlamaAttention", "LlamaDecoderLayer", "LlamaModel", "LlamaForCausalLM", "LlamaMLP",
                 "LlamaRMSNorm", "LlamaRotaryEmbedding", "apply_rotary_pos_emb", "eager_attention_forward"]
        def snapshot():
            state = {name: getattr(llama, name) for name in names}
            for name in names:
                obj = state[name]
                for attr in ("forward", "__init__"):
                    if hasattr(obj, attr):
                        state[name + "." + attr] = getattr(obj, attr)
            state["LlamaConfig.__init__"] = LlamaConfig.__init__
            state["model_types"] = sorted(CONFIG_MAPPING.keys())
            return state

        before = snapshot()
        import owl2, owl2.model
        from owl2.config import ModelConfig
        from owl2.model import Owl2Config, Owl2ForCausalLM
        Owl2ForCausalLM(Owl2Config.from_spec(ModelConfig.from_preset("debug")))
        after = snapshot()
        changed = [key for key in before if before[key] is not after[key] and before[key] != after[key]]
        assert not changed, changed
        print("untouched")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "untouched" in result.stdout
