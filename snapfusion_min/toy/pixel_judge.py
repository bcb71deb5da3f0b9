"""The second judge: it reads a toy-world scene back from pixels and shares nothing with the toy CLIP.

Objects are the saturated pixels (the background is grey), split by hue into the world's colours and into connected
pieces (objects never touch: they sit on grid cells that are not neighbours). Of each piece it reads the shape (the
upright template of best overlap with the piece, fitted to its bounding box), the size (its circumradius from the
box), the texture (the share of its inner pixels much darker than its brightest: stripes are half dark) and the
place (the grid cell of its centre); the background is dark or light by the grey pixels' brightness.
``caption_accuracy`` judges generated images against what their captions name (``world.Said``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..world import CENTRES, COLORS, CROSS_WIDTH, SHAPES, SIZES, Said, Scene, Thing

HUES = {name: np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360 for name, (r, g, b) in COLORS.items()}
MIN_PIXELS = 12  # a smaller piece is noise, not an object
STRIPED = 0.2  # share of dark pixels above which a piece is striped
# the box's half-extent per unit circumradius, by shape: (half-width, half-height)
EXTENT = {"circle": (1.0, 1.0), "square": (0.7071, 0.7071), "triangle": (0.866, 0.75), "cross": (1.0, 1.0)}
SIZE_CUT = (SIZES["small"] + SIZES["large"]) / 2


def _hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[H, W, 3] in [0, 1] -> hue in degrees (by the same formula as ``HUES``), saturation, value."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    value, low = image.max(-1), image.min(-1)
    saturation = np.where(value > 0, (value - low) / np.maximum(value, 1e-6), 0)
    hue = np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    return hue, saturation, value


def _pieces(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected pieces of ``mask``, each as an array of (row, col): every pixel takes the smallest label of
    its 3x3 neighbourhood until nothing changes."""
    big = mask.size
    labels = np.where(mask, np.arange(big).reshape(mask.shape), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        around = np.min([padded[1 + dy:padded.shape[0] - 1 + dy, 1 + dx:padded.shape[1] - 1 + dx]
                         for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        new = np.where(mask, around, big)
        if np.array_equal(new, labels):
            break
        labels = new
    return [np.argwhere(labels == v) for v in np.unique(labels[mask])]


def template(shape: str, cx: float, cy: float, r: float, side: int) -> np.ndarray:
    """[side, side] bool: the pixels whose centres lie inside the upright shape of circumradius r at (cx, cy)."""
    y, x = np.mgrid[0:side, 0:side] + 0.5
    dx, dy = np.abs(x - cx), y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (dx <= r / 2**0.5) & (np.abs(dy) <= r / 2**0.5)
    if shape == "triangle":
        return (dy >= -r) & (dy <= r / 2) & (dx <= (dy + r) / 1.5 * 0.866)
    w = CROSS_WIDTH * r
    return ((dx <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (dx <= r))


def _cell(v: float) -> int:
    return int(np.argmin([abs(v - c) for c in CENTRES]))


def _thing(piece: np.ndarray, color: str, value: np.ndarray, side: int) -> Thing:
    """Shape, size, texture and cell of one piece (pixel coordinates scaled to a 64-pixel image)."""
    k = 64 / side
    ys, xs = piece[:, 0], piece[:, 1]
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    mask = np.zeros((side, side), bool)
    mask[ys, xs] = True
    best, radius = None, 0.0
    for shape in SHAPES:
        ex, ey = EXTENT[shape]
        r = ((right - left) / ex + (bottom - top) / ey) / 4  # circumradius from the box
        cx = (left + right) / 2
        cy = top + r if shape == "triangle" else (top + bottom) / 2  # a triangle's centre is 2/3 down
        t = template(shape, cx, cy, r, side)
        iou = (t & mask).sum() / max((t | mask).sum(), 1)
        if best is None or iou > best[0]:
            best, radius = (iou, shape), r
    inner = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    shade = value[1:-1, 1:-1][inner] if inner.sum() >= MIN_PIXELS else value[ys, xs]  # edges blend with the ground
    texture = "striped" if (shade < 0.75 * np.percentile(shade, 90)).mean() > STRIPED else "solid"
    return Thing(color, best[1], "large" if radius * k > SIZE_CUT else "small", texture,
                 (_cell(ys.mean() * k + 0.5 * k), _cell(xs.mean() * k + 0.5 * k)))


def read_scene(image: torch.Tensor | np.ndarray) -> Scene:
    """A scene from one image ([3, H, W] in [0, 1] as every judge here takes, or [H, W, 3] uint8): its objects
    (largest first) and background."""
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    else:
        x = np.asarray(image, dtype=np.float64) / 255
    hue, saturation, value = _hsv(x)
    coloured = (saturation > 0.4) & (value > 0.15)
    names = list(HUES)
    distance = np.abs((hue[..., None] - np.array(list(HUES.values())) + 180) % 360 - 180)
    nearest = distance.argmin(-1)
    found = []
    for c, name in enumerate(names):
        for piece in _pieces(coloured & (nearest == c)):
            if len(piece) >= MIN_PIXELS:
                found.append((len(piece), _thing(piece, name, value, x.shape[0])))
    grey = value[~coloured].mean() if (~coloured).any() else 0.0
    things = tuple(t for _, t in sorted(found, key=lambda f: -f[0]))
    return Scene(things, "light" if grey > 0.5 else "dark")


def check_caption(said: Said, scene: Scene) -> dict[str, bool]:
    """Per attribute the caption names (``said.named()``): does the scene show it? The main object is the one that
    matches most of what the caption says of it (on a tie, the one of its shape, then of its colour); "two ..."
    needs exactly two objects of that colour and shape; the other object must be another one."""
    wants = {k: getattr(said, k) for k in ("shape", "color", "size", "texture", "place") if getattr(said, k)}
    have = lambda t, k: (t.place if k == "place" else getattr(t, k)) == wants[k]  # noqa: E731
    main = max(scene.things, key=lambda t: (sum(have(t, k) for k in wants), have(t, "shape"),
                                            "color" in wants and have(t, "color")), default=None)
    out = {k: main is not None and have(main, k) for k in wants}
    if said.count == 2:
        alike = [t for t in scene.things if t.shape == said.shape and (said.color is None or t.color == said.color)]
        out["count"] = len(alike) == 2
        for k in ("size", "texture"):  # said of both
            if k in wants:
                out[k] = len(alike) == 2 and all(getattr(t, k) == wants[k] for t in alike)
    if said.other:
        color, shape = said.other
        out["other"] = any(t is not main and t.shape == shape and (color is None or t.color == color)
                           for t in scene.things)
    if said.background:
        out["background"] = scene.background == said.background
    return out


def caption_accuracy(images: torch.Tensor, saids: list[Said]) -> dict[str, float]:
    """Per attribute, the share of images ([N, 3, H, W] in [0, 1]) that show it among those whose caption names it."""
    hits: dict[str, list[bool]] = {}
    for image, said in zip(images, saids):
        for k, ok in check_caption(said, read_scene(image)).items():
            hits.setdefault(k, []).append(ok)
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}
