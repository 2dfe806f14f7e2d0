"""Image loading for training: bytes -> RGB -> square ``uint8 [3, S, S]``, with every failure named.

:func:`load` turns any failure of one record's image into a :class:`BadImage` (a named skip): paths that are
no regular file (a FIFO would hang the worker, ``/dev/zero`` never ends), files over the byte limit, web URLs,
and whatever the decoder, EXIF rotation, colour conversion or resizing raise, ``MemoryError`` included.

Normalisation happens on the device (:func:`normalize`): shipping ``uint8`` moves a quarter of the
bytes of ``float32`` through the object store and the host-to-device copy.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from owl2.config.data import DEFAULT_MAX_IMAGE_BYTES
from owl2.data.sample import WEB_SCHEMES

if TYPE_CHECKING:  # torch is imported where tensors are made: the Ray Data workers that decode never need it
    import torch

# OpenAI CLIP statistics, as in the released preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOUR = tuple(round(255 * m) for m in CLIP_MEAN)


class BadImage(Exception):
    """An image that cannot be used; ``reason`` is one of ``sample.SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@lru_cache(maxsize=16)
def _filesystem(root: str):
    """One pyarrow filesystem per ``scheme://bucket`` (creating one resolves credentials: do it once)."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(root)[0]


def read_bytes(path: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The file's bytes, from a local path or a URI (``s3://``, ``gs://``, ``file://``, ...).

    Only regular files of at most ``max_bytes`` are read (checked from the size before reading, and again
    while reading); web URLs are never fetched. Every refusal is a :class:`BadImage`.
    """
    if path.startswith(WEB_SCHEMES):
        raise BadImage("web_url", f"{path}: web URLs are not downloaded at training time; fetch the images first")
    if "\0" in path:
        raise BadImage("bad_path", f"{path!r}: the path holds a NUL byte")
    try:
        if "://" in path and not path.startswith("file://"):
            data = _read_remote(path, max_bytes)
        else:
            data = _read_local(path.removeprefix("file://"), max_bytes)
    except OSError as error:  # FileNotFoundError, PermissionError, pyarrow's IOError for remote paths
        raise BadImage("missing_file", f"{path}: {error.__class__.__name__}: {error}") from error
    except ValueError as error:  # a URI pyarrow cannot parse (ArrowInvalid), a path the OS refuses
        raise BadImage("bad_path", f"{path}: {error.__class__.__name__}: {error}") from error
    if not data:
        raise BadImage("empty_file", f"{path}: zero bytes")
    if len(data) > max_bytes:
        raise BadImage("too_many_bytes", f"{path}: more than the {max_bytes:,} byte limit")
    return data


def _read_local(path: str, max_bytes: int) -> bytes:
    # stat before open: opening a FIFO blocks, and /dev/zero never ends.
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise BadImage("not_a_file", f"{path}: a {_file_kind(info.st_mode)}, not a regular file")
    if info.st_size > max_bytes:
        raise BadImage("too_many_bytes", f"{path}: {info.st_size:,} bytes exceed the {max_bytes:,} byte limit")
    with open(path, "rb") as file:
        return file.read(max_bytes + 1)  # the file may have grown since the stat


