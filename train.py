"""Train: the toy CLIP, the toy autoencoder, and the UNet (v-prediction, robust training of Eq. 5) on any data.

    python train.py clip --out models/toy/clip.safetensors
    python train.py autoencoder --out models/toy/autoencoder.safetensors
    python train.py unet --arch tiny --clip models/toy/clip.safetensors \
        --autoencoder models/toy/autoencoder.safetensors --out models/toy/model.safetensors
    python train.py unet --init model.safetensors --keep-prob 0.9 --out robust.safetensors   # robust training
    python train.py decoder --init model.safetensors --ratio 0.5 --out pruned.safetensors    # §3.2 decoder
    torchrun --nproc_per_node 2 train.py unet ...                                            # DDP (gloo / NCCL)

The UNet stage writes a checkpoint loadable by sample.py, distill.py and evolve.py; a resumable training state is
kept next to it (<out>.state.pt, atomic writes every --save-every steps) and --resume continues exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from snapfusion_min import diffusion as D
from snapfusion_min.arch import ArchSpec, preset
from snapfusion_min.checkpoint import read_meta, save_checkpoint
from snapfusion_min.pipeline import Pipeline, load_pipeline, pick_device
from snapfusion_min.training import (
    EMA,
    Dist,
    average_gradients,
    batch_at,
    broadcast_parameters,
    check_ranks_agree,
    lr_at,
    make_dataset,
    resume,
    save_progress,
    seed_step,
    setup_distributed,
)
from snapfusion_min.unet import UNet
from snapfusion_min.vae import VAE, VAEConfig

TOY_VAE = VAEConfig(channels=(16, 32, 64, 64), decoder_channels=(64, 64, 32, 16), layers=1, groups=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output .safetensors file")
    common.add_argument("--steps", type=int, help="optimizer steps")
    common.add_argument("--batch-size", type=int, help="global batch size (split over DDP ranks)")
    common.add_argument("--lr", type=float, help="peak learning rate (AdamW, weight decay 0.01 as §5)")
    common.add_argument("--seed", type=int, default=0, help="same seed, same run (default: 0)")
    common.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, mps")
    common.add_argument("--data", default="toy", help="'toy' (the toy world) or a folder of captioned images")
    common.add_argument("--skip-bad", action="store_true", help="leave out images without caption or unreadable")
    sub.add_parser("clip", parents=[common], help="the toy CLIP (judge and text encoder of the toy world)")
    ae = sub.add_parser("autoencoder", parents=[common], help="a toy KL autoencoder with f = 8")
    ae.add_argument("--kl", type=float, default=1e-6, help="KL weight, as SD's VAE (default: 1e-6)")
    ae.add_argument("--object-weight", type=float,
                    help="extra loss weight of pixels unlike the image border (default: 8 on toy data, 0 on a folder)")
    ae.add_argument("--crop", type=int, help="train on crops of this side around the object, a multiple of 8 "
                    "(default: 40 on toy data, 0 = whole images on a folder)")
    ae.add_argument("--edge-weight", type=float, default=1.0,
                    help="weight of the L1 loss on image gradients, which keeps edges sharp (default: 1)")
    u = sub.add_parser("unet", parents=[common], help="the denoising UNet (Eq. 6), with robust training (Eq. 5)")
    u.add_argument("--arch", default="tiny", help="preset (sd15, snapfusion, tiny) or a spec .json (default: tiny)")
    u.add_argument("--init", help="start from this checkpoint (ours / SD): UNet, autoencoder, text encoder")
    u.add_argument("--clip", help="toy CLIP .safetensors: its text tower is the frozen text encoder")
    u.add_argument("--autoencoder", help="autoencoder .safetensors (from the autoencoder stage)")
    u.add_argument("--prediction", choices=["v", "eps"], default="v",
                   help="v-prediction (Eq. 6, default; fine-tunes an eps --init to v) or eps (Eq. 1)")
    u.add_argument("--keep-prob", type=float, default=1.0, help="p of Eq. 5: each block runs with probability p")
    u.add_argument("--cfg-dropout", type=float, default=0.1, help="caption dropped to '' with this probability")
    u.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights (default: 0.999)")
    u.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    u.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    u.add_argument("--save-every", type=int, default=500, help="write checkpoint + resumable state every N steps")
    u.add_argument("--resume", action="store_true", help="continue from <out>.state.pt exactly")
    u.add_argument("--stop-after", type=int, help="run at most N steps in this invocation, save, exit (then --resume)")
    u.add_argument("--sample-steps", type=int, default=20, help="DDIM steps saved as the checkpoint's default")
    u.add_argument("--guidance", type=float, default=2.0,
                   help="CFG scale saved as the checkpoint's default (2: best CLIP score and FID on the toy world)")
    dec = sub.add_parser("decoder", parents=[common], help="prune the VAE decoder and distill it (§3.2, App. B.2)")
    dec.add_argument("--init", required=True, help="the teacher pipeline checkpoint (its UNet makes the latents)")
    dec.add_argument("--ratio", type=float, default=0.5, help="fraction r of channels kept per layer (default: 0.5)")
    dec.add_argument("--latents", type=int, default=2048, help="synthetic latents in the pool (default: 2048)")
    dec.add_argument("--teacher-steps", type=int, default=50, help="DDIM steps making each latent (paper: 50)")
    dec.add_argument("--guidance", type=float, help="CFG scale for the latents (default: the checkpoint's)")
    dec.add_argument("--latent-cache", help="where the synthetic latents are cached (default: <out>.latents.pt)")
    dec.add_argument("--object-weight", type=float,
                     help="extra loss weight of pixels unlike the image border, with the autoencoder's L1 and edge "
                     "terms (default: 8 on toy data; 0 on a folder = the paper's plain MSE)")
    return p.parse_args(argv)


# ---- stage: toy CLIP --------------------------------------------------------------------------------------------
def train_clip(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from snapfusion_min.checkpoint import atomic_write
    from snapfusion_min.toyclip import evaluate_toy_clip, train_toy_clip

    model = train_toy_clip(steps=args.steps or 1000, batch=args.batch_size or 128, lr=args.lr or 2e-3, seed=args.seed)
    accuracy = evaluate_toy_clip(model)
    meta = {"snapfusion_min_toy_clip": json.dumps({"zero_shot_accuracy_heldout": accuracy, "argv": args.argv})}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(args.out, lambda tmp: save_file(state, tmp, metadata=meta))
    print("zero-shot accuracy on held-out real toy images: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))


# ---- stage: autoencoder -----------------------------------------------------------------------------------------
def object_weights(x: torch.Tensor, boost: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, H, W]: 1 + boost where a pixel differs from its image's border colour.

    Our stand-in for LDM's perceptual loss (no LPIPS weights offline): a toy object covers 4-15% of the pixels, so a
    plain mean lets the autoencoder trade the object's colour and corners for a cleaner background.
    """
    if boost == 0:
        return torch.ones_like(x[:, :1])
    return 1 + boost * object_mask(x).float()


