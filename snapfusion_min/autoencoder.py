"""The toy world's KL autoencoder (f = 8): LDM's recipe without the GAN and LPIPS terms, which need weights we cannot
download. SD-v1.5 ships its VAE; only the toy world trains one.

Its reconstruction loss is our stand-in for LDM's perceptual loss: a toy object covers 4-15% of the image, so a plain
mean lets an autoencoder trade the object's colour and corners for a cleaner background. The decoder's data
distillation (``decoder_distill``) reuses the same loss on toy data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .checkpoint import config_dict, save_checkpoint
from .training import LOCAL, Dist, TrainConfig, batch_at, fit, make_dataset, seed_step
from .vae import TOY_VAE, VAE

TRAIN = TrainConfig(train_steps=3000, batch_size=32, lr=2e-3, warmup=100, ema_decay=None)


@dataclass(frozen=True)
class AutoencoderConfig:
    kl: float = 1e-6  # KL weight, as SD's VAE
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
        if self.crop % TOY_VAE.factor or not 0 <= self.crop <= 64:
            raise ValueError(f"crop must be a multiple of {TOY_VAE.factor} in [0, 64], got {self.crop}")
        if self.train.train_steps < 1:
            raise ValueError(f"train-steps must be >= 1, got {self.train.train_steps}")
        if self.kl < 0 or self.edge_weight < 0 or self.object_weight < 0:
            raise ValueError("kl, edge-weight and object-weight must be >= 0")


def default_object_weight(weight: float | None, data: str) -> float:
    """8 on the toy world, 0 (no weighting: a plain mean) on a folder of real images."""
    return weight if weight is not None else 8.0 * (data == "toy")


def object_mask(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W]: True where a pixel differs from its image's border colour (the median of the border)."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # [B, C, 4W]
    background = border.median(dim=-1).values[..., None, None]
    return (x - background).abs().amax(dim=1, keepdim=True) > 0.1


def object_weights(x: torch.Tensor, boost: float) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, H, W]: 1 + boost where a pixel differs from its image's border colour."""
    if boost == 0:
        return torch.ones_like(x[:, :1])
    return 1 + boost * object_mask(x).float()


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """Object-weighted MSE + L1 on pixels, plus L1 on the error's image gradients (keeps edges sharp)."""
    err = rec - x
    edges = ((weight[..., 1:] * (err[..., 1:] - err[..., :-1]).abs()).mean()
             + (weight[..., 1:, :] * (err[..., 1:, :] - err[..., :-1, :]).abs()).mean())
    return (weight * (err**2 + err.abs())).mean() + edge_weight * edges


def crop_objects(x: torch.Tensor, size: int, factor: int) -> torch.Tensor:
    """size x size crops around each image's object, at a random offset of up to one latent cell, on the latent grid.

    Full images spend most of the autoencoder's compute on flat background; it is convolutional, so it learns the
    same maps from crops, about 4x more object views per second.
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


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per image, divided by the pixel count of the image (see ``train_autoencoder``)."""
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()


def train_autoencoder(cfg: AutoencoderConfig, out: str, d: Dist = LOCAL) -> VAE:
    """Train the toy autoencoder and write it to ``out`` with its latent scale (SD's 0.18215 plays that role)."""
    seed_step(cfg.train.seed, -1)
    vae = VAE(TOY_VAE).to(d.device)
    with torch.no_grad():  # a narrow posterior from the start (std e^-3): a wide one teaches the decoder to blur
        vae.encoder.quant_conv.bias[TOY_VAE.latent_channels:] = -6.0
    data = make_dataset(cfg.data, 64, cfg.train.seed, cfg.skip_bad, cfg.train.workers)

    def loss_at(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = batch_at(data, step, cfg.train.batch_size, d, cfg.train.seed)
        x = (crop_objects(x, cfg.crop, TOY_VAE.factor) if cfg.crop else x).to(d.device)
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
        save_checkpoint(out, {"vae": model}, {"vae": dataclasses.asdict(TOY_VAE), "latent_scale": scale,
                                               "training": config_dict(cfg)})
        if step == cfg.train.train_steps:
            print(f"latent scale {scale:.4f}; wrote {out}")

    fit(vae, loss_at, cfg.train, d, out=out, save=save, desc="autoencoder")
    return vae

