"""Image files: the suffixes read, decoding to 8-bit RGB (any mode), the centre crop of SD's data pipelines, and
[-1, 1] tensors -- what the captioned folder (``data.py``), WebDataset shards and FID's image folders share."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PIXELS = 8192 * 8192  # a larger image is a bad sample (a decompression bomb would take GBs to decode)


class TooManyPixels(ValueError):
    """An image over ``MAX_PIXELS`` (its message says how many it has)."""


@contextmanager
def open_image(source: str | Path | BinaryIO) -> Iterator[Image.Image]:
    """``Image.open`` that refuses, as ``TooManyPixels``, an image of more than ``MAX_PIXELS`` pixels, by its header and
    before decoding (PIL's own bomb check raises another kind of error, and only past 179M pixels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # PIL's check, past 89M pixels
            n = re.search(r"\((\d+) pixels\)", str(e))
            raise TooManyPixels(f"{int(n[1]) if n else 0:,} pixels, more than {MAX_PIXELS:,}") from None
    with image:
        if image.width * image.height > MAX_PIXELS:
            raise TooManyPixels(f"{image.width * image.height:,} pixels, more than {MAX_PIXELS:,}")
        yield image


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` (bicubic), then crop the center square."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16/32-bit greyscale scaled (not clipped), alpha and palette transparency
    composited on ``BACKGROUND``."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(image, dtype=np.float64)
        full = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        full = 1.0 if image.mode == "F" and a.max() <= 1 else full
        return Image.fromarray(np.clip(a / full * 255 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def unreadable(path: Path) -> str:
    """'' if the image decodes fully (a truncated file passes PIL's verify() but not load()), else the problem."""
    try:
        with open_image(path) as image:
            image.load()
    except TooManyPixels as e:
        return f"unreadable image ({e})"
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        return f"unreadable image ({type(e).__name__})"
    return ""
