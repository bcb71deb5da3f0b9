"""Data distillation of the pruned image decoder (§3.2, App. B.2): the 50%-pruned decoder (``prune.py``) learns the
original decoder's images of synthetic latents -- the teacher UNet's DDIM outputs for text prompts, so no images are
needed. The paper's loss is the MSE between the two images; on toy data the autoencoder's object-weighted loss is
used instead (``reconstruction_loss``, the toy autoencoder's too: a toy object covers 4-15% of the image).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .formats.checkpoint import atomic_write, config_dict
from .pipeline import Pipeline, read_pipeline
from .prune import prune_decoder
from .training import LOCAL, Dist, TrainConfig, captions, fit, make_dataset, run_tag, seed_step

TRAIN = TrainConfig(train_steps=1000, batch_size=16, lr=1e-3, warmup=50, ema_decay=None)
IMAGE_CACHE_BYTES = 2**30  # the teacher's images are made once when they fit in 1 GiB, else at each step


# ---- the loss: the paper's MSE, or on toy data the object-weighted loss of the toy autoencoder --------------------
def default_object_weight(weight: float | None, data: str) -> float:
    """8 on the toy world, 0 (no weighting: a plain mean) on a folder of real images."""
    return weight if weight is not None else 8.0 * (data == "toy")


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W]: True where a pixel is coloured (its channels differ by more than 0.3 of the [-1, 1] range): the
    toy world's objects are saturated, its backgrounds grey gradients."""
    return (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) > 0.3


def object_weights(x: torch.Tensor, boost: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, H, W]: 1 + boost on the object pixels (``object_mask``)."""
    if boost == 0:
        return torch.ones_like(x[:, :1])
    return 1 + boost * object_mask(x).float()


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """Object-weighted MSE + L1 on pixels, plus L1 on the error's image gradients (keeps edges sharp)."""
    err = rec - x
    edges = ((weight[..., 1:] * (err[..., 1:] - err[..., :-1]).abs()).mean()
             + (weight[..., 1:, :] * (err[..., 1:, :] - err[..., :-1, :]).abs()).mean())
    return (weight * (err**2 + err.abs())).mean() + edge_weight * edges



@dataclass(frozen=True)
class DecoderConfig:
    ratio: float = 0.5  # fraction r of channels kept per layer (§3.2: 50%)
    latents: int = 2048  # synthetic latents in the pool
    teacher_steps: int = 50  # DDIM steps making each latent (the paper's 50)
    guidance: float | None = None  # CFG scale of the latents; None: the checkpoint's
    latent_cache: str | None = None  # where the latents are cached; None: <out>.latents.pt
    object_weight: float | None = None  # toy loss weight of object pixels; 0 = the paper's MSE; None: 8 on toy
    data: str = "toy"  # prompts: 'toy' or a folder of captioned images
    skip_bad: bool = False
    train: TrainConfig = field(default=TRAIN)  # train_steps 0: pruned only, the lower reference of §3.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "object_weight", default_object_weight(self.object_weight, self.data))
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.latents < 1 or self.teacher_steps < 1 or self.object_weight < 0:
            raise ValueError("latents and teacher-steps must be >= 1, object-weight >= 0")
        if self.guidance is not None and not self.guidance >= 1:
            raise ValueError(f"guidance must be >= 1, got {self.guidance}")


