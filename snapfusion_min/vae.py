"""SD's variational autoencoder (LDM, paper §2.1): images <-> latents at 1/8 resolution.

The decoder is the part SnapFusion compresses (§3.2, App. B.2); its widths are plain config data so that a channel-
pruned decoder (``prune.py``) is the same class with smaller numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .unet import ResBlock

VAE_SCALE = 0.18215  # SD-v1 latent scaling factor: the UNet sees z = VAE_SCALE * encoder mean


@dataclass(frozen=True)
class VAEConfig:
    """Widths of the encoder levels (fine to coarse) and of the decoder levels (coarse to fine, as it runs)."""

    channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder, level 0 = full resolution
    decoder_channels: tuple[int, ...] = (512, 512, 256, 128)  # decoder in execution order; pruning shrinks these
    layers: int = 2  # ResNets per encoder level; the decoder has layers + 1
    latent_channels: int = 4
    image_channels: int = 3
    groups: int = 32
    decoder_groups: int | None = None  # GroupNorm groups of the decoder (None: groups); pruning may merge groups

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "decoder_channels", tuple(self.decoder_channels))
        if self.decoder_groups is None:
            object.__setattr__(self, "decoder_groups", self.groups)
        if len(self.channels) != len(self.decoder_channels) or self.layers < 1:
            raise ValueError(f"VAE needs as many decoder as encoder levels and layers >= 1, got {self}")
        for widths, groups in ((self.channels, self.groups), (self.decoder_channels, self.decoder_groups)):
            for c in widths:
                if c % groups:
                    raise ValueError(f"VAE width {c} is not divisible by {groups} GroupNorm groups")

    @property
    def factor(self) -> int:
        """Downsampling factor f (SD: 8)."""
        return 2 ** (len(self.channels) - 1)


TOY_VAE = VAEConfig(channels=(16, 32, 64, 64), decoder_channels=(64, 64, 32, 16), layers=1, groups=8)  # f = 8, 0.6M


def toy_vae(factor: int = 8) -> VAEConfig:
    """The toy autoencoder with downsampling factor 8 (``TOY_VAE``) or 4 (its last level left out: a 16x16 latent
    for 64x64 images)."""
    if factor not in (4, 8):
        raise ValueError(f"the toy autoencoder's factor must be 4 or 8, got {factor}")
    levels = 4 if factor == 8 else 3
    return dataclasses.replace(TOY_VAE, channels=TOY_VAE.channels[:levels],
                               decoder_channels=TOY_VAE.decoder_channels[-levels:])


def _res(c_in: int, c_out: int, groups: int) -> ResBlock:
    return ResBlock(c_in, c_out, t_dim=0, groups=groups, eps=1e-6)


class VAEAttention(nn.Module):
    """Single-head self-attention over the HW positions of the lowest-resolution feature map."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x).flatten(2).transpose(1, 2)[:, None]  # [B, C, H, W] -> [B, 1 head, HW, C] (4-D: ONNX's)
        y = F.scaled_dot_product_attention(self.to_q(y), self.to_k(y), self.to_v(y))[:, 0]
        return x + self.to_out(y).transpose(1, 2).reshape(b, c, h, w)


class Mid(nn.Module):
    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.res1, self.attn, self.res2 = _res(dim, dim, groups), VAEAttention(dim, groups), _res(dim, dim, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c = cfg.channels
        self.conv_in = nn.Conv2d(cfg.image_channels, c[0], 3, padding=1)
        self.levels = nn.ModuleList()
        for i, width in enumerate(c):
            level = nn.Module()
            level.res = nn.ModuleList(_res(c[max(i - 1, 0)] if j == 0 else width, width, cfg.groups)
                                      for j in range(cfg.layers))
            level.downsample = nn.Conv2d(width, width, 3, stride=2) if i < len(c) - 1 else None
            self.levels.append(level)
        self.mid = Mid(c[-1], cfg.groups)
        self.norm_out = nn.GroupNorm(cfg.groups, c[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(c[-1], 2 * cfg.latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> moments [mean | logvar] of the latent Gaussian."""
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))  # oneDNN's faster convolutions on CPU
        for level in self.levels:
            for res in level.res:
                h = res(h)
            if level.downsample is not None:
                h = level.downsample(F.pad(h, (0, 1, 0, 1)))  # LDM's asymmetric padding
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c = cfg.decoder_channels
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.conv_in = nn.Conv2d(cfg.latent_channels, c[0], 3, padding=1)
        self.mid = Mid(c[0], cfg.decoder_groups)
        self.levels = nn.ModuleList()
        for i, width in enumerate(c):
            level = nn.Module()
            level.res = nn.ModuleList(_res(c[max(i - 1, 0)] if j == 0 else width, width, cfg.decoder_groups)
                                      for j in range(cfg.layers + 1))
            level.upsample = nn.Conv2d(width, width, 3, padding=1) if i < len(c) - 1 else None
            self.levels.append(level)
        self.norm_out = nn.GroupNorm(cfg.decoder_groups, c[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(c[-1], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (z / VAE_SCALE) -> image in about [-1, 1]."""
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in self.levels:
            for res in level.res:
                h = res(h)
            if level.upsample is not None:
                h = level.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """AutoencoderKL with f = 8. ``decode`` takes the unscaled latent, as diffusers' ``AutoencoderKL.decode``."""

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg or VAEConfig()
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Image in [-1, 1] -> unscaled latent: a sample of N(mean, exp(logvar)), or the mean if sample=False."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)
