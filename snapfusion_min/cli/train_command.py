"""Train: the toy CLIP, the toy autoencoder, the UNet (v-prediction, robust training of Eq. 5), the pruned decoder.

    python train.py clip --out models/toy/clip.safetensors
    python train.py autoencoder --out models/toy/autoencoder.safetensors
    python train.py unet --arch tiny --clip models/toy/clip.safetensors \\
        --autoencoder models/toy/autoencoder.safetensors --out models/toy/model.safetensors
    python train.py unet --init model.safetensors --keep-prob 0.9 --out robust.safetensors   # robust training
    python train.py decoder --init model.safetensors --ratio 0.5 --out pruned.safetensors    # §3.2 decoder
    torchrun --nproc_per_node 2 train.py unet ...                                            # DDP (gloo / NCCL)

Every stage writes its checkpoint atomically every --save-every steps, with a resumable state next to it
(<out>.state.pt); --resume continues exactly. The stage's settings are saved in the checkpoint's metadata.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from .. import decoder_distill, unet_training
from ..pipeline import pick_device
from ..toy import autoencoder
from ..toy.clip import ClipConfig, train_clip_stage
from ..toy.teacher import fresh_pipeline
from ..training import OPTIMIZERS, TrainConfig, setup_distributed
from . import HelpFormatter, check_writable, defaults, flag, from_args, parser, run
from .presets import add_preset_flag, apply_preset, subcommand


def build_parser():  # noqa: ANN201
    p = parser(__doc__)
    sub = p.add_subparsers(dest="stage", required=True)
    clip = stage(sub, "clip", "the toy CLIP (judge and text encoder of the toy world)")
    c = defaults(ClipConfig)
    for name, default in (("--out", None), ("--train-steps", c.train_steps), ("--batch-size", c.batch_size),
                          ("--lr", c.lr), ("--seed", c.seed)):
        flag(clip, name, default, required=name == "--out")
    ae = stage(sub, "autoencoder", "a toy KL autoencoder with f = 4 (or 8)")
    common(ae, autoencoder.TRAIN)
    a = defaults(autoencoder.AutoencoderConfig)
    ae.add_argument("--kl", type=float, default=a.kl, help="KL weight, as SD's VAE")
    ae.add_argument("--factor", type=int, choices=(4, 8), default=a.factor,
                    help="downsampling factor f: 4 (a 16x16x4 latent for a 64x64 image: the toy world's) "
                    "or 8 (SD's, 8x8x4)")
    ae.add_argument("--object-weight", type=float,
                    help="extra loss weight of pixels unlike the image border (default: 8 on toy data, 0 on a folder)")
    ae.add_argument("--crop", type=int, help="train on crops of this side around the object, a multiple of the factor "
                    "(default: 40 on toy data, 0 = whole images on a folder)")
    ae.add_argument("--edge-weight", type=float, default=a.edge_weight, help="L1 loss on image gradients (edges)")
    u = stage(sub, "unet", "the denoising UNet (Eq. 6), with robust training (Eq. 5)")
    common(u, unet_training.TRAIN, ema=True)
    d = defaults(unet_training.UNetConfig)
    u.add_argument("--arch", default=d.arch,
                   help="preset (sd15, snapfusion, tiny, toy: the toy world's) or a spec .json")
    u.add_argument("--init", help="start from this checkpoint (ours / SD): UNet, autoencoder, text encoder")
    u.add_argument("--clip", help="toy CLIP .safetensors: its text tower is the frozen text encoder")
    u.add_argument("--autoencoder", help="autoencoder .safetensors (from the autoencoder stage)")
    u.add_argument("--prediction", choices=["v", "eps"], default=d.prediction,
                   help="v-prediction (Eq. 6; fine-tunes an eps --init to v) or eps (Eq. 1)")
    flag(u, "--keep-prob", d.keep_prob)
    u.add_argument("--resolution", type=int, help="training image side, saved as the checkpoint's (default: 64 on toy "
                   "data, else --init's)")
    u.add_argument("--cfg-dropout", type=float, default=d.cfg_dropout, help="caption dropped to '' with this "
                   "probability (for CFG at sampling)")
    flag(u, "--num-inference-steps", d.sampler.steps, "saved as a fresh checkpoint's default")
    flag(u, "--guidance", d.sampler.guidance, "saved as a fresh checkpoint's default (3: the toy world's best CLIP)")
    dec = stage(sub, "decoder", "prune the VAE decoder and distill it (§3.2, App. B.2)")
    common(dec, decoder_distill.TRAIN)
    k = defaults(decoder_distill.DecoderConfig)
    dec.add_argument("--init", required=True, help="the teacher pipeline checkpoint (its UNet makes the latents)")
    dec.add_argument("--ratio", type=float, default=k.ratio, help="fraction r of channels kept per layer")
    dec.add_argument("--latents", type=int, default=k.latents, help="synthetic latents in the pool")
    dec.add_argument("--teacher-steps", type=int, default=k.teacher_steps, help="DDIM steps making each latent "
                     "(the paper: 50)")
    flag(dec, "--guidance", None, "of the synthetic latents (default: the checkpoint's)")
    dec.add_argument("--latent-cache", help="where the synthetic latents are cached (default: <out>.latents.pt)")
    dec.add_argument("--object-weight", type=float, help="extra loss weight of pixels unlike the image border "
                     "(default: 8 on toy data; 0 on a folder = the paper's plain MSE); --train-steps 0: prune only")
    return p


def stage(sub, name: str, text: str):  # noqa: ANN001, ANN201
    return sub.add_parser(name, formatter_class=HelpFormatter, help=text, description=text)


def common(p, t: TrainConfig, ema: bool = False) -> None:  # noqa: ANN001
    """The flags of the one training loop, with this stage's defaults."""
    flag(p, "--out", required=True)
    add_preset_flag(p)
    for name, default in (("--train-steps", t.train_steps), ("--batch-size", t.batch_size), ("--lr", t.lr),
                          ("--seed", t.seed), ("--device", "auto"), ("--data", "toy"), ("--skip-bad", None),
                          ("--workers", 0), ("--save-every", t.save_every), ("--resume", None),
                          ("--overwrite", None), ("--stop-after", None)):
        flag(p, name, default)
    p.add_argument("--warmup", type=int, help=f"linear warm-up steps (default: {t.warmup}" +
                   (", at most 10%% of --train-steps)" if ema else ")"))
    flag(p, "--accum", t.accum)
    flag(p, "--optimizer", t.optimizer, choices=OPTIMIZERS)
    flag(p, "--no-state")
    flag(p, "--amp")
    if ema:  # the UNet stage
        flag(p, "--ema-decay", t.ema_decay)
        flag(p, "--no-ema")
        flag(p, "--checkpointing")