def object_boost(args: argparse.Namespace) -> float:
    """``--object-weight``, defaulting to 8 on toy data and 0 (no weighting) on a folder of real images."""
    return args.object_weight if args.object_weight is not None else 8.0 * (args.data == "toy")


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W]: True where a pixel differs from its image's border colour (the median of the border)."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # [B, C, 4W]
    background = border.median(dim=-1).values[..., None, None]
    return (x - background).abs().amax(dim=1, keepdim=True) > 0.1


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """Object-weighted MSE + L1 on pixels, plus L1 on the error's image gradients (keeps edges sharp)."""
    err = rec - x
    edges = ((weight[..., 1:] * (err[..., 1:] - err[..., :-1]).abs()).mean()
             + (weight[..., 1:, :] * (err[..., 1:, :] - err[..., :-1, :]).abs()).mean())
    return (weight * (err**2 + err.abs())).mean() + edge_weight * edges


def crop_objects(x: torch.Tensor, size: int, factor: int) -> torch.Tensor:
    """size x size crops around each image's object, at a random offset of up to one latent cell, on the latent grid.

    A toy object covers 4-15% of the image: full images spend most of the autoencoder's compute on flat background.
    The autoencoder is convolutional, so it learns the same maps from crops, about 4x more object views per second.
    """
    h, w = x.shape[-2:]
    crops = []
    for image, mask in zip(x, object_mask(x)[:, 0]):
        ys, xs = mask.nonzero(as_tuple=True)
        cy, cx = (ys.float().mean().item(), xs.float().mean().item()) if len(ys) else (h / 2, w / 2)
        jitter = torch.randint(-1, 2, (2,)).tolist()
        top = min(max(0, factor * (round((cy - size / 2) / factor) + jitter[0])), h - size)
        left = min(max(0, factor * (round((cx - size / 2) / factor) + jitter[1])), w - size)
        crops.append(image[:, top:top + size, left:left + size])
    return torch.stack(crops)


