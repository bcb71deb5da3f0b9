"""Figures: image grids with captions (PIL), and plots drawn with matplotlib (the ``plots`` extra): FID-vs-CLIP curves
over guidance (Fig. 4, 6), CLIP and FID over steps (Fig. 4, right), per-block latency and parameters (Fig. 2),
training loss. Each plot is written as PNG and SVG side by side, in the Okabe-Ito colours (told apart with
colour-blindness, and by marker shape too).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .checkpoint import atomic_write

OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
OFFSETS = [(6, 4), (6, -11), (-30, 4), (-30, -11), (6, 13), (-30, 13)]  # label of a point, by series: less overlap


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


def pyplot() -> Any:  # noqa: ANN401
    """matplotlib.pyplot without a display (Agg), or a one-line error naming the extra that installs it."""
    try:
        import matplotlib  # optional (the 'plots' extra): sampling and training run without it
    except ModuleNotFoundError:
        raise ImportError("figures need matplotlib: pip install 'snapfusion-min[plots]' (or pip install "
                          "matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use('Agg'): no display needed

    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "svg.hashsalt": "snapfusion-min",
                         "svg.fonttype": "none"})
    return plt


def save(fig: Any, path: str | Path) -> None:  # noqa: ANN401
    """``path`` (.png, 150 dpi) and the same name with .svg."""
    plt = pyplot()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight"))
    atomic_write(path.with_suffix(".svg"), lambda tmp: fig.savefig(tmp, format="svg", bbox_inches="tight",
                                                                    metadata={"Date": None}))
    plt.close(fig)


def fid_clip_plot(curves: dict[str, list[tuple[float, float, float]]], path: str | Path, title: str = "",
                  clip_label: str = "CLIP score", fid_label: str = "FID") -> None:
    """Fig. 4 / 6: one line per model through its (CLIP score, FID) points, each point labelled with its guidance w.

    ``curves``: label -> [(clip score, fid, guidance), ...]; points are joined in order of guidance. Lower right is
    better (higher CLIP score, lower FID). With a dozen points or more a second panel zooms into the best 40% by CLIP
    score, where the models crowd.
    """
    plt = pyplot()
    points = [p for ps in curves.values() for p in ps]
    clips = sorted(p[0] for p in points)
    zoom = len(points) >= 12
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(14 if zoom else 8, 5.5), squeeze=False)
    for ax in axes[0]:
        for i, ps in enumerate(curves.values()):
            ps = sorted(ps, key=lambda p: p[2])
            color = OKABE_ITO[i % len(OKABE_ITO)]
            ax.plot([p[0] for p in ps], [p[1] for p in ps], marker=MARKERS[i % len(MARKERS)], color=color,
                    linewidth=1.5, markersize=6)
            for x, y, w in ps:
                ax.annotate(f"w={w:g}", (x, y), textcoords="offset points", xytext=OFFSETS[i % len(OFFSETS)],
                            fontsize=8, color=color, annotation_clip=True)
        ax.set_xlabel(clip_label)
        ax.set_ylabel(fid_label)
    axes[0][0].set_title(title)
    if zoom:
        lo = clips[int(0.6 * len(clips))]
        near = [p for p in points if p[0] >= lo]
        (x0, x1), (y0, y1) = ((min(v), max(v)) for v in zip(*[(p[0], p[1]) for p in near]))
        pad_x, pad_y = 0.12 * (x1 - x0 or 1e-3), 0.12 * (y1 - y0 or 1e-3)
        axes[0][1].set_xlim(x0 - pad_x, x1 + pad_x)
        axes[0][1].set_ylim(y0 - pad_y, y1 + pad_y)
        axes[0][1].set_title(f"zoom: CLIP score >= {lo:.3g}")
    handles = [plt.Line2D([], [], color=OKABE_ITO[i % len(OKABE_ITO)], marker=MARKERS[i % len(MARKERS)])
               for i in range(len(curves))]
    fig.legend(handles, list(curves), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncols=min(3, len(curves)),
               frameon=False)
    save(fig, path)


def steps_plot(curves: dict[str, list[tuple[int, float, float]]], path: str | Path, title: str = "") -> None:
    """Fig. 4 (right) over steps: CLIP score and FID (log scale) against sampling steps (log scale), one line per
    series; ``curves``: label -> [(steps, clip score, fid), ...]. Ticks at the measured step counts."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = sorted({p[0] for ps in curves.values() for p in ps})
    for i, (label, ps) in enumerate(curves.items()):
        ps = sorted(ps)
        style = {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)], "label": label}
        axes[0].plot([p[0] for p in ps], [p[1] for p in ps], **style)
        axes[1].plot([p[0] for p in ps], [p[2] for p in ps], **style)
    for ax, ylabel in zip(axes, ("CLIP score (toy CLIP; higher is better)", "FID on toy-CLIP features (lower is "
                                                                            "better)")):
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(n) for n in steps])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(ylabel)
        ax.legend(frameon=False)
    axes[1].set_yscale("log")
    fig.suptitle(title)
    save(fig, path)


