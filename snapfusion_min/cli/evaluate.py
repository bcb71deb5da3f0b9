"""Judge a toy-world checkpoint: generated vs real images of held-out prompts, by the toy CLIP.

    python evaluate.py                                   # the bundled toy model, its own steps and guidance
    python evaluate.py --checkpoint m.safetensors --num-inference-steps 8 --guidance 4 --num-prompts 500
    python evaluate.py --remove up2.A0 --remove mid.A0   # with blocks removed (identity, Eq. 5), as in Fig. 5
    python evaluate.py --checkpoint plain.safetensors --checkpoint robust.safetensors \\
        --ablate none --ablate down1.A0 --ablate mid.A0,up1.R1 --num-prompts 200   # Fig. 5 as a table
    python evaluate.py --decoder pruned0.safetensors --decoder pruned.safetensors   # Fig. 8: decoders compared
    python evaluate.py --checkpoint teacher.safetensors --checkpoint student8.safetensors \\
        --num-inference-steps 8 --num-inference-steps 16 --guidance 2 --guidance 4 --curve fid_clip.png   # Fig. 6

Prints per-attribute zero-shot accuracy (generated, and real images as the ceiling), CLIP score and FID
(toy-CLIP image features, generated vs real), and writes a grid of the first samples with their prompts.
"""

from __future__ import annotations

import dataclasses
import json

from torchvision.transforms.functional import to_pil_image

from .. import load_pipeline
from ..data import ToyWorld
from ..diffusion import SPACINGS
from ..evaluation import ablation_table, decoder_table, judge_on_heldout, remove_blocks, sweep_table
from ..recipe import TOY
from ..toyclip import load_toy_clip
from ..viz import caption_grid, pyplot
from . import check_writable, flag, parser, run


def build_parser():  # noqa: ANN201
    p = parser(__doc__)
    flag(p, "--checkpoint", more="repeat for several (default: the bundled toy model)", action="append")
    p.add_argument("--ablate", action="append", default=[],
                   help="table mode: one row per value, blocks (comma-separated) removed, or 'none'")
    p.add_argument("--clip", default=str(TOY / "clip.safetensors"), help="the judge: a toy CLIP")
    flag(p, "--num-prompts", 500)
    flag(p, "--num-inference-steps", more="default: the checkpoint's; repeat for a table over steps",
         action="append")
    flag(p, "--guidance", more="default: the checkpoint's; repeat for a table over guidance scales", action="append")
    p.add_argument("--curve", help="with a table over guidance: write the FID-vs-CLIP curves (Fig. 4, 6) here")
    p.add_argument("--remove", action="append", default=[], help="block address to run as identity, e.g. up2.A0")
    p.add_argument("--decoder", action="append", default=[],
                   help="table mode: decode the same latents with the (pruned) autoencoder of this checkpoint too")
    flag(p, "--spacing", more="of undistilled checkpoints (default: each one's own; students keep theirs)",
         choices=SPACINGS)
    flag(p, "--seed", 1234)
    p.add_argument("--grid", help="write a PNG grid of the first 16 samples here")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.num_prompts <= 0 or any(s <= 0 for s in args.num_inference_steps or []):
        raise ValueError("--num-prompts and --num-inference-steps must be positive")
    for path in (args.grid, args.curve):
        if path:
            check_writable(path)
    if args.curve:
        pyplot()  # before any work: the curve needs matplotlib
    names = args.checkpoint or [str(TOY / "model.safetensors")]
    pipes, clip = {name: load_pipeline(name) for name in names}, load_toy_clip(args.clip)
    for pipe in pipes.values():
        if args.spacing and not pipe.sampler.distilled:
            pipe.sampler = dataclasses.replace(pipe.sampler, spacing=args.spacing)
    judge = judge_on_heldout(clip, args.num_prompts, args.seed)
    steps, guidance = args.num_inference_steps, args.guidance
    if len(steps or []) > 1 or len(guidance or []) > 1:
        return sweep_table(pipes, steps, guidance, judge, args.curve)
    one = lambda pipe, s, g: judge(pipe, (steps or [s])[0], g if g is not None else (guidance or [None])[0])  # noqa: E731
    if args.ablate:
        return ablation_table(pipes, args.ablate, one)
    pipe = pipes[names[0]]
    if args.decoder:
        return decoder_table(pipe, clip, args.decoder, args.num_prompts, args.seed, (steps or [None])[0],
                             (guidance or [None])[0])
    remove_blocks(pipe, args.remove)
    r = one(pipe, None, None)
    images = r.pop("images")
    if args.grid:
        prompts = [ToyWorld("heldout", length=16, seed=args.seed).sample(i)[1].caption for i in range(16)]
        caption_grid([to_pil_image(x) for x in images[:16]], prompts, cols=8).save(args.grid)
    if args.json:
        print(json.dumps(r))
        return r
    print(f"{names[0]}: {r['steps']} steps, guidance {r['guidance']}, {r['n']} held-out prompts"
          + (f", removed {args.remove}" if args.remove else ""))
    print(f"{'':12s}" + "".join(f"{a:>11s}" for a in r["accuracy"]) + f"{'CLIP':>8s}{'FID':>8s}")
    for label, suffix, fid in (("generated", "", r["fid"]), ("real", "_real", 0.0), ("autoencoded", "_decoded", None)):
        print(f"{label:12s}" + "".join(f"{v:11.1%}" for v in r["accuracy" + suffix].values())
              + f"{r['clip_score' + suffix]:8.4f}" + ("" if fid is None else f"{fid:8.3f}"))
    return r


def entry() -> None:
    """``python evaluate.py``, ``snapfusion-evaluate``, ``python -m snapfusion_min evaluate``; a mistake is one line."""
    run(main)