def train_autoencoder(args: argparse.Namespace, d: Dist) -> None:
    """A KL autoencoder (LDM's, without the GAN / LPIPS terms): MSE + L1 reconstruction + small KL."""
    seed_step(args.seed, -1)
    vae = VAE(TOY_VAE).to(d.device)
    with torch.no_grad():  # a narrow posterior from the start (std e^-3): a wide one teaches the decoder to blur
        vae.encoder.quant_conv.bias[TOY_VAE.latent_channels:] = -6.0
    broadcast_parameters(vae, d)
    steps, batch, lr = args.steps or 3000, args.batch_size or 32, args.lr or 2e-3
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.01, fused=True)
    data = make_dataset(args.data, 64, args.seed, args.skip_bad)
    for step in tqdm(range(steps), desc="autoencoder", disable=not d.main):
        seed_step(args.seed, step, d.rank)
        x, _ = batch_at(data, step, batch, d, args.seed)
        crop = args.crop if args.crop is not None else 40 * (args.data == "toy")
        x = (crop_objects(x, crop, TOY_VAE.factor) if crop else x).to(d.device)
        mean, logvar = vae.encoder(x).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar.clamp(-30, 20))
        rec = vae.decode(z)
        weight = object_weights(x, object_boost(args))
        # LDM weighs the per-image KL against the per-image *sum* of reconstruction errors; ours are pixel means,
        # so the KL is divided by the pixel count too (else the posterior stays wide and the decoder learns blur)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean() / x[0].numel()
        loss = reconstruction_loss(rec, x, weight, args.edge_weight) + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(vae, d)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, 100, steps)
        opt.step()
    with torch.no_grad():  # SD's 0.18215 plays this role: scale latents to unit variance for the UNet
        x, _ = batch_at(data, steps, 256, Dist(device=d.device), args.seed + 1)
        scale = 1.0 / vae.encode(x.to(d.device)).std().item()
    if d.main:
        save_checkpoint(args.out, {"vae": vae}, {"vae": TOY_VAE.__dict__, "latent_scale": scale})
        print(f"latent scale {scale:.4f}; wrote {args.out}")


# ---- stage: UNet ------------------------------------------------------------------------------------------------
def build_pipeline(args: argparse.Namespace) -> Pipeline:
    """The model to train: --init, or a fresh UNet of --arch with the toy CLIP's text tower and the autoencoder."""
    if args.init:
        return load_pipeline(args.init)
    if not (args.clip and args.autoencoder):
        raise ValueError("a fresh UNet needs --clip and --autoencoder (or start from --init)")
    from safetensors.torch import load_file

    from snapfusion_min.toyclip import build_toy_clip, text_encoder_from_clip

    clip = build_toy_clip()
    clip.load_state_dict(load_file(args.clip))
    text_encoder = text_encoder_from_clip(clip)
    meta = read_meta(args.autoencoder) or {}
    ae = load_pipeline_part(args.autoencoder, meta)
    spec = ArchSpec.from_json(Path(args.arch).read_text()) if args.arch.endswith(".json") else preset(args.arch)
    if spec.context_dim != text_encoder.cfg.width:
        spec = ArchSpec.from_json({**json.loads(spec.to_json()), "context_dim": text_encoder.cfg.width})
    return Pipeline(UNet(spec), ae, text_encoder, args.prediction, meta["latent_scale"], args.out,
                    {"steps": args.sample_steps, "guidance": args.guidance, "resolution": 64})


