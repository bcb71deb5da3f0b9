"""Image files: the suffixes read, decoding to 8-bit RGB (any mode), the centre crop of SD's data pipelines, and
[-1, 1] tensors -- what the captioned folder (``data.py``), WebDataset shards and FID's image folders share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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
        with Image.open(path) as image:
            image.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        return f"unreadable image ({type(e).__name__})"
    return ""
