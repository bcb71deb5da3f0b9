"""The toy world whose captions leave things to chance, as people's captions do (the stand-in for MS-COCO, §5).

A scene is one or two objects on cells of a 3x3 grid that are never neighbours (so they never touch), each with a
colour, an upright shape, a size, a texture (solid, or striped at a random phase: fine detail that no caption
names) and a place, over a dark or light background whose gradient runs in a random direction. A caption names
a subset of that, the way people caption (``PEOPLE``): the main object's shape always, its colour nearly always,
its size, texture and place sometimes; the other object half the time; the background sometimes; "two red circles"
when both objects are alike. So one caption allows many images: ``conditional_spread`` measures how many.

Every sample is a pure function of (seed, split, index). The held-out split holds the captions whose text hashes
to 0 mod 10; training never draws them (a drawn scene whose caption is held out is drawn again).
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .formats.figures import caption_grid
from .formats.images import to_tensor

COLORS = {"red": (215, 40, 40), "orange": (245, 140, 25), "yellow": (230, 210, 40), "green": (40, 170, 60),
          "blue": (45, 90, 230), "purple": (150, 60, 200)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 9.0, "large": 12.5}  # circumradius in pixels of a 64x64 image
TEXTURES = ("solid", "striped")
CROSS_WIDTH = 0.35  # a cross's bars' half-width per unit circumradius
STRIPE_PERIOD, STRIPE_DARK = 8, 0.5  # pixels per dark + bright band; a dark band's brightness
CENTRES = (15, 32, 49)  # pixel centre of a grid cell, per row and column
PLACES = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
          (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
BACKGROUNDS = {"dark": (18, 70), "light": (180, 240)}  # grey levels at the two ends of the gradient
ATTRIBUTES = ("color", "shape", "size", "texture", "place", "count", "other", "background")


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    size: str
    texture: str
    cell: tuple[int, int]

    @property
    def place(self) -> str:
        return PLACES[self.cell]


@dataclass(frozen=True)
class Scene:
    """What an image shows (and what the pixel judge reads back); ``things[0]`` is the main object."""

    things: tuple[Thing, ...]
    background: str


@dataclass(frozen=True)
class Naming:
    """How often people name each part of a scene (probabilities)."""

    color: float = 0.9
    size: float = 0.35
    texture: float = 0.35
    place: float = 0.5
    other: float = 0.5  # the second object, when there is one
    count: float = 0.8  # "two red circles" when both objects are alike
    background: float = 0.3


PEOPLE = Naming()
THOROUGH = Naming(color=1.0, size=0.6, texture=0.8, place=0.8, other=0.8, count=1.0, background=0.6)  # toy CLIP


@dataclass(frozen=True)
class Said:
    """What a caption names: of the main object, None for an unnamed attribute; ``other``: the second object's
    (color or None, shape) or None; ``count`` 2 for "two ..."; ``background`` or None."""

    shape: str
    color: str | None = None
    size: str | None = None
    texture: str | None = None
    place: str | None = None
    count: int = 1
    other: tuple[str | None, str] | None = None
    background: str | None = None

    @property
    def caption(self) -> str:
        words = [w for w in (self.size, self.color, self.texture) if w]
        noun = self.shape + ("es" if self.shape == "cross" else "s") if self.count == 2 else self.shape
        head = "two" if self.count == 2 else ("an" if (words or [noun])[0][0] in "aeiou" else "a")
        text = " ".join([head, *words, noun])
        if self.place:
            text += " in the center" if self.place == "center" else f" on the {self.place}" if self.place in (
                "left", "right") else f" at the {self.place}"
        if self.other:
            color, shape = self.other
            rest = " ".join(w for w in (color, shape) if w)
            text += f" and {'an' if rest[0] in 'aeiou' else 'a'} {rest}"
        if self.background:
            text += f" on a {self.background} background"
        return text

    def named(self) -> list[str]:
        """The attributes this caption names, in ``ATTRIBUTES`` order."""
        return [a for a in ATTRIBUTES if (a == "shape" or a == "count" and self.count == 2 or
                                          a not in ("shape", "count") and getattr(self, a) is not None)]


def is_heldout(caption: str) -> bool:
    return zlib.crc32(caption.encode()) % 10 == 0


# ---- drawing scenes and what is said of them --------------------------------------------------------------------
def draw_scene(rng: np.random.Generator) -> Scene:
    """One or two objects on grid cells that are not neighbours; a third of two-object scenes repeat the first."""
    first = (int(rng.integers(3)), int(rng.integers(3)))
    thing = lambda cell: Thing(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)),  # noqa: E731
                               str(rng.choice(list(SIZES))), str(rng.choice(TEXTURES)), cell)
    things = [thing(first)]
    free = [c for c in PLACES if max(abs(c[0] - first[0]), abs(c[1] - first[1])) > 1]  # none beside the centre
    if free and rng.random() < 0.5:
        cell = free[rng.integers(len(free))]
        second = thing(cell)
        if rng.random() < 1 / 3:  # alike: same colour and shape
            second = dataclasses.replace(second, color=things[0].color, shape=things[0].shape)
        things.append(second)
    return Scene(tuple(things), str(rng.choice(list(BACKGROUNDS))))


def say(scene: Scene, rng: np.random.Generator, naming: Naming = PEOPLE) -> Said:
    """A caption of ``scene``: a random subset of what it shows, by ``naming``'s probabilities."""
    main, *rest = scene.things
    p = lambda k: rng.random() < getattr(naming, k)  # noqa: E731
    alike = bool(rest) and (rest[0].color, rest[0].shape) == (main.color, main.shape)
    if alike and p("count"):  # "two red circles": what both share, never one object's own size / texture / place
        color = main.color if p("color") else None
        size = main.size if main.size == rest[0].size and p("size") else None
        texture = main.texture if main.texture == rest[0].texture and p("texture") else None
        return Said(main.shape, color, size, texture, None, 2, None, scene.background if p("background") else None)
    other = None
    if rest and not alike and p("other"):
        other = (rest[0].color if p("color") else None, rest[0].shape)
    return Said(main.shape, main.color if p("color") else None, main.size if p("size") else None,
                main.texture if p("texture") else None, main.place if p("place") else None, 1, other,
                scene.background if p("background") else None)


