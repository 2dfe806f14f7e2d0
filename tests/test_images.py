"""Image loading: every bad-image kind is named, odd modes are converted, the three resize modes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from owl2.data.images import CLIP_MEAN, CLIP_STD, BadImage, decode, normalize, read_bytes, resize, to_rgb

LIMIT = 10_000_000


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(BadImage) as missing:
        read_bytes(str(tmp_path / "nope.jpg"))
    assert missing.value.reason == "missing_file" and "nope.jpg" in str(missing.value)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadImage) as empty:
        read_bytes(str(tmp_path / "empty.jpg"))
    assert empty.value.reason == "empty_file"
    (tmp_path / "ok.png").write_bytes(b"\x89PNG")
    assert read_bytes(f"file://{tmp_path}/ok.png") == b"\x89PNG"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"this is text, not pixels", "not_an_image"),
        (_encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:200], "truncated_image"),
        (_encode(Image.new("L", (4000, 3000))), "too_many_pixels"),
    ],
)
def test_undecodable_images_are_named(data, reason):
    with pytest.raises(BadImage) as error:
        decode(data, LIMIT, "sample-7")
    assert error.value.reason == reason and "sample-7" in str(error.value)


def test_cmyk_palette_rgba_and_16_bit_become_rgb():
    cmyk = decode(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100), LIMIT)
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[4, 4, 0] > 200 and np.asarray(cmyk)[4, 4, 1] < 60

    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent
    assert np.asarray(decode(_encode(rgba), LIMIT))[0, 0].tolist() == [255, 255, 255]

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert np.asarray(decode(_encode(palette), LIMIT))[0, 0].tolist() == [200, 10, 10]

    deep = Image.fromarray(np.array([[0, 65535], [32768, 16384]], dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    grey = np.asarray(to_rgb(deep))[..., 0]
    assert grey.tolist() == [[0, 255], [128, 64]]


def test_resize_modes():
    wide = Image.new("RGB", (40, 20), (250, 0, 0))
    stretch = resize(wide, 16, "stretch")
    assert stretch.shape == (3, 16, 16) and stretch.dtype == np.uint8 and (stretch[0] > 240).all()

    padded = resize(wide, 16, "pad")
    mean = [round(255 * m) for m in CLIP_MEAN]
    assert padded[:, 0, 8].tolist() == mean and padded[:, 15, 8].tolist() == mean  # bands above and below
    assert padded[0, 8, 8] > 240  # the image in the middle

    halves = Image.new("RGB", (40, 20), (0, 0, 250))
    halves.paste((0, 250, 0), (10, 0, 30, 20))  # green centre, blue sides
    cropped = resize(halves, 16, "crop")
    assert cropped[1, 8, 8] > 240 and cropped[2, 8, 8] < 10  # the centre square is green
    with pytest.raises(ValueError, match="unknown resize mode"):
        resize(wide, 16, "squash")


def test_normalize_matches_the_clip_formula():
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = (pixels.float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(normalize(pixels), expected)
    assert normalize(pixels, torch.bfloat16).dtype == torch.bfloat16


def test_normalize_makes_its_constants_once_per_device(op_recorder):
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    first = normalize(pixels)
    with op_recorder:
        again = normalize(pixels, torch.bfloat16)
    # No tensor made from Python numbers, which on a GPU is a host->device copy per batch.
    assert "aten.lift_fresh" not in op_recorder.ops and "aten.div" in op_recorder.ops
    assert torch.equal(again, first.to(torch.bfloat16))