@torch.no_grad()
def synthetic_latents(pipe: Pipeline, init: str, cfg: DecoderConfig, out: str, d: Dist) -> torch.Tensor:
    """The distillation data: prompts -> the teacher UNet's DDIM output, fresh noise each; on several ranks, each
    makes its share and they exchange them (the same latents as one process makes).

    Cached in ``cfg.latent_cache`` (the expensive part); a cache made with other settings is made again.
    """
    cache = Path(cfg.latent_cache or out + ".latents.pt")
    seed = cfg.train.seed
    tag = [init, cfg.latents, cfg.teacher_steps, cfg.guidance, seed, cfg.data]
    if cache.is_file():
        try:
            saved = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, or not a cache of ours: made again
            print(f"warning: {cache} cannot be read ({str(e).splitlines()[0][:120]}); making it again", file=sys.stderr)
            saved = None
        if isinstance(saved, dict) and saved.get("tag") == tag and isinstance(saved.get("latents"), torch.Tensor):
            return saved["latents"]
    data = make_dataset(cfg.data, 64 if cfg.data == "toy" else pipe.sampler.resolution, seed, cfg.skip_bad)
    guidance = pipe.sampler.guidance if cfg.guidance is None else cfg.guidance
    res, chunk, found = pipe.sampler.resolution, 64, {}
    every = captions(data, cfg.latents, seed)
    for i in tqdm(range(d.rank * chunk, cfg.latents, chunk * d.world), desc="teacher latents", disable=not d.main):
        n = min(chunk, cfg.latents - i)  # chunk i: its prompts and its noise (seeded by i) on whichever rank
        prompts = every[i:i + n]
        z = pipe.initial_latents(n, res, res, seed=10**6 * (seed + 1) + i)
        context, uncond = pipe.encode_prompts(prompts), pipe.encode_prompts([""] * n)
        found[i] = pipe.denoise(z, context, uncond, cfg.teacher_steps, guidance, pipe.sampler.spacing,
                                solver=pipe.sampler.solver).cpu()
    if d.world > 1:  # each rank made every world-th chunk; all of them, in order, on every rank
        parts: list[dict] = [{}] * d.world
        dist.all_gather_object(parts, found)
        found = {i: z for part in parts for i, z in part.items()}
    latents = torch.cat([found[i] for i in sorted(found)])
    if d.main:
        atomic_write(cache, lambda tmp: torch.save({"tag": tag, "latents": latents}, tmp))
    return latents


def distill_decoder(init: str, cfg: DecoderConfig, out: str, d: Dist = LOCAL) -> Pipeline:
    """Prune the decoder of the pipeline ``init`` to ``cfg.ratio`` and distill it; writes ``out`` (the pipeline with
    the pruned decoder, which sample.py --decoder and Pipeline.set_decoder read)."""
    seed_step(cfg.train.seed, -1)
    pipe = read_pipeline(init).to(d.device)
    student = prune_decoder(pipe.vae, cfg.ratio)
    latents = synthetic_latents(pipe, init, cfg, out, d) / pipe.latent_scale
    teacher, decoder = pipe.vae.decoder.eval(), student.decoder.train().requires_grad_(True)
    vae, batch = pipe.vae.cfg, cfg.train.batch_size // d.world
    images = None  # App. B.2's latent-image pairs
    if cfg.train.train_steps and latents.numel() // vae.latent_channels * vae.image_channels * vae.factor**2 * 4 \
            <= IMAGE_CACHE_BYTES:  # fp32
        with torch.no_grad():
            images = torch.cat([teacher(latents[i:i + 64].to(d.device)) for i in range(0, len(latents), 64)])

    def loss_at(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, len(latents), (batch,))
        z = latents[pick].to(d.device)
        with torch.no_grad():
            target = teacher(z) if images is None else images[pick]
        if cfg.object_weight:  # the toy stand-in for a perceptual loss, as in the autoencoder stage
            loss = reconstruction_loss(decoder(z), target, object_weights(target, cfg.object_weight), 1.0)
        else:  # App. B.2: the mean squared error between the two images
            loss = F.mse_loss(decoder(z), target)
        return loss, loss

    def save(model: torch.nn.Module, step: int, losses: list[float]) -> None:
        pipe.with_parts(vae=student, source=out, training=config_dict(cfg)).save(out)

    _, losses = fit(decoder, loss_at, cfg.train, d, out=out, tag=run_tag(cfg, init=init), save=save, desc="decoder")
    if d.main:
        if not cfg.train.train_steps:
            save(decoder, 0, [])
        recent = losses[-100:]
        fit_text = (f"loss to the teacher decoder's images {sum(recent) / len(recent):.5f}" if recent
                    else "pruned only, not distilled")
        print(f"wrote {out}: decoder widths {student.cfg.decoder_channels} (from {vae.decoder_channels}); {fit_text}")
    return pipe.with_parts(vae=student.eval())
