"""The MLP projector (``model.projector: mlp``): parity with transformers' LLaVA projector, one decoder token per
patch at the model's resolution, and a model that trains it."""

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ModelConfig, OptimConfig
from owl2.model import Owl2Config, Owl2ForCausalLM
from owl2.model.projector import MlpProjector
from owl2.train.optim import apply_trainable, build_optimizer, trainable_names, verify_optimizer_setup
from owl2.train.parallel import layer_stacks

MLP = ["projector=mlp"]


def _mlp_model(*overrides: str) -> Owl2ForCausalLM:
    torch.manual_seed(0)
    return Owl2ForCausalLM(Owl2Config.from_spec(ModelConfig.from_preset("debug", [*MLP, *overrides])))


def _llava_projector(vision_width: int, decoder_width: int) -> LlavaMultiModalProjector:
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_width, num_attention_heads=4),
        text_config=LlamaConfig(hidden_size=decoder_width, num_attention_heads=4),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    return LlavaMultiModalProjector(config)


def test_projector_matches_transformers_llava() -> None:
    torch.manual_seed(0)
    ours = MlpProjector(32, 64)
    with torch.no_grad():
        for param in ours.parameters():
            param.normal_(0.0, 0.5)  # biases and weights far from their init: every term shows
    theirs = _llava_projector(32, 64)
    theirs.load_state_dict(ours.state_dict())  # the same names: linear_1, linear_2
    features = torch.randn(3, 17, 32)  # CLS + a 4x4 grid
    # LLaVA's default feature selection drops the CLS token before its projector.
    torch.testing.assert_close(ours(features), theirs(features[:, 1:]), atol=1e-5, rtol=1e-5)


def test_the_model_feeds_every_patch_of_the_vit_output() -> None:
    model = _mlp_model().eval()
    theirs = _llava_projector(32, 64)
    theirs.load_state_dict(model.abstractor.state_dict())
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        vision_output, _ = model.vision(images)
        torch.testing.assert_close(model.encode_images(images), theirs(vision_output[:, 1:]), atol=1e-5, rtol=1e-5)


def test_tokens_per_image_are_the_patches_at_the_model_resolution() -> None:
    spec = ModelConfig.from_preset("debug", MLP)
    assert spec.tokens_per_image == 16 and spec.tokens_per_image_at(112) == 64  # 4x4 and 8x8 patches of 14 px
    assert ModelConfig.from_preset("debug").tokens_per_image_at(112) == 9  # the abstractor's count does not move
    model = _mlp_model()
    assert "abstractor.layers" not in layer_stacks(model)  # no layers: FSDP2 keeps it in the root unit
    model.set_image_size(112)
    # The train loop reads the spec after set_image_size and hands its count to the data pipeline.
    assert model.config.spec.tokens_per_image == 64
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6]])
    with torch.no_grad():
        out = model(ids, images=torch.randn(1, 3, 112, 112), image_counts=[1], use_cache=False)
    assert out.logits.shape == (1, 3 + 64, 256) and int(out.visual_mask.sum()) == 64


def test_a_model_with_the_mlp_projector_trains_it() -> None:
    model = _mlp_model()
    parts = ["abstractor"]  # the projector slot: LLaVA's stage 1
    apply_trainable(model, parts)
    assert trainable_names(model) == {f"abstractor.{name}" for name, _ in model.abstractor.named_parameters()}
    assert {"abstractor.linear_1.bias", "abstractor.linear_2.bias"} <= model.no_weight_decay()
    assert not {"abstractor.linear_1.weight", "abstractor.linear_2.weight"} & model.no_weight_decay()
    optimizer, _ = build_optimizer(model, OptimConfig(lr=3e-3, warmup_steps=0, weight_decay=0.0))
    verify_optimizer_setup(model, optimizer, parts)

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (2, 8), generator=generator)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    batch = {
        "input_ids": ids,
        "images": torch.randn(2, 3, 56, 56, generator=generator),
        "labels": ids.masked_fill(ids < 0, IGNORE_INDEX),
        "image_counts": [1, 1],
    }
    model.train()
    losses = []
    for step in range(6):
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        if step == 0:
            assert all(param.grad.abs().sum() > 0 for param in model.abstractor.parameters())
            assert all(param.grad is None for param in model.vision.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_mlp_without_the_mam_builds_and_runs() -> None:
    model = _mlp_model("decoder.modality_adaptive=false").eval()
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5], [IMAGE_TOKEN_INDEX, 4, IMAGE_TOKEN_INDEX]])
    with torch.no_grad():
        out = model(ids, images=torch.randn(3, 3, 56, 56), use_cache=False)
    assert out.visual_mask.sum(dim=1).tolist() == [16, 32]
    assert torch.isfinite(out.logits).all()


def test_cached_generation_with_the_mlp_projector_equals_uncached() -> None:
    model = _mlp_model().eval()
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6]])
    images = torch.randn(1, 3, 56, 56)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    cached = model.generate(ids, images=images, use_cache=True, **kwargs)
    assert cached.shape == (1, 4 + 4)
    assert torch.equal(cached, model.generate(ids, images=images, use_cache=False, **kwargs))