def _read_remote(path: str, max_bytes: int) -> bytes:
    from pyarrow import fs

    scheme, rest = path.split("://", 1)
    filesystem = _filesystem(f"{scheme}://{rest.split('/', 1)[0]}/")
    info = filesystem.get_file_info(rest)
    if info.type == fs.FileType.NotFound:
        raise FileNotFoundError(f"no such object: {path}")
    if info.type != fs.FileType.File:
        raise BadImage("not_a_file", f"{path}: a {info.type.name}, not a file")
    if info.size is not None and info.size > max_bytes:
        raise BadImage("too_many_bytes", f"{path}: {info.size:,} bytes exceed the {max_bytes:,} byte limit")
    with filesystem.open_input_stream(rest) as stream:
        return stream.read(max_bytes + 1)  # the size may be unknown or wrong: never read past the limit


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"))
    kinds += ((stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (CMYK, palette, transparency, 16-bit greyscale included)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: PIL's convert("L") clips instead of scaling, so scale to 8 bits by hand.
        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        return Image.fromarray((array * (255.0 / top)).round().astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become white, not whatever colour the encoder left under them.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def decode(data: bytes, max_pixels: int, name: str = "image") -> Image.Image:
    """Encoded bytes -> RGB image, or :class:`BadImage` naming why not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise BadImage("too_many_pixels", f"{name}: {width}x{height} exceeds the {max_pixels:,} pixel limit")
            image.load()
    except BadImage:
        raise
    except UnidentifiedImageError as error:
        raise BadImage("not_an_image", f"{name}: {error}") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage("too_many_pixels", f"{name}: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage("truncated_image", f"{name}: {error}") from error
    except Exception as error:  # a decoder plug-in's own exception, MemoryError: one record, not the job
        raise unexpected(error, name) from error
    with _named(name):
        return to_rgb(ImageOps.exif_transpose(image))


def unexpected(error: BaseException, name: str) -> BadImage:
    """The named skip for an error no check foresaw (``out_of_memory`` or ``image_error``)."""
    reason = "out_of_memory" if isinstance(error, MemoryError) else "image_error"
    return BadImage(reason, f"{name}: {error.__class__.__name__}: {error}")


@contextmanager
def _named(name: str) -> Iterator[None]:
    try:
        yield
    except BadImage:
        raise
    except Exception as error:
        raise unexpected(error, name) from error


def load(item: str | bytes, name: str, size: int, mode: str, max_pixels: int, max_bytes: int) -> np.ndarray:
    """A path/URI or encoded bytes -> ``uint8 [3, size, size]``; every failure is a :class:`BadImage`."""
    with _named(name):
        if isinstance(item, str):
            data = read_bytes(item, max_bytes)
        elif len(item) > max_bytes:
            raise BadImage("too_many_bytes", f"{name}: {len(item):,} bytes exceed the {max_bytes:,} byte limit")
        else:
            data = bytes(item)
        return resize(decode(data, max_pixels, name), size, mode)


def resize(image: Image.Image, size: int, mode: str) -> np.ndarray:
    """RGB image -> ``uint8 [3, size, size]``.

    ``stretch`` ignores the aspect ratio (the official evaluation); ``pad`` pads to a square with the CLIP
    mean colour first (the official fine-tuning); ``crop`` scales the shortest side then centre-crops.
    """
    if mode == "pad":
        return np.asarray(_pad(image, size), dtype=np.uint8).transpose(2, 0, 1).copy()
    if mode == "crop":
        width, height = image.size
        scale = size / min(width, height)
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif mode != "stretch":
        raise ValueError(f"unknown resize mode {mode!r}")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


@cache
def _clip_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std as float32 ``[1, 3, 1, 1]`` tensors on ``device``, copied there once, not per batch
    (a tensor built from Python numbers on an accelerator is a host->device copy)."""
    import torch

    mean = torch.tensor(CLIP_MEAN, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def _pad(image: Image.Image, size: int) -> Image.Image:
    """The official ``pad`` (paste onto a square canvas of the longer side, then shrink to ``size``) without
    drawing that canvas: a 40000 x 1000 image would need a 4.8 GB one.

    Only the band of the canvas that holds the image, plus a margin of mean colour as wide as the bicubic
    filter reaches, is drawn and shrunk (``resize``'s ``box`` keeps the canvas's sampling grid); the rest of
    the output is the mean colour, as the canvas gave it. Equal to the official formula within a grey level.
    """
    width, height = image.size
    side = max(width, height)
    if side <= size:  # enlarging: the canvas is no bigger than the output
        return _pad_canvas(image, side).resize((size, size), Image.BICUBIC)
    scale = side / size  # canvas pixels per output pixel; the bicubic filter reaches 2 * scale either way
    margin = math.ceil(6 * scale) + 2
    left, top = (side - width) // 2, (side - height) // 2
    # Output pixels [first, last) along each axis are those the image reaches; the canvas band they read.
    first = [max(0, math.floor(offset / scale - 3)) for offset in (left, top)]
    last = [min(size, math.ceil((offset + extent) / scale + 3)) for offset, extent in ((left, width), (top, height))]
    low = [max(0, offset - margin) for offset in (left, top)]
    high = [min(side, offset + extent + margin) for offset, extent in ((left, width), (top, height))]
    band = Image.new("RGB", (high[0] - low[0], high[1] - low[1]), PAD_COLOUR)
    band.paste(image, (left - low[0], top - low[1]))
    # Two passes, horizontal first, as Pillow shrinks the square canvas (for a band it may pick the other order,
    # whose rounding differs by a few grey levels).
    x0, y0 = (max(0.0, first[axis] * scale - low[axis]) for axis in (0, 1))
    x1, y1 = (min(band.size[axis], last[axis] * scale - low[axis]) for axis in (0, 1))  # float error past the edge
    columns, rows = last[0] - first[0], last[1] - first[1]
    band = band.resize((columns, band.height), Image.BICUBIC, box=(x0, 0, x1, band.height))
    band = band.resize((columns, rows), Image.BICUBIC, box=(0, y0, columns, y1))
    out = Image.new("RGB", (size, size), PAD_COLOUR)
    out.paste(band, (first[0], first[1]))
    return out


def _pad_canvas(image: Image.Image, side: int) -> Image.Image:
    width, height = image.size
    canvas = Image.new("RGB", (side, side), PAD_COLOUR)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def normalize(images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``uint8 [N, 3, S, S]`` on any device -> CLIP-normalised ``dtype`` tensor on the same device.

    The arithmetic is float32 whatever ``dtype`` (default float32), so the cached constants depend on the
    device only.
    """
    mean, std = _clip_constants(images.device)
    normalized = (images.float() / 255.0 - mean) / std
    return normalized if dtype is None else normalized.to(dtype)
