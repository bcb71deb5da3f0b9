"""Data: the toy world (a procedural captioned image set) and a folder of real captioned images.

The toy world stands in for MS-COCO (paper §5) on a laptop: 64x64 images of one shape with a caption naming all
five of its attributes, e.g. "a small red triangle at the top left on a gray background". 6 colors x 5 shapes x
2 sizes x 5 positions x 3 backgrounds = 900 attribute combinations; a fixed tenth of them (``heldout``) never appears
in training and serves for evaluation. Every sample is a pure function of (seed, split, index), so data needs no
storage, resumes exactly and shards across processes by index.
"""

from __future__ import annotations

import itertools
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from .formats.figures import caption_grid
from .formats.images import IMAGE_SUFFIXES, center_crop, open_image, to_rgb, to_tensor, unreadable

COLORS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 225), "yellow": (235, 215, 45),
          "purple": (145, 55, 185), "orange": (245, 135, 30)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.22, "large": 0.42}  # object extent as a fraction of the image side
POSITIONS = {"top left": (0.28, 0.28), "top right": (0.72, 0.28), "center": (0.5, 0.5),
             "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72)}
BACKGROUNDS = {"gray": (128, 128, 128), "black": (22, 22, 22), "white": (238, 238, 238)}
ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "position": tuple(POSITIONS),
              "background": tuple(BACKGROUNDS)}


@dataclass(frozen=True)
class Combo:
    """One attribute combination; its caption is the text condition."""

    color: str
    shape: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where} on a {self.background} background"


ALL_COMBOS = [Combo(*c) for c in itertools.product(*ATTRIBUTES.values())]


def is_heldout(combo: Combo) -> bool:
    """A fixed tenth of the combinations (by a stable hash of the caption) is never used for training."""
    return zlib.crc32(combo.caption.encode()) % 10 == 0


def combos(split: str) -> list[Combo]:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [c for c in ALL_COMBOS if is_heldout(c) == (split == "heldout")]


TOY_WORDS = frozenset(word for c in ALL_COMBOS for word in c.caption.split())  # the toy world's whole vocabulary


def unknown_words(prompt: str) -> list[str]:
    """The words of ``prompt`` that no toy-world caption has (a toy model has never seen them), in order."""
    return [w for w in prompt.lower().replace(",", " ").split() if w not in TOY_WORDS]


def render(combo: Combo, rng: np.random.Generator, resolution: int = 64) -> Image.Image:
    """Draw the combination with small random jitter of position, size and colors (2x supersampled)."""
    s = 2 * resolution
    jitter = lambda rgb, k: tuple(int(np.clip(v + rng.integers(-k, k + 1), 0, 255)) for v in rgb)  # noqa: E731
    image = Image.new("RGB", (s, s), jitter(BACKGROUNDS[combo.background], 10))
    draw = ImageDraw.Draw(image)
    cx, cy = (np.array(POSITIONS[combo.position]) + rng.uniform(-0.04, 0.04, 2)) * s
    r = SIZES[combo.size] * rng.uniform(0.9, 1.1) * s / 2
    fill = jitter(COLORS[combo.color], 18)
    if combo.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif combo.shape == "square":
        draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
    elif combo.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif combo.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # cross
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return image.resize((resolution, resolution), Image.Resampling.BOX)


class ToyWorld(torch.utils.data.Dataset):
    """``len`` samples of a split; item i is (image [3, H, W] in [-1, 1], caption), a pure function of (seed, i)."""

    def __init__(self, split: str = "train", length: int = 1_000_000, seed: int = 0, resolution: int = 64):
        self.split, self.length, self.seed, self.resolution = split, length, seed, resolution
        self.combos = combos(split)

    def __len__(self) -> int:
        return self.length

    def sample(self, i: int) -> tuple[Image.Image, Combo]:
        rng = np.random.default_rng([self.seed, self.split == "heldout", i])
        combo = self.combos[rng.integers(len(self.combos))]
        return render(combo, rng, self.resolution), combo

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        image, combo = self.sample(i)
        return to_tensor(image), combo.caption


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


def main() -> None:
    """python -m snapfusion_min.data docs/toy_world.png: a grid of toy samples with their captions."""
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/toy_world.png")
    data = ToyWorld("train", seed=0)
    samples = [data.sample(i) for i in range(16)]
    out.parent.mkdir(parents=True, exist_ok=True)
    caption_grid([image for image, _ in samples], [c.caption for _, c in samples], cols=8).save(out)
    print(out)


if __name__ == "__main__":
    main()
