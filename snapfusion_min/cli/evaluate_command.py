"""Judge checkpoints: one sub-command per measurement. The toy world's are judged by the toy CLIP on held-out prompts
(generated vs real images); ``coco`` is §5's protocol at SD scale.

    python evaluate.py                                   # = heldout: the bundled toy model, its own settings
    python evaluate.py heldout --checkpoint m.safetensors --num-inference-steps 8 --guidance 4 --num-prompts 500
    python evaluate.py heldout --remove up2.A0 --remove mid.A0   # with blocks removed (identity, Eq. 5), as in Fig. 5
    python evaluate.py sweep --checkpoint teacher.safetensors --checkpoint student8.safetensors \
        --num-inference-steps 8 --num-inference-steps 16 --guidance 2 --guidance 4 --curve fid_clip.png   # Fig. 4, 6
    python evaluate.py ablate --checkpoint plain.safetensors --checkpoint robust.safetensors \
        --ablate none --ablate down1.A0 --ablate mid.A0,up1.R1 --num-prompts 200   # Fig. 5 as a table
    python evaluate.py decoders --decoder pruned0.safetensors --decoder pruned.safetensors   # Fig. 8

``heldout`` prints per-attribute accuracy by both judges (the pixel judge, the toy CLIP's zero-shot; generated, and
real images as the ceiling), CLIP score and FID (toy-CLIP image features, generated vs real), and can write a grid of
the first samples with their prompts.

At SD scale (§5's protocol; see docs/sd_scale.md), ``coco`` generates one image per prompt into --images-dir
(resumable; shards over `torchrun --nproc_per_node N` ranks), then scores CLIP with any open_clip model and FID on
Inception features (torch-fidelity) against real images or their .npz statistics (``reference`` writes those):

    python evaluate.py reference --fid-reference val2014/ --inception-weights W.pth --save-reference coco-256.npz
    python evaluate.py coco --checkpoint ours-8.safetensors --prompts-file captions_val2014.json --num-prompts 30000 \
        --images-dir gen/ours-8 --clip ViT-g-14 --clip-weights vit-g-14.bin \
        --inception-weights weights-inception-2015-12-05-6726825d.pth --fid-reference coco-256.npz \
        --guidance 2 --guidance 4 --guidance 7 --curve fid_clip.png        # Table 2 / Fig. 4 over guidance
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch
from torchvision.transforms.functional import to_pil_image

from .. import load_pipeline
from ..diffusion import SOLVERS, SPACINGS
from ..eval.coco import (
    check_reference,
    generate_folder,
    read_prompt_file,
    reference_statistics,
    score_folder,
    subfolder,
)
from ..eval.metrics import inception, open_clip_judge, save_statistics
from ..formats.figures import caption_grid, fid_clip_plot, pyplot
from ..pipeline import pick_device, pick_dtype
from ..toy import BUNDLED
from ..toy.clip import load_toy_clip, toy_judge
from ..toy.tables import ablation_table, decoder_table, judge_on_heldout, remove_blocks, sweep_table
from ..training import setup_distributed
from ..world import World
from . import HelpFormatter, check_writable, flag, parser, run

MODES = {"heldout": "one checkpoint on held-out toy prompts: accuracy per attribute, CLIP score, FID",
         "sweep": "a table (and Fig. 4 / 6's curves) over steps and guidance of one or more checkpoints",
         "ablate": "Fig. 5 as a table: blocks removed (identity, Eq. 5) from one or more checkpoints",
         "decoders": "Fig. 8 as a table: the same latents decoded by other (pruned) autoencoders",
         "coco": "§5's protocol: prompts -> a generated folder -> CLIP score (open_clip) and FID (Inception)",
         "reference": "FID's statistics of a folder of real images, saved as .npz for coco's --fid-reference"}


def build_parser():  # noqa: ANN201
    p = parser(__doc__)
    sub = p.add_subparsers(dest="mode", required=True, metavar="{" + ",".join(MODES) + "}")
    m = {name: sub.add_parser(name, formatter_class=HelpFormatter, help=text, description=text)
         for name, text in MODES.items()}
    for name in ("heldout", "sweep", "ablate", "decoders", "coco"):
        g = m[name]
        flag(g, "--checkpoint", more="repeat for several (default: the bundled toy model)", action="append")
        g.add_argument("--clip", default=str(BUNDLED / "clip.safetensors"), help="the judge: a toy CLIP file" + (
            ", or with --clip-weights an open_clip model name" if name == "coco" else ""))
        flag(g, "--num-prompts", 500)
        flag(g, "--num-inference-steps", more="default: the checkpoint's" + (
            "; repeat for a table over steps" if name in ("sweep", "coco") else ""), action="append")
        flag(g, "--guidance", more="default: the checkpoint's" + (
            "; repeat for a table over guidance scales" if name in ("sweep", "coco") else ""), action="append")
        flag(g, "--spacing", more="of undistilled checkpoints (default: each one's own; students keep theirs)",
             choices=SPACINGS)
        flag(g, "--solver", more="of undistilled checkpoints (default: each one's own, else ddim; students keep "
             "theirs)", choices=SOLVERS)
        flag(g, "--seed", 1234)
        flag(g, "--device", "auto")
        flag(g, "--dtype", "auto", "of generation")
        g.add_argument("--json", action="store_true", help="print the numbers as JSON")
    for name in ("sweep", "coco"):
        m[name].add_argument("--curve", help="write the FID-vs-CLIP curves over guidance (Fig. 4, 6) here")
    flag(m["heldout"], "--remove", [], action="append")
    m["heldout"].add_argument("--grid", help="write a PNG grid of the first 16 samples here")
    m["ablate"].add_argument("--ablate", action="append", required=True,
                             help="one row per value: blocks (comma-separated) removed, or 'none'")
    m["decoders"].add_argument("--decoder", action="append", required=True,
                               help="decode the same latents with the (pruned) autoencoder of this checkpoint too")
    c = m["coco"]
    flag(c, "--prompts-file", required=True)
    c.add_argument("--images-dir", required=True, help="where the generated images go (one subfolder per steps / "
                   "guidance setting); an unfinished one is resumed")
    flag(c, "--clip-weights")
    flag(c, "--batch-size", 8, "of generation")
    for g in (c, m["reference"]):
        g.add_argument("--inception-weights", required=g is not c, help="FID's Inception-v3 weights file "
                       "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
        g.add_argument("--fid-reference", required=g is not c,
                       help="a folder of real images" + (", or their statistics (.npz)" if g is c else ""))
        g.add_argument("--fid-size", type=int, default=256, help="images are resized to this for FID (0: as they are)")
    flag(m["reference"], "--device", "auto")
    m["reference"].add_argument("--save-reference", required=True, help="write the folder's statistics to this .npz")
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["heldout", *argv]  # the default mode: `python evaluate.py` judges the bundled toy model
    args = build_parser().parse_args(argv)
    if hasattr(args, "dtype"):
        pick_dtype(args.dtype, pick_device(args.device))  # a wrong name is refused before any work
    if args.mode == "reference":
        return reference(args)
    if args.mode == "coco":
        return coco(args)
    return toy(args)


def toy(args: argparse.Namespace) -> dict:
    """heldout, sweep, ablate, decoders: the toy CLIP judges generated vs real images of held-out prompts."""
    if args.num_prompts <= 0 or any(s <= 0 for s in args.num_inference_steps or []):
        raise ValueError("--num-prompts and --num-inference-steps must be positive")
    for path in (getattr(args, "grid", None), getattr(args, "curve", None)):
        if path:
            check_writable(path)
    if getattr(args, "curve", None):
        pyplot()  # before any work: the curve needs matplotlib
    names = args.checkpoint or [str(BUNDLED / "model.safetensors")]
    pipes = {name: load_pipeline(name, device=args.device, dtype=args.dtype) for name in names}
    clip = load_toy_clip(args.clip)
    for pipe in pipes.values():
        own_sampler(pipe, args)
    judge = judge_on_heldout(clip, args.num_prompts, args.seed)
    steps, guidance = args.num_inference_steps, args.guidance
    if args.mode == "sweep":
        return sweep_table(pipes, steps, guidance, judge, args.curve)
    one = lambda pipe, s, g: judge(pipe, (steps or [s])[0], g if g is not None else (guidance or [None])[0])  # noqa: E731
    if args.mode == "ablate":
        return ablation_table(pipes, args.ablate, one)
    pipe = pipes[names[0]]
    if args.mode == "decoders":
        return decoder_table(pipe, clip, args.decoder, args.num_prompts, args.seed, (steps or [None])[0],
                             (guidance or [None])[0])
    remove_blocks(pipe, args.remove)
    r = one(pipe, None, None)
    images = r.pop("images")
    if args.grid:
        prompts = [World("heldout", length=16, seed=args.seed).sample(i)[1].caption for i in range(16)]
        caption_grid([to_pil_image(x) for x in images[:16]], prompts, cols=8).save(args.grid)
    if args.json:
        print(json.dumps(r))
        return r
    print(f"{names[0]}: {r['steps']} steps, guidance {r['guidance']}, {r['n']} held-out prompts"
          + (f", removed {args.remove}" if args.remove else ""))
    attributes = list(r["judged"])
    print(f"{'':24s}" + "".join(f"{a:>11s}" for a in attributes) + f"{'CLIP':>8s}{'FID':>8s}")
    for label, suffix, fid in (("generated", "", r["fid"]), ("real", "_real", 0.0), ("autoencoded", "_decoded", None)):
        for judge, key in (("pixel judge", "judged"), ("zero-shot", "accuracy")):
            acc = r[key + suffix]
            print(f"{label + ', ' + judge:24s}" + "".join(f"{acc.get(a, float('nan')):11.1%}" for a in attributes)
                  + f"{r['clip_score' + suffix]:8.4f}" + ("" if fid is None else f"{fid:8.3f}"))
    return r


def own_sampler(pipe, args: argparse.Namespace) -> None:  # noqa: ANN001
    """--spacing and --solver apply to undistilled checkpoints: a student keeps the grid and solver it learned."""
    if not pipe.sampler.distilled:
        change = {k: v for k, v in (("spacing", args.spacing), ("solver", args.solver)) if v}
        pipe.sampler = dataclasses.replace(pipe.sampler, **change)


def reference(args: argparse.Namespace) -> dict:
    """FID's statistics (Inception-v3 features' mean and covariance) of a folder of real images -> .npz."""
    check_writable(args.save_reference)
    checked = check_reference(args.fid_reference)
    net = inception(args.inception_weights, pick_device(args.device))
    save_statistics(args.save_reference, reference_statistics(checked, net, args.fid_size or None))
    print(f"wrote {args.save_reference}")
    return {}


def check_coco(args: argparse.Namespace) -> dict | list[Path] | None:
    """Every refusal of ``coco`` before any work; returns the checked FID reference (``check_reference``), if any."""
    if bool(args.fid_reference) != bool(args.inception_weights):
        raise ValueError("FID needs both --fid-reference and --inception-weights")
    if args.curve and not args.inception_weights:
        raise ValueError("--curve plots FID against CLIP score: it needs --inception-weights and --fid-reference")
    check_writable(args.images_dir, folder=True)
    if args.curve:
        check_writable(args.curve)
        pyplot()  # the curve needs matplotlib
    return check_reference(args.fid_reference) if args.fid_reference else None


def coco(args: argparse.Namespace) -> dict:
    """§5's protocol on any checkpoint (``eval.coco``): a generated folder per steps / guidance, then its scores."""
    checked = check_coco(args)
    size = args.fid_size or None
    d = setup_distributed(pick_device(args.device))
    net = inception(args.inception_weights, d.device) if args.inception_weights else None
    ref = reference_statistics(checked, net, size) if net else None
    prompts = read_prompt_file(args.prompts_file, args.num_prompts, args.seed)
    judge = (open_clip_judge(args.clip, args.clip_weights, d.device) if args.clip_weights
             else toy_judge(load_toy_clip(args.clip).to(d.device)))
    names = args.checkpoint or [str(BUNDLED / "model.safetensors")]
    results, curves = {}, {}
    if d.main:
        print("| checkpoint | steps | guidance | CLIP | FID | images |\n|---|---|---|---|---|---|")
    for name in names:
        pipe = load_pipeline(name, device=str(d.device), dtype=args.dtype)
        own_sampler(pipe, args)
        for steps, g in itertools.product(args.num_inference_steps or [pipe.sampler.steps],
                                          args.guidance or [pipe.sampler.guidance]):
            folder = Path(args.images_dir) / (Path(name).stem if len(names) > 1 else "") / subfolder(steps, g)
            generate_folder(pipe, prompts, folder, steps=steps, guidance=g, seed=args.seed, batch=args.batch_size,
                            rank=d.rank, world=d.world)
            if d.world > 1:
                torch.distributed.barrier()
            if not d.main:
                continue
            r = score_folder(folder, prompts, judge=judge, inception=net, reference=ref, fid_size=size)
            results[f"{Path(name).stem} {steps} steps w={g:g}"] = r
            curves.setdefault(f"{Path(name).stem} ({steps} steps)", []).append(
                (r["clip_score"], r.get("fid", float("nan")), g))
            fid = f"{r['fid']:.2f}" if "fid" in r else "-"
            print(f"| {Path(name).stem} | {steps} | {g:g} | {r['clip_score']:.4f} | {fid} | {folder} |", flush=True)
    if d.main and args.curve:
        fid_clip_plot(curves, args.curve, "FID vs CLIP score over guidance", f"CLIP score ({args.clip.split('/')[-1]})",
                      "FID (Inception, lower is better)")
    if d.main and args.json:
        print(json.dumps(results))
    return results


def entry() -> None:
    """``python evaluate.py``, ``snapfusion-evaluate``, ``python -m snapfusion_min evaluate``; a mistake is one line."""
    run(main)
