"""The toy teacher's starting point: a fresh UNet on the toy CLIP's text tower and the toy autoencoder.

``unet_training.train_unet(cfg, out, d, fresh=fresh_pipeline)`` trains it (``train.py unet --clip --autoencoder``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..arch import ArchSpec, preset
from ..pipeline import Pipeline
from ..unet import UNet
from ..unet_training import UNetConfig
from .autoencoder import load_autoencoder
from .clip import load_toy_clip, text_encoder_from_clip


def fresh_pipeline(cfg: UNetConfig, out: str) -> Pipeline:
    """A new UNet of ``cfg.arch`` with the toy CLIP's text tower and the autoencoder, built in this order: their
    random initialisations draw from the seeded RNG, so one seed gives one UNet."""
    text_encoder = text_encoder_from_clip(load_toy_clip(cfg.clip))
    ae, scale = load_autoencoder(cfg.autoencoder)
    spec = ArchSpec.from_json(Path(cfg.arch).read_text()) if cfg.arch.endswith(".json") else preset(cfg.arch)
    if spec.context_dim != text_encoder.cfg.width:
        spec = ArchSpec.from_json({**json.loads(spec.to_json()), "context_dim": text_encoder.cfg.width})
    return Pipeline(UNet(spec), ae, text_encoder, prediction=cfg.prediction, latent_scale=scale, source=out,
                    sampler=cfg.sampler)
