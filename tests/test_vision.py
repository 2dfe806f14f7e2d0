"""Vision encoder resolution changes and the abstractor's position tables."""

import math

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from owl2.config import ModelConfig
from owl2.model import Owl2Config, Owl2ForCausalLM
from owl2.model.abstractor import sincos_1d, sincos_2d_with_cls
from owl2.model.vision import resample_position_embedding


def test_resampling_to_the_same_grid_is_a_no_op():
    table = torch.randn(1, 1 + 16 * 16, 8)
    assert resample_position_embedding(table, 16) is table


def test_resampling_224_to_448_keeps_cls_and_the_grid():
    table = torch.randn(1, 1 + 16 * 16, 8, generator=torch.Generator().manual_seed(0))
    resampled = resample_position_embedding(table, 32)
    assert resampled.shape == (1, 1 + 32 * 32, 8)
    assert torch.equal(resampled[:, :1], table[:, :1])
    # timm's own resampler (without antialiasing, which only matters when shrinking) agrees on the layout.
    reference = resample_abs_pos_embed(table, new_size=(32, 32), num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(resampled, reference)
    # A constant table stays constant: the cubic weights sum to one.
    constant = resample_position_embedding(torch.full((1, 1 + 16 * 16, 4), 0.25), 32)
    torch.testing.assert_close(constant, torch.full_like(constant, 0.25))


def test_resampling_rejects_a_non_square_table():
    with pytest.raises(ValueError, match="not a square grid"):
        resample_position_embedding(torch.randn(1, 1 + 15, 4), 4)


def test_model_switches_resolution_between_stages():
    torch.manual_seed(0)
    model = Owl2ForCausalLM(Owl2Config.from_spec(ModelConfig.from_preset("debug"))).eval()
    before = model.vision.pos_embed.detach().clone()
    model.set_image_size(112)  # 4x4 -> 8x8 patches, like 224 -> 448
    assert model.vision.pos_embed.shape == (1, 65, 32)
    assert torch.equal(model.vision.pos_embed[:, :1], before[:, :1])
    assert model.config.spec.vision.image_size == 112
    with torch.no_grad():
        out = model(torch.tensor([[1, -200, 5]]), images=torch.randn(1, 3, 112, 112), use_cache=False)
    assert out.logits.shape == (1, 2 + 9, 256)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.set_image_size(100)


def test_sincos_tables_follow_the_specification():
    dim = 8
    table = sincos_1d(torch.arange(3), dim)
    omega = [1.0 / 10000 ** (k / (dim / 2)) for k in range(dim // 2)]
    assert table[2, 1].item() == pytest.approx(math.sin(2 * omega[1]), abs=1e-6)
    assert table[2, dim // 2 + 1].item() == pytest.approx(math.cos(2 * omega[1]), abs=1e-6)

    grid = sincos_2d_with_cls(3, dim)
    assert grid.shape == (10, dim) and torch.equal(grid[0], torch.zeros(dim))
    row, col = 1, 2  # patch index row * 3 + col, after the CLS row
    torch.testing.assert_close(grid[1 + row * 3 + col, : dim // 2], sincos_1d(torch.tensor([col]), dim // 2)[0])
    torch.testing.assert_close(grid[1 + row * 3 + col, dim // 2 :], sincos_1d(torch.tensor([row]), dim // 2)[0])
