"""Data: a folder of real captioned images (the toy world, its procedural stand-in, is ``world.py``).

A folder holds images with captions from ``captions.jsonl``, ``metadata.jsonl`` or a sidecar ``<image>.txt``; every
image is checked when the folder is opened (WebDataset shards: ``formats/shards.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import UnidentifiedImageError

from .formats.images import IMAGE_SUFFIXES, center_crop, open_image, to_rgb, to_tensor, unreadable


# ---- real data: a folder of images with captions ----------------------------------------------------------------
def _read_captions(root: Path) -> dict[str, str]:
    """Captions from ``captions.jsonl`` ({"file", "caption"}) or ``metadata.jsonl`` ({"file_name", "text"})."""
    for name, file_key, text_key in (("captions.jsonl", "file", "caption"), ("metadata.jsonl", "file_name", "text")):
        path = root / name
        if path.is_file():
            out = {}
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        out[row[file_key]] = row[text_key]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        msg = f"{path}:{n}: expected a JSON object with {file_key!r} and {text_key!r}"
                        raise ValueError(msg) from None
            return out
    return {}


class CaptionedFolder(torch.utils.data.Dataset):
    """Images under ``root`` with captions from captions.jsonl / metadata.jsonl or a sidecar ``<image>.txt``.

    Every image is checked when the folder is opened: one without a caption, or that cannot be read, is an error
    naming the file, unless ``skip_bad=True``, which leaves it out and counts it in ``self.skipped``.
    """

    def __init__(self, root: str | Path, resolution: int = 512, skip_bad: bool = False):
        self.root, self.resolution, self.skip_bad = Path(root), resolution, skip_bad
        if not self.root.is_dir():
            raise FileNotFoundError(f"no such data folder: {self.root}")
        table = _read_captions(self.root)
        self.items: list[tuple[Path, str]] = []
        self.skipped: dict[str, str] = {}
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            rel = path.relative_to(self.root).as_posix()
            caption = table.get(rel)
            if caption is None and path.with_suffix(".txt").is_file():
                caption = path.with_suffix(".txt").read_text().strip()
            if not path.is_file():  # a FIFO or device would block or never end
                problem = "not a regular file (a FIFO or device)"
            elif caption is None or caption == "":
                problem = "no caption"
            elif not isinstance(caption, str):  # a .jsonl caption that is a number or a list
                problem = f"its caption is a {type(caption).__name__}, not a string"
            else:
                problem = unreadable(path)
            if problem:
                if not skip_bad:
                    raise ValueError(f"{path}: {problem} (pass skip_bad=True / --skip-bad to leave such files out)")
                self.skipped[rel] = problem
                continue
            self.items.append((path, caption))
        if not self.items:
            raise ValueError(f"{self.root}: no usable captioned images")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        """Image i; one that fails to load now (changed since the check) is an error, or with ``skip_bad`` counted
        in ``self.skipped`` and replaced by the next good one, so a run never stops on it."""
        for k in range(len(self.items)):
            path, caption = self.items[(i + k) % len(self.items)]
            try:
                with open_image(path) as image:
                    return to_tensor(center_crop(to_rgb(image), self.resolution)), caption
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                if not self.skip_bad:
                    raise ValueError(f"{path}: unreadable image ({e})") from None
                self.skipped[path.relative_to(self.root).as_posix()] = f"unreadable image ({type(e).__name__})"
        raise ValueError(f"{self.root}: no image of the folder can be read any more")

