"""Evolve a robust-trained UNet to a latency target (§3.1, Alg. 1) and compare it with a baseline.

    python evolve.py --checkpoint robust.safetensors --target 0.6 --out evolved.safetensors
    python evolve.py --checkpoint robust.safetensors --table-only --table lut.json --figure fig2.png   # §2.2, Fig. 2
    python evolve.py --checkpoint robust.safetensors --target 0.6 --baseline random --out random.safetensors
    python evolve.py --checkpoint robust-sd15.safetensors --data /data/captioned --clip ViT-g-14 \
        --clip-weights vit-g-14.bin --prompts-file captions_val2014.json --score-prompts 2000 \
        --table lut-this-device.json --target 0.5 --out evolved.safetensors                  # at SD scale

Alg. 1: alternate robust training (Eq. 5) with evolving steps. Each step scores every removal action by
dCLIP / dLatency -- CLIP score lost without the block on fixed validation prompts and seeds (the toy CLIP on toy
prompts; at SD scale any open_clip model on a prompt file, e.g. 2K MS-COCO captions), latency from the lookup table
measured on the device it runs on -- then, while the predicted latency is above the target, removes the lowest-value
blocks; once it is met, copies the highest-value ones while the target still holds. Every action is logged with its
numbers (<out>.log.json); the evolved spec is in the output checkpoint, loadable by sample.py, distill.py and
evaluate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..eval.coco import clip_scorer, read_prompt_file
from ..eval.metrics import open_clip_judge
from ..evolve import BASELINES, CRITERIA, TRAIN, EvolveConfig, Place, evolve_and_finetune
from ..formats.checkpoint import atomic_write
from ..formats.figures import pyplot
from ..latency import LatencyTable, build_table, fig2
from ..pipeline import Pipeline, pick_device, pick_dtype
from ..toy import BUNDLED
from ..toy.clip import load_toy_clip, toy_clip_scorer
from ..toy.tables import judge_on_heldout
from ..training import OPTIMIZERS, on_main, setup_distributed
from . import check_writable, defaults, flag, from_args, parser, run
from .presets import add_preset_flag, apply_preset


def build_parser():  # noqa: ANN201
    e = defaults(EvolveConfig)
    p = parser(__doc__)
    flag(p, "--checkpoint", required=True, more="a robust-trained one (train.py unet --keep-prob)")
    flag(p, "--out", more="the evolved checkpoint (required unless --table-only)")
    p.add_argument("--target", type=float, default=e.target, help="latency target, a fraction of the start's")
    p.add_argument("--table", help="latency lookup table JSON: read if it exists, completed and written back")
    p.add_argument("--table-only", action="store_true", help="build the lookup table (and --figure), then stop")
    p.add_argument("--figure", help="write the paper's Fig. 2 (latency and parameters per block) as a PNG")
    p.add_argument("--iterations", type=int, default=e.iterations, help="evolving steps at most")
    p.add_argument("--actions", type=int, default=e.actions, help="actions per evolving step")
    p.add_argument("--robust-steps", type=int, default=e.robust_steps, help="robust training steps (Eq. 5) "
                   "before each evolving step")
    p.add_argument("--finetune-steps", type=int, default=e.finetune_steps, help="fine-tuning of the final UNet")
    flag(p, "--keep-prob", e.keep_prob, "in the robust training")
    flag(p, "--lr", e.train.lr, "of robust training and fine-tuning")
    flag(p, "--batch-size", e.train.batch_size, "of robust training and fine-tuning")
    p.add_argument("--score-prompts", type=int, default=64, help="validation prompts of dCLIP")
    flag(p, "--data", "toy", "of robust training and fine-tuning")
    flag(p, "--optimizer", e.train.optimizer, "of robust training and fine-tuning", choices=OPTIMIZERS)
    flag(p, "--checkpointing", more="in robust training and fine-tuning")
    flag(p, "--amp", more="in robust training and fine-tuning")
    flag(p, "--accum", e.train.accum, "in robust training and fine-tuning")
    add_preset_flag(p)
    flag(p, "--no-ema", more="in robust training and fine-tuning")
    p.add_argument("--clip", default=str(BUNDLED / "clip.safetensors"),
                   help="the judge: a toy CLIP file, or with --clip-weights an open_clip model name")
    flag(p, "--clip-weights")
    flag(p, "--prompts-file", more="with --clip-weights: dCLIP on its first --score-prompts, the report on the "
         "next --num-prompts")
    flag(p, "--num-inference-steps", 10, "when scoring actions")
    flag(p, "--guidance", None, "when scoring (default: the checkpoint's)")
    flag(p, "--num-prompts", 300, "the final report's")
    p.add_argument("--baseline", choices=BASELINES, help="instead of Alg. 1: remove random blocks / blocks spread "
                   "evenly over the stages down to the same latency, then fine-tune for the evolved run's whole "
                   "budget (iterations x robust-steps + finetune-steps)")
    p.add_argument("--criterion", choices=CRITERIA, default=e.criterion, help="the order of removals: Alg. 1's "
                   "dCLIP / dLatency ('value') or, as an ablation, dCLIP alone")
    p.add_argument("--lut-batch", type=int, default=2, help="UNet batch of the lookup table (2: one CFG step)")
    p.add_argument("--threads", type=int, default=e.threads, help="CPU threads while timing (1: stable medians)")
    flag(p, "--seed", e.train.seed)
    flag(p, "--device", "auto", "where the table is timed, actions scored and the UNet trained (torchrun: one GPU "
         "per rank)")
    flag(p, "--dtype", "auto", "of the timing and scoring (training keeps float32 weights; --amp)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    apply_preset(args, sys.argv[1:] if argv is None else argv, p, "evolve")
    if not args.table_only and not args.out:
        p.error("--out is required unless --table-only")
    train = replace(TRAIN, lr=args.lr, batch_size=args.batch_size, seed=args.seed, optimizer=args.optimizer,
                    checkpointing=args.checkpointing, amp=args.amp, accum=args.accum,
                    ema_decay=None if args.no_ema else TRAIN.ema_decay)
    cfg = from_args(EvolveConfig, args, train=train)
    for path in (args.out, args.table, args.figure):
        if path:
            check_writable(path)
    if args.figure:
        pyplot()  # before any work: the figure needs matplotlib
    device = pick_device(args.device)
    where = Place(setup_distributed(device), pick_dtype(args.dtype, device))
    torch.manual_seed(args.seed)
    table = on_main(where.d, lambda: lookup_table(args, where))  # timed once, on rank 0's device
    if args.table_only:
        return
    score, evaluate = judges(args, where.d.device)
    log = evolve_and_finetune(args.checkpoint, table, cfg, score, evaluate, args.out, where)
    if not where.d.main:
        return
    print("\n| model | latency / step measured (predicted) | params | CLIP | FID | zero-shot (CLIP) | pixel judge |\n"
          "|---|---|---|---|---|---|---|")
    for r in log["rows"]:
        rest = [f"{r[k]:{f}}" if r[k] is not None else "-" for k, f in (("fid", ".2f"), ("zero_shot", ".0%"),
                                                                        ("judged", ".0%"))]
        print(f"| {r['name']} | {r['measured_ms']:.2f} ms ({r['predicted_ms']:.2f}) | {r['params'] / 1e6:.2f}M | "
              f"{r['clip']:.4f} | {' | '.join(rest)} |")
    start, final = log["rows"][0], log["rows"][-1]
    print(f"\nlatency ratio evolved / start (measured): {final['measured_ms'] / start['measured_ms']:.3f}; "
          f"CLIP change {final['clip'] - start['clip']:+.4f}\n{final['blocks']}")
    atomic_write(args.out + ".log.json", lambda tmp: Path(tmp).write_text(json.dumps(log, indent=1)))


def lookup_table(args: argparse.Namespace, where: Place) -> LatencyTable:
    """§2.2's table of the checkpoint's UNet on this device and dtype (read from --table if it has them), and Fig. 2."""
    pipe = where.load(args.checkpoint)
    context_len, latent = pipe.text_encoder.cfg.context_length, pipe.sampler.resolution // pipe.vae.cfg.factor
    table = build_table(pipe.unet, latent, args.lut_batch, context_len, args.table, args.threads)
    print(f"lookup table: {len(table.ms)} block configurations; predicted {table.predict(pipe.unet.spec):.2f} ms "
          f"per step, measured {next(reversed(table.measured_ms.values())):.2f} ms (batch {table.batch}, "
          f"{table.device} {table.dtype.removeprefix('torch.')})")
    if args.figure:
        fig2(pipe.unet, table, context_len, args.figure)
    return table  # the pipeline goes: evolving reads the checkpoint itself (3.4 GB a copy at SD-v1.5's size)


def judges(args: argparse.Namespace, device: torch.device) -> tuple[Callable[[Pipeline], float],
                                                                    Callable[[Pipeline], dict]]:
    """dCLIP's scorer and the report's judge: the toy CLIP on toy prompts, or an open_clip model on a prompt file."""
    if not args.clip_weights:
        clip = load_toy_clip(args.clip)
        judge = judge_on_heldout(clip, args.num_prompts)
        return (toy_clip_scorer(clip, args.score_prompts, args.num_inference_steps, args.guidance),
                lambda pipe: judge(pipe, None, None))

    if not args.prompts_file:
        raise ValueError("--clip-weights needs --prompts-file (the prompts dCLIP is measured on)")
    prompts = read_prompt_file(args.prompts_file, args.score_prompts + args.num_prompts, args.seed)
    judge = open_clip_judge(args.clip, args.clip_weights, device)
    score = clip_scorer(judge, prompts[:args.score_prompts], steps=args.num_inference_steps, guidance=args.guidance)
    report = clip_scorer(judge, prompts[args.score_prompts:], guidance=args.guidance)
    return score, lambda pipe: {"clip_score": report(pipe)}


def entry() -> None:
    """``python evolve.py``, ``snapfusion-evolve``, ``python -m snapfusion_min evolve``; a mistake is one line."""
    run(main)