def draw(seed: int, split: str, i: int, naming: Naming = PEOPLE) -> tuple[Scene, Said, np.random.Generator]:
    """Sample i of a split: a scene and its caption, drawn again until the caption is in the split; the generator
    goes on to render it."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = np.random.default_rng([seed, split == "heldout", i, 2])
    while True:
        scene = draw_scene(rng)
        said = say(scene, rng, naming)
        if is_heldout(said.caption) == (split == "heldout"):
            return scene, said, rng


# ---- rendering --------------------------------------------------------------------------------------------------
def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Upright polygon of circumradius r (None: a circle, drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r / 2**0.5
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.866 * r, cy + 0.5 * r), (cx - 0.866 * r, cy + 0.5 * r)]
    w = r * CROSS_WIDTH
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w)]


def shape_mask(shape: str, cx: float, cy: float, r: float, side: int) -> np.ndarray:
    """[side, side] bool: the shape's pixels (coordinates in pixels of a ``side`` image)."""
    mask = Image.new("L", (side, side), 0)
    d, poly = ImageDraw.Draw(mask), outline(shape, cx, cy, r)
    if poly is None:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon(poly, fill=255)
    return np.asarray(mask) > 127


def render(scene: Scene, rng: np.random.Generator, resolution: int = 64) -> Image.Image:
    """Draw ``scene`` 2x supersampled: a grey gradient in a random direction, then each object with a little jitter
    of place, size and colour; stripes run horizontally at a random phase."""
    s, k = 2 * resolution, 2 * resolution / 64
    lo, hi = BACKGROUNDS[scene.background]
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:s, 0:s] / (s - 1) - 0.5
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / 2**0.5 + 0.5
    image = np.repeat((lo + (hi - lo) * ramp)[..., None], 3, -1)
    for thing in scene.things:
        cy, cx = (CENTRES[thing.cell[0]] + rng.uniform(-2, 2)) * k, (CENTRES[thing.cell[1]] + rng.uniform(-2, 2)) * k
        r = SIZES[thing.size] * rng.uniform(0.95, 1.05) * k
        mask = shape_mask(thing.shape, cx, cy, r, s)
        color = np.clip(np.array(COLORS[thing.color]) + rng.integers(-12, 13, 3), 0, 255).astype(float)
        shade = np.ones((s, s))
        if thing.texture == "striped":
            phase = rng.uniform(0, STRIPE_PERIOD)
            shade = np.where(((np.arange(s) / k + phase) % STRIPE_PERIOD) < STRIPE_PERIOD / 2, STRIPE_DARK, 1.0)
            shade = np.repeat(shade[:, None], s, 1)
        image[mask] = (color[None] * shade[mask][:, None])
    out = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return out.resize((resolution, resolution), Image.Resampling.BOX)