def arms_plot(arms: dict[str, dict], path: str | Path, title: str = "") -> None:
    """Quality against measured latency per step: CLIP score and FID, one small marker per seed and the seeds' mean
    with its 95% interval, drawn as it is even where it does not hold the mean; ``arms``: label -> {"ms", "clip",
    "fid": per seed, "clip_ci", "fid_ci": (mean, lo, hi)}."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (label, a) in enumerate(arms.items()):
        style = {"color": OKABE_ITO[i % len(OKABE_ITO)], "marker": MARKERS[i % len(MARKERS)]}
        x = sum(a["ms"]) / len(a["ms"])
        for ax, key in zip(axes, ("clip", "fid")):
            ax.scatter(a["ms"], a[key], alpha=0.35, s=18, **style)
            mean, lo, hi = a[f"{key}_ci"]  # a bootstrap interval need not hold its estimate (FID's lies above it)
            ax.errorbar([x], [(lo + hi) / 2], yerr=(hi - lo) / 2, fmt="none", capsize=4, color=style["color"])
            ax.plot([x], [mean], markersize=7, linestyle="none", label=label, **style)
    for ax, ylabel in zip(axes, ("CLIP score (toy CLIP; higher is better)", "FID on toy-CLIP features (lower is "
                                                                            "better)")):
        ax.set_xlabel("latency per sampling step, ms (measured, CPU, batch 2)")
        ax.set_ylabel(ylabel)
    axes[0].legend(frameon=False, fontsize=8)
    fig.suptitle(title)
    save(fig, path)


def loss_plot(steps: Sequence[float], losses: Sequence[float], path: str | Path, title: str = "training loss",
              ylabel: str = "loss (running mean)") -> None:
    """A training loss curve over optimizer steps."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(steps, losses, color=OKABE_ITO[0], linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xlim(left=0)
    save(fig, path)


def block_bars(blocks: Sequence[str], latency_ms: Sequence[float], params_m: Sequence[float], path: str | Path,
               title: str = "") -> None:
    """Fig. 2: latency (ms) and parameters (M) per block, cross-attention blocks (A) and ResNet blocks (R) told
    apart by colour, one panel each, blocks in network order."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.28 * len(blocks) + 1.5), 6), sharex=True)
    kinds = ["A" if b.split(".")[-1].startswith("A") else "R" for b in blocks]
    colors = [OKABE_ITO[0] if k == "A" else OKABE_ITO[1] for k in kinds]
    for ax, values, label in ((axes[0], latency_ms, "latency (ms)"), (axes[1], params_m, "parameters (M)")):
        ax.bar(range(len(blocks)), values, color=colors)
        ax.set_ylabel(label)
        ax.grid(axis="x", visible=False)
    axes[1].set_xticks(range(len(blocks)), blocks, rotation=90, fontsize=8)
    axes[1].set_xlabel("block (stage.block)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=OKABE_ITO[0]), plt.Rectangle((0, 0), 1, 1, color=OKABE_ITO[1])]
    axes[0].legend(handles, ["cross-attention (A)", "ResNet (R)"], loc="upper left", bbox_to_anchor=(1.0, 1.0),
                   frameon=False)
    axes[0].set_title(title)
    save(fig, path)
