"""The toy world's KL autoencoder (f = 4, or SD's 8): LDM's recipe without the GAN and LPIPS terms, which need
weights we cannot download. SD-v1.5 ships its VAE; only the toy world trains one.

Its reconstruction loss is our stand-in for LDM's perceptual loss: a toy object covers 4-15% of the image, so a plain
mean lets an autoencoder trade the object's colour and corners for a cleaner background. The decoder's data
distillation uses the same loss on toy data; it lives there (``decoder_distill.reconstruction_loss``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..decoder_distill import default_object_weight, object_mask, object_weights, reconstruction_loss
from ..formats.checkpoint import config_dict, positive_number, read_meta, read_state_dict, save_checkpoint
from ..formats.weights import CheckpointError, apply_map
from ..training import LOCAL, Dist, TrainConfig, batch_at, fit, make_dataset, run_tag, seed_step
from ..vae import VAE, VAEConfig, toy_vae

TRAIN = TrainConfig(train_steps=4000, batch_size=32, lr=2e-3, warmup=100, ema_decay=None)


@dataclass(frozen=True)
class AutoencoderConfig:
    kl: float = 1e-6  # KL weight, as SD's VAE
    factor: int = 4  # downsampling factor f: 4 (a 16x16 latent for the toy world's 64x64 images) or 8 (SD's)
    object_weight: float | None = None  # extra weight of object pixels; None: 8 on toy data, 0 on a folder
    crop: int | None = None  # train on crops of this side around the object; None: 40 on toy data, 0 (whole) else
    edge_weight: float = 1.0  # L1 on the error's image gradients: keeps edges sharp
    data: str = "toy"  # 'toy' or a folder of captioned images
    skip_bad: bool = False  # leave out unreadable / uncaptioned images of a folder
    train: TrainConfig = TRAIN

    def __post_init__(self) -> None:
        toy = self.data == "toy"
        object.__setattr__(self, "object_weight", default_object_weight(self.object_weight, self.data))
        object.__setattr__(self, "crop", (40 if toy else 0) if self.crop is None else self.crop)
        toy_vae(self.factor)  # ValueError for a factor other than 4 or 8
        if self.crop % self.factor or not 0 <= self.crop <= 64:
            raise ValueError(f"crop must be a multiple of the factor {self.factor} in [0, 64], got {self.crop}")
        if self.train.train_steps < 1:
            raise ValueError(f"train-steps must be >= 1, got {self.train.train_steps}")
        if self.kl < 0 or self.edge_weight < 0 or self.object_weight < 0:
            raise ValueError("kl, edge-weight and object-weight must be >= 0")


def crop_objects(x: torch.Tensor, size: int, factor: int) -> torch.Tensor:
    """size x size crops centred on a random object pixel of each image (so each object of a scene, corners
    included, is seen), at a random offset of up to one latent cell, on the latent grid.

    Full images spend most of the autoencoder's compute on flat background; it is convolutional, so it learns the
    same maps from crops, about 4x more object views per second.
    """
    h, w = x.shape[-2:]
    crops = []
    for image, mask in zip(x, object_mask(x)[:, 0]):
        ys, xs = mask.nonzero(as_tuple=True)
        k = int(torch.randint(len(ys), ())) if len(ys) else None
        cy, cx = (ys[k].item(), xs[k].item()) if k is not None else (h / 2, w / 2)
        jitter = torch.randint(-1, 2, (2,)).tolist()
        top = min(max(0, factor * (round((cy - size / 2) / factor) + jitter[0])), h - size)
        left = min(max(0, factor * (round((cx - size / 2) / factor) + jitter[1])), w - size)
        crops.append(image[:, top:top + size, left:left + size])
    return torch.stack(crops)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per image, divided by the pixel count of the image (see ``train_autoencoder``)."""
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()


def train_autoencoder(cfg: AutoencoderConfig, out: str, d: Dist = LOCAL) -> VAE:
    """Train the toy autoencoder and write it to ``out`` with its latent scale (SD's 0.18215 plays that role)."""
    seed_step(cfg.train.seed, -1)
    vae_cfg = toy_vae(cfg.factor)
    vae = VAE(vae_cfg).to(d.device)
    with torch.no_grad():  # a narrow posterior from the start (std e^-3): a wide one teaches the decoder to blur
        vae.encoder.quant_conv.bias[vae_cfg.latent_channels:] = -6.0
    data = make_dataset(cfg.data, 64, cfg.train.seed, cfg.skip_bad, cfg.train.workers)

    def loss_at(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = batch_at(data, step, cfg.train.batch_size, d, cfg.train.seed)
        x = (crop_objects(x, cfg.crop, cfg.factor) if cfg.crop else x).to(d.device)
        mean, logvar = vae.encoder(x).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar.clamp(-30, 20))
        rec = vae.decode(z)
        # LDM weighs the per-image KL against the per-image *sum* of reconstruction errors; ours are pixel means,
        # so the KL is divided by the pixel count too (else the posterior stays wide and the decoder learns blur)
        kl = kl_divergence(mean, logvar) / x[0].numel()
        loss = reconstruction_loss(rec, x, object_weights(x, cfg.object_weight), cfg.edge_weight) + cfg.kl * kl
        return loss, loss

    def save(model: torch.nn.Module, step: int, losses: list[float]) -> None:
        with torch.no_grad():  # scale latents to unit variance for the UNet
            x, _ = batch_at(data, cfg.train.train_steps, 256, Dist(device=d.device), cfg.train.seed + 1)
            scale = 1.0 / model.encode(x.to(d.device)).std().item()
        save_checkpoint(out, {"vae": model}, {"vae": dataclasses.asdict(vae_cfg), "latent_scale": scale,
                                               "training": config_dict(cfg)})
        if step == cfg.train.train_steps:
            print(f"latent scale {scale:.4f}; wrote {out}")

    fit(vae, loss_at, cfg.train, d, out=out, tag=run_tag(cfg), save=save, desc="autoencoder")
    return vae


def load_autoencoder(path: str) -> tuple[VAE, float]:
    """The frozen autoencoder of a ``train.py autoencoder`` checkpoint, and its latent scale."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such autoencoder checkpoint: {path}")
    meta = read_meta(path) or {}
    if "vae" not in meta or "latent_scale" not in meta:
        raise CheckpointError(f"{path}: not an autoencoder checkpoint (train.py autoencoder writes one)")
    vae = VAE(VAEConfig(**meta["vae"]))
    state = {k[4:]: v for k, v in read_state_dict(path).items() if k.startswith("vae.")}
    apply_map(vae, state, lambda k: [k], f"{path}: vae")
    return vae.eval().requires_grad_(False), positive_number(path, "latent scale", meta["latent_scale"])
