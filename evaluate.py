"""Judge a toy-world checkpoint: generated vs real images of held-out prompts, by the toy CLIP.

    python evaluate.py                                   # the bundled toy model, its own steps and guidance
    python evaluate.py --checkpoint m.safetensors --steps 8 --guidance 4 --n 500
    python evaluate.py --remove up2.A0 --remove mid.A0   # with blocks removed (identity, Eq. 5), as in Fig. 5
    python evaluate.py --checkpoint plain.safetensors --checkpoint robust.safetensors \
        --ablate none --ablate down1.A0 --ablate mid.A0,up1.R1 --n 200   # Fig. 5 as a table
    python evaluate.py --decoder pruned0.safetensors --decoder pruned.safetensors   # Fig. 8: decoders compared
    python evaluate.py --checkpoint teacher.safetensors --checkpoint student8.safetensors \
        --steps 8 --steps 16 --guidance 2 --guidance 4 --guidance 8 --curve fid_clip.png   # Fig. 6 as a table

Prints per-attribute zero-shot accuracy (generated, and real images as the ceiling), CLIP score and FID
(toy-CLIP image features, generated vs real), and writes a grid of the first samples with their prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", action="append", help="checkpoint(s) to judge (default: the bundled toy model)")
    p.add_argument("--ablate", action="append", default=[],
                   help="table mode: one row per value, blocks (comma-separated) removed, or 'none'")
    p.add_argument("--clip", default=str(ROOT / "models" / "toy" / "clip.safetensors"), help="the judge")
    p.add_argument("--n", type=int, default=500, help="held-out prompts (default: 500)")
    p.add_argument("--steps", type=int, action="append",
                   help="sampling steps (default: the checkpoint's); repeat for a table over steps")
    p.add_argument("--guidance", type=float, action="append",
                   help="CFG scale (default: the checkpoint's); repeat for a table over guidance scales")
    p.add_argument("--curve", help="with a table over guidance: write the FID-vs-CLIP curves (Fig. 4, 6) here")
    p.add_argument("--remove", action="append", default=[], help="block address to run as identity, e.g. up2.A0")
    p.add_argument("--decoder", action="append", default=[],
                   help="table mode: decode the same latents with the (pruned) autoencoder of this checkpoint too")
    p.add_argument("--spacing", choices=["leading", "trailing"],
                   help="timestep grid of undistilled checkpoints (default: each one's own; students keep theirs)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--grid", help="write a PNG grid of the first 16 samples here")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args(argv)
    if args.n <= 0:
        raise ValueError("--n must be positive")

    from snapfusion_min import load_pipeline
    from snapfusion_min.toyclip import evaluate_generation, load_toy_clip

    checkpoints = args.checkpoint or [str(ROOT / "models" / "toy" / "model.safetensors")]
    pipes, clip = [load_pipeline(c) for c in checkpoints], load_toy_clip(args.clip)
    for pipe in pipes:
        if args.spacing and not pipe.sampler.get("distilled"):
            pipe.sampler["spacing"] = args.spacing

    def judge(pipe, removed: list[str], steps: int | None = None, guidance: float | None = None) -> dict:  # noqa: ANN001
        unknown = set(removed) - set(pipe.unet.spec.addresses())
        if unknown:
            raise ValueError(f"unknown block address(es) {sorted(unknown)}; blocks are {pipe.unet.spec.addresses()}")
        pipe.unet.removed = set(removed)
        steps = steps or (args.steps or [None])[0]
        guidance = guidance if guidance is not None else (args.guidance or [None])[0]
        return evaluate_generation(pipe, clip, n=args.n, steps=steps, guidance=guidance, seed=args.seed)

    if any(s <= 0 for s in args.steps or []):
        raise ValueError("--steps must be positive")
    if len(args.steps or []) > 1 or len(args.guidance or []) > 1:
        return sweep_table(checkpoints, pipes, args, judge)
    if args.ablate:
        return ablation_table(checkpoints, pipes, args.ablate, judge)
    if args.decoder:
        return decoder_table(pipes[0], clip, args)
    r = judge(pipes[0], args.remove)
    args.checkpoint = checkpoints[0]
    images = r.pop("images")
    if args.grid:
        from torchvision.transforms.functional import to_pil_image

        from snapfusion_min.data import ToyWorld
        from snapfusion_min.viz import caption_grid

        prompts = [ToyWorld("heldout", length=16, seed=args.seed).sample(i)[1].caption for i in range(16)]
        caption_grid([to_pil_image(x) for x in images[:16]], prompts, cols=8).save(args.grid)
    if args.json:
        print(json.dumps(r))
        return r
    print(f"{args.checkpoint}: {r['steps']} steps, guidance {r['guidance']}, {r['n']} held-out prompts"
          + (f", removed {args.remove}" if args.remove else ""))
    print(f"{'':12s}" + "".join(f"{a:>11s}" for a in r["accuracy"]) + f"{'CLIP':>8s}{'FID':>8s}")
    print(f"{'generated':12s}" + "".join(f"{v:11.1%}" for v in r["accuracy"].values())
          + f"{r['clip_score']:8.4f}{r['fid']:8.3f}")
    print(f"{'real':12s}" + "".join(f"{v:11.1%}" for v in r["accuracy_real"].values())
          + f"{r['clip_score_real']:8.4f}{0.0:8.3f}")
    print(f"{'autoencoded':12s}" + "".join(f"{v:11.1%}" for v in r["accuracy_decoded"].values())
          + f"{r['clip_score_decoded']:8.4f}")
    return r


def sweep(configs: list[tuple], judge, curve: str | Path | None = None, title: str = "",  # noqa: ANN001
          first: str = "model") -> tuple[list[str], list[dict]]:
    """Markdown table over (label, pipeline, steps, guidance) configurations: CLIP score, FID, color / shape accuracy
    (Fig. 4, 6), rows printed as they come; with ``curve``, FID-vs-CLIP curves over guidance, one per (label, steps).

    ``judge(pipe, steps, guidance)`` returns what ``toyclip.evaluate_generation`` does. Returns the table's lines and
    one result per configuration, in order.
    """
    lines = [f"| {first} | steps | guidance | CLIP | FID | color | shape |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    results, curves = [], {}
    for label, pipe, steps, guidance in configs:
        r = judge(pipe, steps, guidance)
        r.pop("images", None)
        results.append(r)
        xs, ys = curves.setdefault(f"{label} ({steps} steps)", ([], []))
        xs.append(r["clip_score"])
        ys.append(r["fid"])
        lines.append(f"| {label} | {steps} | {guidance:g} | {r['clip_score']:.4f} | {r['fid']:.3f} | "
                     f"{r['accuracy']['color']:.0%} | {r['accuracy']['shape']:.0%} |")
        print(lines[-1], flush=True)
    if curve:
        from snapfusion_min.viz import line_plot

        line_plot(curves, title, "CLIP score (toy CLIP)", "FID (toy-CLIP features)", markers=True).save(curve)
    return lines, results


def sweep_table(names: list[str], pipes: list, args: argparse.Namespace, judge) -> dict:  # noqa: ANN001
    """Table over checkpoints x steps x guidance (see ``sweep``).

    A checkpoint whose default is fewer steps than a requested one (a distilled student) runs at its own steps only.
    """
    keys, configs = [], []
    for name, pipe in zip(names, pipes):
        own = pipe.sampler["steps"]
        for steps in sorted({s if s <= own or not pipe.sampler.get("distilled") else own
                             for s in (args.steps or [own])}):
            for guidance in args.guidance or [pipe.sampler["guidance"]]:
                keys.append((name, steps, guidance))
                configs.append((Path(name).stem, pipe, steps, guidance))
    title = f"FID vs CLIP score over guidance {', '.join(f'{g:g}' for g in args.guidance or [])}"
    _, results = sweep(configs, lambda pipe, steps, guidance: judge(pipe, [], steps, guidance), args.curve, title,
                       first="checkpoint")
    if args.curve:
        print(f"wrote {args.curve}")
    return dict(zip(keys, results))


def ablation_table(names: list[str], pipes: list, rows: list[str], judge) -> dict:  # noqa: ANN001
    """Markdown table: CLIP score and color / shape accuracy of generated images, per checkpoint and removed set."""
    results = {}
    header = "| removed | " + " | ".join(f"{Path(n).stem}: CLIP / color / shape" for n in names) + " |"
    print(header + "\n|" + "---|" * (len(names) + 1))
    for row in rows:
        removed = [] if row == "none" else row.split(",")
        cells = []
        for name, pipe in zip(names, pipes):
            r = judge(pipe, removed)
            r.pop("images")
            results[(name, row)] = r
            cells.append(f"{r['clip_score']:.4f} / {r['accuracy']['color']:.0%} / {r['accuracy']['shape']:.0%}")
        print(f"| {row} | " + " | ".join(cells) + " |", flush=True)
    return results


@torch.no_grad()
def decoder_table(pipe, clip, args: argparse.Namespace) -> dict:  # noqa: ANN001
    """The same generated latents decoded by the pipeline's decoder and by each --decoder (§3.2, Fig. 8): PSNR to
    the original decoder's images, CLIP score, FID to real images, color / shape accuracy."""
    from snapfusion_min import load_pipeline
    from snapfusion_min.metrics import clip_score, fid, zero_shot_accuracy
    from snapfusion_min.toyclip import real_heldout, toy_judge

    real, truth = real_heldout(args.n, args.seed)
    prompts = [c.caption for c in truth]
    steps = (args.steps or [pipe.sampler["steps"]])[0]
    guidance = pipe.sampler["guidance"] if args.guidance is None else args.guidance[0]
    latents = []
    for i in range(0, args.n, 100):
        batch = prompts[i:i + 100]
        z = pipe.initial_latents(len(batch), 64, 64, args.seed + i)
        latents.append(pipe.denoise(z, pipe.encode_prompts(batch), pipe.encode_prompts([""] * len(batch)), steps,
                                    guidance, pipe.sampler["spacing"]))
    latents = torch.cat(latents)
    judge = toy_judge(clip)
    real_features = judge.image_features(real, normalize=False)
    original, results = pipe.decode(latents).cpu(), {}
    print("| decoder | widths | params | PSNR to original (dB) | CLIP | FID | color | shape |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ["original"] + args.decoder:
        if name != "original":
            other = load_pipeline(name)
            pipe.set_decoder(other.vae, other.latent_scale)
        images = pipe.decode(latents).cpu()
        psnr = 10 * torch.log10(1 / ((images - original) ** 2).mean().clamp_min(1e-12)).item()
        acc = zero_shot_accuracy(judge, images, truth)
        r = {"psnr": psnr, "clip": clip_score(judge, images, prompts), "color": acc["color"], "shape": acc["shape"],
             "fid": fid(judge.image_features(images, normalize=False), real_features),
             "params": sum(p.numel() for p in pipe.vae.decoder.parameters())}
        results[name] = r
        psnr_text = "-" if name == "original" else f"{psnr:.2f}"
        print(f"| {Path(name).name} | {pipe.vae.cfg.decoder_channels} | {r['params'] / 1e6:.3f}M | {psnr_text} | "
              f"{r['clip']:.4f} | {r['fid']:.3f} | {r['color']:.0%} | {r['shape']:.0%} |", flush=True)
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"evaluate.py: error: {e}")
