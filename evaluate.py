"""Judge a toy-world checkpoint: generated vs real images of held-out prompts, by the toy CLIP.

    python evaluate.py                                   # the bundled toy model, its own steps and guidance
    python evaluate.py --checkpoint m.safetensors --steps 8 --guidance 4 --n 500
    python evaluate.py --remove up2.A0 --remove mid.A0   # with blocks removed (identity, Eq. 5), as in Fig. 5
    python evaluate.py --checkpoint plain.safetensors --checkpoint robust.safetensors \
        --ablate none --ablate down1.A0 --ablate mid.A0,up1.R1 --n 200   # Fig. 5 as a table

Prints per-attribute zero-shot accuracy (generated, and real images as the ceiling), CLIP score and FID
(toy-CLIP image features, generated vs real), and writes a grid of the first samples with their prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", action="append", help="checkpoint(s) to judge (default: the bundled toy model)")
    p.add_argument("--ablate", action="append", default=[],
                   help="table mode: one row per value, blocks (comma-separated) removed, or 'none'")
    p.add_argument("--clip", default=str(ROOT / "models" / "toy" / "clip.safetensors"), help="the judge")
    p.add_argument("--n", type=int, default=500, help="held-out prompts (default: 500)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the checkpoint's)")
    p.add_argument("--remove", action="append", default=[], help="block address to run as identity, e.g. up2.A0")
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

    def judge(pipe, removed: list[str]) -> dict:  # noqa: ANN001
        unknown = set(removed) - set(pipe.unet.spec.addresses())
        if unknown:
            raise ValueError(f"unknown block address(es) {sorted(unknown)}; blocks are {pipe.unet.spec.addresses()}")
        pipe.unet.removed = set(removed)
        return evaluate_generation(pipe, clip, n=args.n, steps=args.steps, guidance=args.guidance, seed=args.seed)

    if args.ablate:
        return ablation_table(checkpoints, pipes, args.ablate, judge)
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
    return r


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


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"evaluate.py: error: {e}")