def train_config(args, t: TrainConfig) -> TrainConfig:  # noqa: ANN001
    warmup = args.warmup if args.warmup is not None else (
        unet_training.warmup_for(args.train_steps) if args.stage == "unet" else t.warmup)
    ema = None if getattr(args, "no_ema", False) else getattr(args, "ema_decay", None)
    return from_args(TrainConfig, args, warmup=warmup, ema_decay=ema, save_state=not args.no_state)


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    if args.stage != "clip":
        apply_preset(args, sys.argv[1:] if argv is None else argv, subcommand(p, args.stage), args.stage)
    check_writable(args.out)
    if args.stage == "clip":
        return train_clip_stage(from_args(ClipConfig, args), args.out)
    d = setup_distributed(pick_device(args.device))
    if args.stage == "autoencoder":
        cfg = from_args(autoencoder.AutoencoderConfig, args, train=train_config(args, autoencoder.TRAIN))
        autoencoder.train_autoencoder(cfg, args.out, d)
    elif args.stage == "decoder":
        cfg = from_args(decoder_distill.DecoderConfig, args, train=train_config(args, decoder_distill.TRAIN))
        decoder_distill.distill_decoder(args.init, cfg, args.out, d)
    else:
        sampler = replace(unet_training.TOY_SAMPLER, steps=args.num_inference_steps, guidance=args.guidance)
        cfg = from_args(unet_training.UNetConfig, args, sampler=sampler, train=train_config(args, unet_training.TRAIN))
        unet_training.train_unet(cfg, args.out, d, fresh=fresh_pipeline)


def entry() -> None:
    """``python train.py``, ``snapfusion-train``, ``python -m snapfusion_min train``; a mistake is one line."""
    run(main)
