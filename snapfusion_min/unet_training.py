"""Training the UNet: v-prediction (Eq. 6), robust training with stochastic block dropping (Eq. 5), CFG dropout.

One stage serves the toy teacher trained from scratch, a v-prediction fine-tune of an eps checkpoint (§4.1), robust
training (``keep_prob`` < 1) and the fine-tuning of an evolved UNet (Alg. 1). The loss goes to ``training.fit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import diffusion as D
from .formats.checkpoint import config_dict
from .pipeline import PREDICTIONS, Pipeline, SamplerConfig, read_pipeline
from .training import LOCAL, Dist, TrainConfig, encoded_batch, fit, make_dataset, run_tag, save_with_figures, seed_step

TRAIN = TrainConfig(train_steps=8000, batch_size=32, lr=1e-3, warmup=200)
TOY_SAMPLER = SamplerConfig(steps=20, guidance=4.5, resolution=64)  # 4.5: the toy teacher's best CLIP score


Fresh = Callable[["UNetConfig", str], Pipeline]  # (config, out) -> a new pipeline to train


def warmup_for(train_steps: int) -> int:
    """The UNet stages' warm-up: 10% of the steps, at most 200."""
    return min(200, train_steps // 10)


@dataclass(frozen=True)
class UNetConfig:
    arch: str = "toy"  # a fresh UNet: preset name (sd15, snapfusion, tiny, toy) or a spec .json
    init: str | None = None  # or start from this checkpoint (ours, SD-v1 single file, diffusers folder)
    clip: str | None = None  # a fresh UNet's text encoder: the toy CLIP's text tower
    autoencoder: str | None = None  # a fresh UNet's autoencoder (train.py autoencoder)
    prediction: str = "v"  # v (Eq. 6; fine-tunes an eps --init to v) or eps (Eq. 1)
    keep_prob: float = 1.0  # p of Eq. 5: each block runs with probability p
    cfg_dropout: float = 0.1  # caption dropped to '' with this probability (for CFG at sampling)
    data: str = "toy"  # 'toy' or a folder of captioned images
    skip_bad: bool = False  # leave out unreadable / uncaptioned images of a folder
    resolution: int | None = None  # training image side, saved as the sampler's; None: 64 on toy data, else --init's
    sampler: SamplerConfig = TOY_SAMPLER  # a fresh UNet's sampler defaults, saved in its checkpoint
    train: TrainConfig = field(default=TRAIN)

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not 0.0 < self.keep_prob <= 1.0:
            raise ValueError(f"keep-prob must be in (0, 1], got {self.keep_prob}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg-dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.train.train_steps < 1:
            raise ValueError(f"train-steps must be >= 1, got {self.train.train_steps}")
        if not self.init and not (self.clip and self.autoencoder):
            raise ValueError("a fresh UNet needs --clip and --autoencoder (or start from --init)")


def build_pipeline(cfg: UNetConfig, out: str, fresh: Fresh | None = None) -> Pipeline:
    """The model to train: ``cfg.init``, or ``fresh(cfg, out)``, a new UNet with its text encoder and autoencoder (the
    toy world's: ``toy.teacher.fresh_pipeline``)."""
    if cfg.init:
        pipe = read_pipeline(cfg.init)
        return pipe.with_parts(sampler=dataclasses.replace(pipe.sampler, resolution=cfg.resolution)) \
            if cfg.resolution else pipe
    if fresh is None:
        raise ValueError("a fresh UNet needs a builder of its text encoder and autoencoder (toy.teacher.fresh_pipeline)"
                         " or an --init checkpoint")
    return fresh(cfg, out)


def v_loss(pipe: Pipeline, x0: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Eq. 6 (or Eq. 1 for eps): || net(t, z_t, c) - target ||^2 with t ~ U{0..999}, z_t = alpha_t x + sigma_t eps."""
    t = torch.randint(0, D.TRAIN_STEPS, (x0.shape[0],), device=x0.device)
    alpha, sigma = pipe.schedule.alpha_sigma(t)
    eps = torch.randn_like(x0)
    z = D.noisy(x=x0, eps=eps, alpha=alpha, sigma=sigma)
    target = D.v_target(x=x0, eps=eps, alpha=alpha, sigma=sigma) if pipe.prediction == "v" else eps
    return F.mse_loss(pipe.unet(z, t, context).float(), target.float())


def train_unet(cfg: UNetConfig, out: str, d: Dist = LOCAL, figures: bool = True,
               fresh: Fresh | None = None) -> Pipeline:
    """Train, writing ``out`` (EMA weights; with ``figures`` also its loss and sample PNGs) and <out>.state.pt. A
    fresh UNet (no ``cfg.init``) is made by ``fresh`` after the seed is set (``build_pipeline``)."""
    seed_step(cfg.train.seed, -1)
    pipe = build_pipeline(cfg, out, fresh)
    pipe.prediction = cfg.prediction
    pipe.training = config_dict(cfg)
    pipe.to(d.device)
    unet = pipe.unet.train()
    unet.keep_prob = cfg.keep_prob
    t = cfg.train
    data = make_dataset(cfg.data, 64 if cfg.data == "toy" and not cfg.resolution else pipe.sampler.resolution,
                        t.seed, cfg.skip_bad, t.workers)
    with torch.no_grad():
        empty = pipe.encode_prompts([""])

    def loss_at(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0, context = encoded_batch(pipe, data, step, micro, t, d)
        with torch.no_grad():
            drop = torch.rand(len(context), device=d.device) < cfg.cfg_dropout
            context = torch.where(drop[:, None, None], empty, context)
        loss = v_loss(pipe, x0, context)  # under the loop's autocast with --amp
        return loss, loss

    save = save_with_figures(out, pipe, "training loss (Eq. 6)") if figures else \
        lambda model, step, losses: pipe.with_parts(unet=model).save(out)
    stored, losses = fit(unet, loss_at, t, d, out=out, tag=run_tag(cfg, arch=unet.spec.to_json()), save=save,
                          desc="unet")
    if d.main:
        recent = losses[-100:] or [float("nan")]
        kind = "EMA weights" if t.ema_decay is not None else "weights as trained"
        print(f"wrote {out} ({kind}) at step {len(losses)} of {t.train_steps}; loss {sum(recent) / len(recent):.4f}")
    return pipe.with_parts(unet=stored)
