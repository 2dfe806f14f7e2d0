"""The modality-adaptive decoder: parity with transformers' LLaMA, multiway semantics, no host syncs."""

import pytest
import torch
from transformers import LlamaForCausalLM

from owl2.config import ModelConfig
from owl2.model import Owl2Config, Owl2ForCausalLM
from owl2.model.decoder import Multiway, Partition
from owl2.model.keymaps import LLAMA, convert

# Grouped-query attention on (4 query heads, 2 K/V heads): the official code cannot run this.
DECODER = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
}


@pytest.fixture(scope="module")
def llama_and_owl2(tiny_llama_config):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(tiny_llama_config).eval()
    spec = ModelConfig.from_preset("debug", {"decoder": DECODER})
    conversion = convert(llama.state_dict(), LLAMA, spec)
    owl2 = Owl2ForCausalLM.from_state_dict(Owl2Config.from_spec(spec), conversion, strict=False).eval()
    return llama, owl2


def test_llama_adapter_fills_both_branches(llama_and_owl2):
    llama, owl2 = llama_and_owl2
    assert all(key.startswith(("vision.", "abstractor.")) for key in owl2.load_report.missing)
    source = llama.model.layers[1]
    target = owl2.decoder.layers[1]
    for branch in ("text", "visual"):
        assert torch.equal(getattr(target.self_attn.k_proj, branch).weight, source.self_attn.k_proj.weight)
        assert torch.equal(getattr(target.self_attn.v_proj, branch).weight, source.self_attn.v_proj.weight)
        assert torch.equal(getattr(target.input_layernorm, branch).weight, source.input_layernorm.weight)


def test_text_logits_match_transformers_llama(llama_and_owl2):
    llama, owl2 = llama_and_owl2
    input_ids = torch.randint(3, 256, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = llama(input_ids).logits
        ours = owl2(input_ids, use_cache=False).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_left_padded_text_matches_transformers_llama(llama_and_owl2):
    llama, owl2 = llama_and_owl2
    input_ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    input_ids[1, :4] = 0
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = llama(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        ours = owl2(input_ids, attention_mask=attention_mask, use_cache=False).logits
    valid = attention_mask.bool()
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-5, rtol=1e-5)

    kwargs = {
        "attention_mask": attention_mask,
        "max_new_tokens": 6,
        "do_sample": False,
        "pad_token_id": 0,
        "eos_token_id": None,
    }
    assert torch.equal(owl2.generate(input_ids, **kwargs), llama.generate(input_ids, **kwargs))


def _random_visual_mask(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5


def test_identical_branches_equal_single_branch_model(llama_and_owl2):
    _, owl2 = llama_and_owl2  # built from LLaMA: both branches hold the same weights
    embeds = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference, _ = owl2.decoder(embeds)
        for seed in range(3):
            routed, _ = owl2.decoder(embeds, visual_mask=_random_visual_mask((3, 11), seed))
            torch.testing.assert_close(routed, reference, atol=1e-6, rtol=1e-6)


def test_each_token_follows_its_own_branch():
    torch.manual_seed(0)
    layer = Multiway(lambda: torch.nn.Linear(8, 4))
    x = torch.randn(2, 5, 8)
    visual_mask = _random_visual_mask((2, 5), 4)
    routing = Partition.of(visual_mask)  # the layer takes its rows grouped by modality
    out = routing.ungroup(layer(routing.group(x), routing))
    for b in range(2):
        for t in range(5):
            branch = layer.visual if visual_mask[b, t] else layer.text
            torch.testing.assert_close(out[b, t], branch(x[b, t]))
    out.sum().backward()
    # A branch gets gradient only from its own tokens.
    expected_text_grad = torch.autograd.grad(layer.text(x[~visual_mask]).sum(), layer.text.weight)[0]
    torch.testing.assert_close(layer.text.weight.grad, expected_text_grad)


def test_decoder_routing_has_no_data_dependent_ops(llama_and_owl2, op_recorder):
    """Data-dependent shapes or scalar reads would force a host-device sync per layer on a GPU."""
    _, owl2 = llama_and_owl2
    embeds = torch.randn(2, 9, 64)
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[0, :3] = 0
    visual_mask = _random_visual_mask((2, 9), 5)
    visual_tokens = int(visual_mask.sum())  # known on the host in training (images x tokens per image)
    with torch.no_grad(), op_recorder:
        owl2.decoder(embeds, attention_mask=attention_mask, visual_mask=visual_mask, visual_tokens=visual_tokens)
    assert not op_recorder.syncing
