"""Image loading: every bad-image kind is named (poison paths and decoder surprises too), odd modes are converted,
the three resize modes (``pad`` without the full canvas)."""

import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from owl2.data.images import CLIP_MEAN, CLIP_STD, BadImage, decode, load, normalize, read_bytes, resize, to_rgb

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


# ------------------------------------------------------------------------------------------------ poison records


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height``: PIL reads the size without the pixels."""
    data = bytearray(_encode(Image.new("L", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_paths_that_are_no_regular_file_are_named_without_opening_them(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it would block the worker forever
    (tmp_path / "folder.png").mkdir()
    cases = [
        (str(fifo), "not_a_file", "FIFO"),
        (str(tmp_path / "folder.png"), "not_a_file", "directory"),
        ("/dev/zero", "not_a_file", "character device"),  # reading it would never end
        (f"{tmp_path}/a\0b.png", "bad_path", "NUL"),
        ("http://example.com/cat.jpg", "web_url", "not downloaded"),
        ("https://example.com/cat.jpg", "web_url", "not downloaded"),
    ]
    for path, reason, words in cases:
        with pytest.raises(BadImage) as error:
            read_bytes(path)
        assert (error.value.reason, words in str(error.value)) == (reason, True), path


def test_the_byte_limit_is_checked_before_reading_local_and_remote_files_and_inline_bytes(tmp_path, monkeypatch):
    from pyarrow import fs

    from owl2.data import images

    big = tmp_path / "big.png"
    big.write_bytes(_encode(Image.new("RGB", (64, 64), "red")))
    size = big.stat().st_size
    assert read_bytes(str(big), max_bytes=size) == big.read_bytes()
    with pytest.raises(BadImage, match="exceed the .* byte limit") as local:
        read_bytes(str(big), max_bytes=size - 1)
    # The remote branch, on pyarrow's local filesystem standing in for a bucket: the size comes from the listing.
    monkeypatch.setattr(images, "_filesystem", lambda root: fs.LocalFileSystem())
    with pytest.raises(BadImage) as remote:
        read_bytes(f"s3://{big}", max_bytes=size - 1)
    assert read_bytes(f"s3://{big}", max_bytes=size) == big.read_bytes()
    with pytest.raises(BadImage) as remote_folder:
        read_bytes(f"s3://{tmp_path}")
    with pytest.raises(BadImage) as inline:
        load(big.read_bytes(), "row 3 image 0", 16, "pad", LIMIT, max_bytes=size - 1)
    reasons = [e.value.reason for e in (local, remote, remote_folder, inline)]
    assert reasons == ["too_many_bytes", "too_many_bytes", "not_a_file", "too_many_bytes"]
    assert "row 3 image 0" in str(inline.value)


def test_unexpected_decoder_errors_and_exhausted_memory_are_named_skips(tmp_path):
    # A JPEG whose EXIF block is damaged so that Pillow's EXIF rotation raises struct.error (found by fuzzing).
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "cam"  # orientation, camera make
    raw = bytearray(exif.tobytes())
    raw[6 + 11], raw[6 + 18] = 41, 229
    with pytest.raises(BadImage) as rotation:
        decode(_encode(Image.new("RGB", (8, 6)), "JPEG", exif=bytes(raw)), LIMIT, "rotated.jpg")
    assert rotation.value.reason == "image_error" and "rotated.jpg: error:" in str(rotation.value)

    # Past PIL's own bomb limit (2 x 89 Mpx) when the configured limit is higher: Image.open raises.
    with pytest.raises(BadImage) as bomb:
        decode(_png_claiming(20_000, 10_000), 10**9, "bomb.png")
    assert bomb.value.reason == "too_many_pixels"

    # MemoryError while decoding, in a child process whose address space leaves no room for the pixels.
    script = (
        "import io, resource\n"
        "from PIL import Image\n"
        "from owl2.data.images import BadImage, load\n"
        "buffer = io.BytesIO(); Image.new('RGB', (6000, 6000)).save(buffer, 'PNG')\n"
        "size = int(next(line for line in open('/proc/self/status') if line.startswith('VmSize')).split()[1])\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size * 1024 + 64 * 2**20, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    load(buffer.getvalue(), 'huge.png', 224, 'pad', 10**8, 2**30)\n"
        "except BadImage as error:\n"
        "    print(error.reason)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "out_of_memory", result.stderr


def _official_pad(image: Image.Image, size: int) -> np.ndarray:
    """The formula ``pad`` followed before: the whole square canvas of the longer side, then one resize."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), tuple(round(255 * m) for m in CLIP_MEAN))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return np.asarray(canvas.resize((size, size), Image.BICUBIC)).transpose(2, 0, 1)


@pytest.mark.parametrize(
    ("width", "height", "size"),
    [
        (640, 480, 224),
        (480, 640, 224),
        (1000, 300, 448),
        (301, 1000, 448),
        (333, 127, 112),
        (40, 20, 16),
        (50, 90, 448),
    ],
)
def test_pad_shrinks_a_band_instead_of_a_canvas_and_stays_within_a_grey_level(width, height, size):
    pixels = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    difference = np.abs(resize(image, size, "pad").astype(int) - _official_pad(image, size))
    assert difference.max() <= 1


def test_pad_of_a_very_wide_image_puts_it_in_a_centred_band():
    padded = resize(Image.new("RGB", (40_000, 1_000), (250, 0, 0)), 448, "pad")  # the canvas would be 4.8 GB
    mean = [round(255 * m) for m in CLIP_MEAN]
    assert padded[:, 0, 224].tolist() == mean and padded[:, 447, 224].tolist() == mean
    assert padded[:, 224, 0].tolist() == [250, 0, 0] and padded[:, 224, 447].tolist() == [250, 0, 0]
    halfway = (250 + mean[0]) / 2
    band = [row for row in range(448) if padded[0, row, 224] > halfway]  # 1000 / 40000 * 448 = 11.2 rows
    assert band == list(range(band[0], band[0] + len(band))) and len(band) in (11, 12)
    assert abs(band[0] + len(band) / 2 - 224) <= 1
