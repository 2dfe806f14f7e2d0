"""Image loading for training: bytes -> RGB -> square ``uint8 [3, S, S]``, with every failure named.

Normalisation happens on the device (:func:`normalize`): shipping ``uint8`` moves a quarter of the
bytes of ``float32`` through the object store and the host-to-device copy.
"""

from __future__ import annotations

import io
import warnings
from functools import cache, lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# OpenAI CLIP statistics, as in the released preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


def read_bytes(path: str) -> bytes:
    """The file's bytes, from a local path or a URI (``s3://``, ``gs://``, ``file://``, ...)."""
    try:
        if "://" in path:
            scheme, rest = path.split("://", 1)
            bucket = "" if scheme == "file" else rest.split("/", 1)[0]
            with _filesystem(f"{scheme}://{bucket}/").open_input_stream(rest) as stream:
                data = stream.read()
        else:
            with open(path, "rb") as file:
                data = file.read()
    except OSError as error:  # FileNotFoundError, PermissionError, pyarrow's IOError for remote paths
        raise BadImage("missing_file", f"{path}: {error.__class__.__name__}: {error}") from error
    if not data:
        raise BadImage("empty_file", f"{path}: zero bytes")
    return data


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
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def resize(image: Image.Image, size: int, mode: str) -> np.ndarray:
    """RGB image -> ``uint8 [3, size, size]``.

    ``stretch`` ignores the aspect ratio (the official evaluation); ``pad`` pads to a square with the CLIP
    mean colour first (the official fine-tuning); ``crop`` scales the shortest side then centre-crops.
    """
    if mode == "pad":
        width, height = image.size
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), tuple(round(255 * m) for m in CLIP_MEAN))
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    elif mode == "crop":
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
    mean = torch.tensor(CLIP_MEAN, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8 [N, 3, S, S]`` on any device -> CLIP-normalised ``dtype`` tensor on the same device.

    The arithmetic is float32 whatever ``dtype``, so the cached constants depend on the device only.
    """
    mean, std = _clip_constants(images.device)
    return ((images.float() / 255.0 - mean) / std).to(dtype)
