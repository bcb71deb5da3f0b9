"""snapfusion-min: a minimal, from-scratch reimplementation of SnapFusion (arXiv 2306.00980)."""

from .arch import ArchSpec, preset
from .formats.weights import CheckpointError
from .pipeline import Pipeline, SamplerConfig, load_pipeline, pick_device, read_pipeline
from .unet import UNet
from .vae import VAE, VAE_SCALE

__all__ = ["ArchSpec", "CheckpointError", "Pipeline", "SamplerConfig", "UNet", "VAE", "VAE_SCALE", "load_pipeline",
           "pick_device", "preset", "read_pipeline"]