class World(torch.utils.data.Dataset):
    """``length`` samples of a split; item i is (image [3, H, W] in [-1, 1], caption), a pure function of (seed, i)."""

    def __init__(self, split: str = "train", length: int = 1_000_000, seed: int = 0, resolution: int = 64,
                 naming: Naming = PEOPLE):
        self.split, self.length, self.seed, self.resolution, self.naming = split, length, seed, resolution, naming
        draw(seed, split, 0, naming)  # checks the split

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> tuple[Image.Image, Scene, Said]:
        """Sample i: its image, the scene drawn and what its caption says."""
        scene, said, rng = draw(self.seed, self.split, i, self.naming)
        return render(scene, rng, self.resolution), scene, said

    def sample(self, i: int) -> tuple[Image.Image, Said]:
        image, _, said = self.scene(i)
        return image, said

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        image, said = self.sample(i)
        return to_tensor(image), said.caption


# ---- captions that differ in one attribute: hard negatives and zero-shot questions --------------------------------
VALUES = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "texture": TEXTURES,
          "place": tuple(PLACES.values()), "background": tuple(BACKGROUNDS)}


def alternatives(said: Said, attribute: str) -> list[Said]:
    """The captions that change only ``attribute`` of ``said`` (one it names): every other value; for 'count', one
    object instead of two; for 'other', the other object's other shapes."""
    if attribute not in said.named():
        raise ValueError(f"{said.caption!r} does not name its {attribute}")
    if attribute == "count":
        return [dataclasses.replace(said, count=1)]
    if attribute == "other":
        color, shape = said.other
        return [dataclasses.replace(said, other=(color, s)) for s in SHAPES if s != shape]
    return [dataclasses.replace(said, **{attribute: v}) for v in VALUES[attribute] if v != getattr(said, attribute)]


def twin(scene: Scene, said: Said, rng: np.random.Generator) -> tuple[Scene, Said]:
    """The scene and its caption changed in one attribute the caption names (not the count), drawn at random: a hard
    negative for the toy CLIP, which must then tell that word apart. A place moves to a free cell."""
    main, *rest = scene.things
    named = [a for a in said.named() if a != "count" and not (a == "place" and not _free_cells(main, rest))]
    attribute = named[rng.integers(len(named))]
    if attribute == "background":
        new = [v for v in BACKGROUNDS if v != said.background][0]
        return dataclasses.replace(scene, background=new), dataclasses.replace(said, background=new)
    if attribute == "other":
        shape = str(rng.choice([s for s in SHAPES if s != rest[0].shape]))
        return (dataclasses.replace(scene, things=(main, dataclasses.replace(rest[0], shape=shape))),
                dataclasses.replace(said, other=(said.other[0], shape)))
    if attribute == "place":
        free = _free_cells(main, rest)
        cell = free[rng.integers(len(free))]
        return (dataclasses.replace(scene, things=(dataclasses.replace(main, cell=cell), *rest)),
                dataclasses.replace(said, place=PLACES[cell]))
    value = str(rng.choice([v for v in VALUES[attribute] if v != getattr(main, attribute)]))
    both = said.count == 2  # "two red circles": what is said is said of both
    things = tuple(dataclasses.replace(t, **{attribute: value}) if t is main or both else t for t in scene.things)
    return dataclasses.replace(scene, things=things), dataclasses.replace(said, **{attribute: value})


def _free_cells(main: Thing, rest: list[Thing]) -> list[tuple[int, int]]:
    return [c for c in PLACES if c != main.cell and all(max(abs(c[0] - t.cell[0]), abs(c[1] - t.cell[1])) > 1
                                                        for t in rest)]