def load_pipeline_part(path: str, meta: dict) -> VAE:
    from snapfusion_min.checkpoint import read_state_dict
    from snapfusion_min.weights import apply_map

    if "vae" not in meta:
        raise ValueError(f"{path}: not an autoencoder checkpoint from this script")
    vae = VAE(VAEConfig(**meta["vae"]))
    state = {k[4:]: v for k, v in read_state_dict(path).items() if k.startswith("vae.")}
    apply_map(vae, state, lambda k: [k], f"{path}: vae")
    return vae.eval().requires_grad_(False)


def v_loss(pipe: Pipeline, x0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Eq. 6 (or Eq. 1 for eps): || net(t, z_t, c) - target ||^2 with t ~ U{0..999}, z_t = alpha_t x + sigma_t eps."""
    t = torch.randint(0, D.TRAIN_STEPS, (x0.shape[0],), device=x0.device)
    alpha, sigma = pipe.schedule.alpha_sigma(t)
    eps = torch.randn_like(x0)
    z = D.noisy(x=x0, eps=eps, alpha=alpha, sigma=sigma)
    target = D.v_target(x=x0, eps=eps, alpha=alpha, sigma=sigma) if pipe.prediction == "v" else eps
    return F.mse_loss(pipe.unet(z, t, context).float(), target.float())


def train_unet(args: argparse.Namespace, d: Dist) -> None:
    seed_step(args.seed, -1)
    pipe = build_pipeline(args)
    pipe.prediction = args.prediction
    pipe.to(d.device)
    unet, state_path = pipe.unet.train(), Path(args.out + ".state.pt")
    unet.keep_prob = args.keep_prob
    steps, batch, lr = args.steps or 3500, args.batch_size or 32, args.lr or 1e-3
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01, fused=True)
    ema, start, losses = EMA(unet, args.ema), 0, []
    tag = unet.spec.to_json()
    if args.resume:
        start, losses = resume(state_path, unet, opt, ema, tag)
    broadcast_parameters(unet, d)
    data = make_dataset(args.data, 64 if args.data == "toy" else 8 * 64, args.seed, args.skip_bad)
    with torch.no_grad():
        empty = pipe.encode_prompts([""])
    end = steps if args.stop_after is None else min(steps, start + args.stop_after)
    for step in tqdm(range(start, end), desc="unet", disable=not d.main, initial=start, total=steps):
        seed_step(args.seed, step, d.rank)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(args.accum):
            x, captions = batch_at(data, step * args.accum + micro, batch // args.accum, d, args.seed)
            with torch.no_grad():
                x0 = pipe.vae.encode(x.to(d.device)) * pipe.latent_scale
                context = pipe.encode_prompts(captions)
                drop = torch.rand(len(captions), device=d.device) < args.cfg_dropout  # for CFG at sampling
                context = torch.where(drop[:, None, None], empty, context)
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=args.amp):
                loss = v_loss(pipe, x0, context) / args.accum
            loss.backward()
            total += loss.item()
        if not torch.isfinite(torch.tensor(total)):
            raise FloatingPointError(f"loss is {total} at step {step}; the last good checkpoint is {args.out}")
        average_gradients(unet, d)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, min(200, steps // 10), steps)
        opt.step()
        ema.update(unet, step)
        losses.append(total)
        if d.main and ((step + 1) % args.save_every == 0 or step + 1 == end):
            save_progress(args.out, unet, opt, ema, step + 1, losses, tag, pipe, "training loss (Eq. 6)")
    check_ranks_agree(unet, d)
    if d.main:
        recent = losses[-100:]
        print(f"wrote {args.out} (EMA weights) at step {end} of {steps}; loss {sum(recent) / len(recent):.4f}")


# ---- stage: decoder (§3.2, App. B.2) -----------------------------------------------------------------------------
@torch.no_grad()
def synthetic_latents(pipe: Pipeline, args: argparse.Namespace, d: Dist) -> torch.Tensor:
    """The distillation data: prompts -> the teacher UNet's DDIM output, fresh noise each (no images needed).

    Cached in <out>.latents.pt, the expensive part; a cache made with other settings is remade.
    """
    cache = Path(args.latent_cache or args.out + ".latents.pt")
    tag = [args.init, args.latents, args.teacher_steps, args.guidance, args.seed, args.data]
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu")
        if saved["tag"] == tag:
            return saved["latents"]
    data = make_dataset(args.data, 64 if args.data == "toy" else 8 * 64, args.seed, args.skip_bad)
    guidance = pipe.sampler["guidance"] if args.guidance is None else args.guidance
    res, chunk, out = pipe.sampler["resolution"], 64, []
    for i in tqdm(range(0, args.latents, chunk), desc="teacher latents", disable=not d.main):
        n = min(chunk, args.latents - i)
        prompts = [data[(i + k) % len(data)][1] for k in range(n)]
        z = pipe.initial_latents(n, res, res, seed=10**6 * (args.seed + 1) + i)
        context, uncond = pipe.encode_prompts(prompts), pipe.encode_prompts([""] * n)
        out.append(pipe.denoise(z, context, uncond, args.teacher_steps, guidance, pipe.sampler["spacing"]).cpu())
    latents = torch.cat(out)
    if d.main:
        from snapfusion_min.checkpoint import atomic_write

        atomic_write(str(cache), lambda tmp: torch.save({"tag": tag, "latents": latents}, tmp))
    return latents


def train_decoder(args: argparse.Namespace, d: Dist) -> None:
    """Data distillation (App. B.2): the pruned decoder learns the original decoder's images of synthetic latents.

    The paper's loss is the MSE between the two images (``--object-weight 0``, the default on a folder). On toy data
    the autoencoder stage's loss is used instead: an object covers 4-15% of the image, and a plain mean lets the
    small decoder trade the object's colour for a cleaner background.
    """
    from snapfusion_min.prune import prune_decoder

    seed_step(args.seed, -1)
    pipe = load_pipeline(args.init).to(d.device)
    student = prune_decoder(pipe.vae, args.ratio)
    latents = synthetic_latents(pipe, args, d) / pipe.latent_scale
    teacher, decoder = pipe.vae.decoder.eval(), student.decoder.train().requires_grad_(True)
    broadcast_parameters(decoder, d)
    steps = 1000 if args.steps is None else args.steps  # 0: pruned only, the lower reference of §3.2
    batch, lr = args.batch_size or 16, args.lr or 1e-3
    boost = object_boost(args)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.01, fused=True)
    # the latent-image pairs of App. B.2: the teacher's images made once when they fit in 1 GiB, else at each step
    cfg, images = pipe.vae.cfg, None
    if steps and latents.numel() // cfg.latent_channels * cfg.image_channels * cfg.factor**2 * 4 <= 2**30:  # fp32
        with torch.no_grad():
            images = torch.cat([teacher(latents[i:i + 64].to(d.device)) for i in range(0, len(latents), 64)])
    losses = []
    for step in tqdm(range(steps), desc="decoder", disable=not d.main):
        seed_step(args.seed, step, d.rank)
        pick = torch.randint(0, len(latents), (batch // d.world,))
        z = latents[pick].to(d.device)
        with torch.no_grad():
            target = teacher(z) if images is None else images[pick]
        if boost:  # the toy stand-in for a perceptual loss, as in the autoencoder stage
            loss = reconstruction_loss(decoder(z), target, object_weights(target, boost), 1.0)
        else:  # App. B.2: the mean squared error between the two images
            loss = F.mse_loss(decoder(z), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}")
        average_gradients(decoder, d)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, 50, steps)
        opt.step()
        losses.append(loss.item())
    if d.main:
        Pipeline(pipe.unet, student.eval(), pipe.text_encoder, pipe.prediction, pipe.latent_scale, args.out,
                 pipe.sampler).save(args.out)
        recent = losses[-100:]
        fit = (f"loss to the teacher decoder's images {sum(recent) / len(recent):.5f}" if recent
               else "pruned only, not distilled")
        print(f"wrote {args.out}: decoder widths {student.cfg.decoder_channels} (from {pipe.vae.cfg.decoder_channels})"
              f"; {fit}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # recorded in the toy CLIP's metadata
    d = setup_distributed(pick_device(args.device))
    if args.stage == "clip":
        train_clip(args)
    elif args.stage == "autoencoder":
        train_autoencoder(args, d)
    elif args.stage == "decoder":
        train_decoder(args, d)
    else:
        train_unet(args, d)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:  # a user's mistake or a diverged run: one line
        sys.exit(f"train.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
