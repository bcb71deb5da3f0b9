"""Figures with PIL only: image grids with captions, and simple line plots (loss curves, FID-vs-CLIP curves)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def caption_grid(images: Sequence[Image.Image], captions: Sequence[str], cols: int = 4, scale: int = 2,
                 width_chars: int = 26) -> Image.Image:
    """Images in a grid, each enlarged ``scale`` times (nearest) with its caption wrapped underneath."""
    font = ImageFont.load_default()
    w, h = images[0].width * scale, images[0].height * scale
    lines = [textwrap.wrap(c, width_chars) for c in captions]
    text_h = 12 * max(len(x) for x in lines) + 6
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * (w + 8) + 8, rows * (h + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, text) in enumerate(zip(images, lines)):
        x, y = 8 + (i % cols) * (w + 8), 8 + (i // cols) * (h + text_h + 8)
        grid.paste(image.resize((w, h), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(text):
            draw.text((x, y + h + 3 + 12 * j), line, fill="black", font=font)
    return grid


def line_plot(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str = "", xlabel: str = "",
              ylabel: str = "", size: tuple[int, int] = (640, 420), markers: bool = False) -> Image.Image:
    """Named (x, y) series on shared axes, with a legend; enough for a loss curve or an FID-vs-CLIP plot."""
    font = ImageFont.load_default()
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, size[0] - 20, 44, size[1] - 45
    xs = [x for sx, _ in series.values() for x in sx]
    ys = [y for _, sy in series.values() for y in sy]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline="black")
    for k in range(5):
        fx, fy = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        draw.text((px(fx, y0)[0] - 12, bottom + 4), f"{fx:.3g}", fill="black", font=font)
        draw.text((4, px(x0, fy)[1] - 6), f"{fy:.3g}", fill="black", font=font)
    draw.text((left, 6), title, fill="black", font=font)
    draw.text(((left + right) // 2 - 3 * len(xlabel), size[1] - 18), xlabel, fill="black", font=font)
    draw.text((4, 26), ylabel, fill="black", font=font)
    for i, (name, (sx, sy)) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        points = [px(x, y) for x, y in zip(sx, sy)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        if markers or len(points) == 1:
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((right - 150, top + 6 + 14 * i), f"- {name}", fill=color, font=font)
    return image


def bar_chart(series: dict[str, Sequence[float]], labels: Sequence[str], title: str = "",
              size: tuple[int, int] | None = None) -> Image.Image:
    """One panel of vertical bars per named series over shared labels (the paper's Fig. 2: latency, params)."""
    font = ImageFont.load_default()
    n = len(labels)
    width = size[0] if size else max(640, 70 + 22 * n)
    panel = 170
    image = Image.new("RGB", (width, size[1] if size else 40 + panel * len(series) + 80), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title, fill="black", font=font)
    left, right = 60, width - 10
    step = (right - left) / max(1, n)
    for k, (name, values) in enumerate(series.items()):
        top, bottom = 30 + k * panel + 14, 30 + (k + 1) * panel - 6
        top_value = max(values) or 1.0
        draw.text((4, top - 14), name, fill="black", font=font)
        draw.text((4, top), f"{top_value:.3g}", fill="black", font=font)
        draw.line([left, bottom, right, bottom], fill="black")
        for i, v in enumerate(values):
            x0 = left + i * step + 2
            y0 = bottom - (bottom - top) * v / top_value
            color = PALETTE[0] if "A" in labels[i].split(".")[-1] else PALETTE[1]
            draw.rectangle([x0, y0, x0 + step - 4, bottom], fill=color)
    base = 30 + len(series) * panel
    for i, label in enumerate(labels):  # vertical labels: draw on a strip and rotate
        strip = Image.new("RGB", (72, 12), "white")
        ImageDraw.Draw(strip).text((0, 0), label, fill="black", font=font)
        image.paste(strip.rotate(90, expand=True), (int(left + i * step + step / 2 - 6), base))
    return image
