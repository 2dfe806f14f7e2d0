"""The modality-adaptive decoder: parity with transformers' LLaMA, multiway semantics, no host syncs; the decoder
without the module (``decoder.modality_adaptive: false``) against transformers' LLaMA and the MAM one."""

import pytest
import torch
from transformers import LlamaForCausalLM

from owl2.config import IMAGE_TOKEN_INDEX, ModelConfig
from owl2.model import Owl2Config, Owl2ForCausalLM
from owl2.model.decoder import Multiway, Partition
from owl2.model.keymaps import LLAMA, LLAMA_SHARED, Conversion, convert

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


# ------------------------------------------------------------------------------------------ without the MAM


@pytest.fixture(scope="module")
def plain_owl2(llama_and_owl2):
    """The LLaMA of ``llama_and_owl2`` in a decoder without the modality-adaptive module, with the MAM model's
    vision encoder and abstractor (so that both models splice the same image tokens)."""
    llama, owl2 = llama_and_owl2
    spec = ModelConfig.from_preset("debug", {"decoder": {**DECODER, "modality_adaptive": False}})
    conversion = convert(llama.state_dict(), LLAMA_SHARED, spec)
    towers = {key: value for key, value in owl2.state_dict().items() if key.startswith(("vision.", "abstractor."))}
    conversion.state_dict.update(towers)
    return Owl2ForCausalLM.from_state_dict(Owl2Config.from_spec(spec), conversion).eval()


def _image_batch(seed: int) -> dict:
    """Two rows of 12 tokens: one image in the first, two in the second (right-padded after splicing)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 256, (2, 12), generator=generator)
    input_ids[0, 1] = IMAGE_TOKEN_INDEX
    input_ids[1, [2, 7]] = IMAGE_TOKEN_INDEX
    images = torch.randn(3, 3, 56, 56, generator=generator)
    return {"input_ids": input_ids, "images": images, "image_counts": [1, 2]}


def test_plain_decoder_has_llama_layers(plain_owl2):
    layer = plain_owl2.decoder.layers[0]
    assert not any(isinstance(module, Multiway) for module in plain_owl2.modules())
    assert isinstance(layer.self_attn.k_proj, torch.nn.Linear) and layer.input_layernorm.weight.shape == (64,)
    assert plain_owl2.visual_branch_parameter_names() == set()


def test_plain_decoder_matches_transformers_llama_on_image_and_text_embeddings(llama_and_owl2, plain_owl2):
    llama, _ = llama_and_owl2
    with torch.no_grad():
        out = plain_owl2(**_image_batch(6), use_cache=False, output_hidden_states=True)
        mask = out.attention_mask
        assert out.visual_mask.sum() == 3 * 9 and (mask == 0).any()  # image tokens and padding both present
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        expected = llama(inputs_embeds=out.hidden_states[0], attention_mask=mask, position_ids=position_ids)
    valid = mask.bool()
    torch.testing.assert_close(out.logits[valid], expected.logits[valid], atol=1e-5, rtol=1e-5)


def test_plain_decoder_ignores_the_modality_of_its_tokens(plain_owl2):
    embeds = torch.randn(3, 11, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        reference, _ = plain_owl2.decoder(embeds)
        routed, _ = plain_owl2.decoder(embeds, visual_mask=_random_visual_mask((3, 11), 8))
    torch.testing.assert_close(routed, reference, atol=0, rtol=0)


def test_identical_branches_equal_the_plain_model_with_images(llama_and_owl2, plain_owl2):
    _, owl2 = llama_and_owl2  # both branches hold the LLaMA weights that plain_owl2 holds once
    batch = _image_batch(9)
    with torch.no_grad():
        expected = plain_owl2(**batch, use_cache=False)
        torch.testing.assert_close(owl2(**batch, use_cache=False).logits, expected.logits, atol=1e-5, rtol=1e-5)
        # With a visual branch of its own the MAM model differs from the first image token on.
        different = Owl2ForCausalLM.from_state_dict(owl2.config, Conversion(state_dict=owl2.state_dict())).eval()
        generator = torch.Generator().manual_seed(10)
        for layer in different.decoder.layers:
            layer.self_attn.k_proj.visual.weight.normal_(0.0, 0.2, generator=generator)
        logits = different(**batch, use_cache=False).logits
    before_images = expected.visual_mask.cumsum(dim=1) == 0
    torch.testing.assert_close(logits[before_images], expected.logits[before_images], atol=1e-5, rtol=1e-5)
    differs = (logits - expected.logits).abs().amax(dim=-1) > 1e-3
    assert torch.equal(differs, ~before_images)
