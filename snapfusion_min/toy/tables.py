"""Judging toy-world pipelines on held-out prompts (§5's protocol at toy scale): tables of CLIP score, FID and both
judges' accuracy on what the captions name (the toy CLIP's zero-shot, the pixel judge's reading; each the mean over
attributes) over checkpoints, steps and guidance (Table 2, Fig. 4, 6), over removed blocks (Fig. 5), and over decoders
on the same latents (Fig. 8). ``evaluate.py`` and the recipe's report print these tables.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from open_clip.model import CustomTextCLIP

from ..eval.metrics import fid, psnr
from ..formats.figures import fid_clip_plot
from ..pipeline import Pipeline, read_pipeline
from .clip import TOY_IMAGE, Heldout, evaluate_generation, toy_judge

Judge = Callable[[Pipeline, int | None, float | None], dict]  # (pipeline, steps, guidance) -> evaluate_generation


def mean(accuracy: dict[str, float]) -> float:
    """A per-attribute accuracy's mean over the attributes (what a table's one column shows)."""
    return sum(accuracy.values()) / len(accuracy)


def judge_on_heldout(clip: CustomTextCLIP, n: int, seed: int = 1234, progress: bool = True) -> Judge:
    """``evaluate_generation`` on ``n`` held-out prompts, steps and guidance given (None: the pipeline's own), with a
    progress bar of the images generated."""
    heldout = Heldout(clip, n, seed)  # the real images' scores, worked out for the first row and kept
    return lambda pipe, steps, guidance: evaluate_generation(pipe, clip, n=n, steps=steps, guidance=guidance,
                                                             seed=seed, progress=progress, heldout=heldout)


def remove_blocks(pipe: Pipeline, removed: Sequence[str]) -> None:
    """Run these blocks as the identity (Eq. 5 at inference, Fig. 5); unknown addresses are an error."""
    unknown = set(removed) - set(pipe.unet.spec.addresses())
    if unknown:
        raise ValueError(f"unknown block address(es) {sorted(unknown)}; blocks are {pipe.unet.spec.addresses()}")
    pipe.unet.removed = set(removed)


def sweep(configs: list[tuple[str, Pipeline, int, float]], judge: Judge, curve: str | Path | None = None,
          title: str = "", first: str = "model") -> tuple[list[str], list[dict]]:
    """Markdown table over (label, pipeline, steps, guidance): CLIP score, FID, both judges (Fig. 4, 6),
    rows printed as they come; with ``curve``, FID-vs-CLIP curves over guidance, one per (label, steps).

    Returns the table's lines and one result per configuration, in order.
    """
    lines = [f"| {first} | steps | guidance | CLIP | FID | zero-shot (CLIP) | pixel judge |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    results, curves = [], {}
    several = len({c[2] for c in configs}) > 1  # step counts differ: a curve's name says its steps
    for label, pipe, steps, guidance in configs:
        r = judge(pipe, steps, guidance)
        r.pop("images", None)
        results.append(r)
        named = re.search(rf"\b{steps}[- ]step", label) is not None
        name = label if named or not several else f"{label} ({steps} steps)"
        curves.setdefault(name, []).append((r["clip_score"], r["fid"], guidance))
        lines.append(f"| {label} | {steps} | {guidance:g} | {r['clip_score']:.4f} | {r['fid']:.3f} | "
                     f"{mean(r['accuracy']):.0%} | {mean(r['judged']):.0%} |")
        print(lines[-1], flush=True)
    if curve:
        fid_clip_plot(curves, curve, title, "CLIP score (toy CLIP; higher is better)",
                      "FID on toy-CLIP features (lower is better)")
    return lines, results


def sweep_table(pipes: dict[str, Pipeline], steps: list[int] | None, guidance: list[float] | None, judge: Judge,
                curve: str | None = None) -> dict:
    """Table over checkpoints x steps x guidance (see ``sweep``); None: each checkpoint's own.

    A distilled student asked for more steps than its own runs at its own steps only.
    """
    keys, configs = [], []
    for name, pipe in pipes.items():
        own = pipe.sampler.steps
        for s in sorted({s if s <= own or not pipe.sampler.distilled else own for s in (steps or [own])}):
            for g in guidance or [pipe.sampler.guidance]:
                keys.append((name, s, g))
                configs.append((Path(name).stem, pipe, s, g))
    title = f"FID vs CLIP score over guidance {', '.join(f'{g:g}' for g in guidance or [])}"
    _, results = sweep(configs, judge, curve, title, first="checkpoint")
    return dict(zip(keys, results))


def ablation_table(pipes: dict[str, Pipeline], rows: list[str], judge: Judge) -> dict:
    """Markdown table (Fig. 5): CLIP score and both judges per checkpoint and removed set of blocks."""
    results = {}
    header = "| removed | " + " | ".join(f"{Path(n).stem}: CLIP / zero-shot / pixel judge" for n in pipes) + " |"
    print(header + "\n|" + "---|" * (len(pipes) + 1))
    for removed in rows:
        cells = []
        for name, pipe in pipes.items():
            remove_blocks(pipe, [] if removed == "none" else removed.split(","))
            r = judge(pipe, None, None)
            r.pop("images")
            results[(name, removed)] = r
            cells.append(f"{r['clip_score']:.4f} / {mean(r['accuracy']):.0%} / {mean(r['judged']):.0%}")
        print(f"| {removed} | " + " | ".join(cells) + " |", flush=True)
    return results


@torch.no_grad()
def decoder_table(pipe: Pipeline, clip: CustomTextCLIP, decoders: list[str], n: int, seed: int = 1234,
                  steps: int | None = None, guidance: float | None = None) -> dict:
    """The same generated latents decoded by the pipeline's decoder and by each of ``decoders`` (§3.2, Fig. 8): PSNR
    to the original decoder's images, CLIP score, FID to real images, both judges."""
    heldout = Heldout(clip, n, seed)
    prompts = heldout.prompts
    steps = pipe.sampler.steps if steps is None else steps
    guidance = pipe.sampler.guidance if guidance is None else guidance
    latents = []
    for i in range(0, n, 100):
        batch = prompts[i:i + 100]
        z = pipe.initial_latents(len(batch), TOY_IMAGE, TOY_IMAGE, seed + i)
        latents.append(pipe.denoise(z, pipe.encode_prompts(batch), pipe.encode_prompts([""] * len(batch)), steps,
                                    guidance, pipe.sampler.spacing, solver=pipe.sampler.solver))
    latents = torch.cat(latents)
    judge = toy_judge(clip)
    real_features = judge.image_features(heldout.images, normalize=False)
    original, results = pipe.decode(latents).cpu(), {}
    print("| decoder | widths | params | PSNR to original (dB) | CLIP | FID | zero-shot (CLIP) | pixel judge |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ["original", *decoders]:
        if name != "original":
            other = read_pipeline(name)
            pipe.set_decoder(other.vae, other.latent_scale)
        images = pipe.decode(latents).cpu()
        scores = heldout.scores(images)
        r = {"psnr": psnr(images, original), "clip": scores["clip_score"], "zero_shot": mean(scores["accuracy"]),
             "judged": mean(scores["judged"]), "fid": fid(judge.image_features(images, normalize=False), real_features),
             "params": sum(p.numel() for p in pipe.vae.decoder.parameters())}
        results[name] = r
        psnr_text = "-" if name == "original" else f"{r['psnr']:.2f}"
        print(f"| {Path(name).name} | {pipe.vae.cfg.decoder_channels} | {r['params'] / 1e6:.3f}M | {psnr_text} | "
              f"{r['clip']:.4f} | {r['fid']:.3f} | {r['zero_shot']:.0%} | {r['judged']:.0%} |", flush=True)
    return results