class Twins(torch.utils.data.Dataset):
    """Training pairs for the toy CLIP: item 2k is sample k captioned by ``naming``, item 2k + 1 its ``twin`` (drawn
    with the same jitter), so each batch of even size holds captions that differ in one word."""

    def __init__(self, length: int, seed: int = 0, naming: Naming = THOROUGH, resolution: int = 64):
        self.length, self.seed, self.naming, self.resolution = length, seed, naming, resolution

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        scene, said, rng = draw(self.seed, "train", i // 2, self.naming)
        if i % 2:
            other = np.random.default_rng([self.seed, i // 2, 3])
            for _ in range(20):  # a twin whose caption is held out is drawn again
                changed = twin(scene, said, other)
                if not is_heldout(changed[1].caption):
                    scene, said = changed
                    break
        return to_tensor(render(scene, rng, self.resolution)), said.caption


# ---- the vocabulary and the spread ------------------------------------------------------------------------------
WORDS = frozenset({"a", "an", "two", "and", "on", "at", "in", "the", "background", *COLORS, *SIZES, *TEXTURES,
                   *BACKGROUNDS, *SHAPES, "circles", "squares", "triangles", "crosses",
                   *(w for p in PLACES.values() for w in p.split())})


def unknown_words(prompt: str) -> list[str]:
    """The words of ``prompt`` that no caption of this world has (a toy model has never seen them), in order."""
    return [w for w in prompt.lower().replace(",", " ").split() if w not in WORDS]


def conditional_spread(n: int = 20_000, seed: int = 0, resolution: int = 32) -> dict:
    """How much one caption leaves to chance, over ``n`` training samples grouped by caption, on the captions drawn
    at least 30 times (30 samples each): the distinct scenes among a caption's 30 (a scene is its discrete content:
    objects, their attributes and cells, the background) and the pixel variance within a caption as a fraction of
    the variance of all those samples (1: the caption says nothing; the old world, whose captions named everything,
    had 0.03)."""
    groups: dict[str, list] = defaultdict(list)
    world = World("train", n, seed, resolution)
    for i in range(n):
        image, scene, said = world.scene(i)
        groups[said.caption].append((scene, np.asarray(image, dtype=np.float64) / 255))
    common = [g[:30] for g in groups.values() if len(g) >= 30]
    if not common:
        raise ValueError(f"no caption was drawn 30 times in {n} samples: draw more")
    pixels = np.stack([x for g in common for _, x in g])
    within = sum(((np.stack([x for _, x in g]) - np.mean([x for _, x in g], 0)) ** 2).sum() for g in common)
    return {"samples": n, "captions": len(groups), "common_captions": len(common),
            "distinct_scenes_of_30": float(np.mean([len({scene for scene, _ in g}) for g in common])),
            "within_caption_variance": float(within / ((pixels - pixels.mean(0)) ** 2).sum())}


def samples_of(caption: str, k: int, seed: int = 0, tries: int = 200_000) -> list[Image.Image]:
    """``k`` images the world draws for ``caption`` (training samples whose caption it is): what it allows."""
    split = "heldout" if is_heldout(caption) else "train"
    found = []
    for i in range(tries):
        scene, said, rng = draw(seed, split, i)
        if said.caption == caption:
            found.append(render(scene, rng))
            if len(found) == k:
                return found
    raise ValueError(f"{caption!r}: {len(found)} of {k} samples in {tries} draws (not a caption of this world?)")


SPREAD_CAPTIONS = ("a red circle", "two blue squares", "a yellow striped triangle on a dark background",
                   "a large green cross at the top left")


def main() -> None:
    """python -m snapfusion_min.world docs/world_spread.png: captions and six of the images each allows."""
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/world_spread.png")
    images = [image for caption in SPREAD_CAPTIONS for image in samples_of(caption, 6)]
    captions = [caption if j == 0 else "" for caption in SPREAD_CAPTIONS for j in range(6)]
    out.parent.mkdir(parents=True, exist_ok=True)
    caption_grid(images, captions, cols=6).save(out)
    print(out)


if __name__ == "__main__":
    main()
