"""Core ML export (Apple's ml-stable-diffusion, the paper's iPhone deployment): text encoder, UNet of any
architecture spec, and the (pruned) decoder, each converted on its own through torch.export into an ML Program, with
fixed shapes, named inputs and outputs, and the settings an app needs to sample in every package's metadata.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .pipeline import Pipeline
from .unet import Attention

PARTS = ("text_encoder", "unet", "decoder")
ATTENTIONS = ("default", "split_einsum")  # split_einsum: the Neural Engine-friendly attention of ml-stable-diffusion
PRECISIONS = ("fp16", "fp32")
# what coremltools logs at import on Linux and with a newer torch than it lists, and while it stores index constants
# (int64 -> int32): known and harmless here
KNOWN_NOISE = ("has not been tested with coremltools", "Failed to load _ML",
               "Saving value type of int64 into a builtin type of int32")


def _not_noise(record: logging.LogRecord) -> bool:
    return not any(text in record.getMessage() for text in KNOWN_NOISE)


def load_coremltools():  # noqa: ANN201
    """coremltools without its known start-up warnings (other warnings pass); ValueError if it is not installed."""
    logger = logging.getLogger("coremltools")
    if _not_noise not in logger.filters:
        logger.addFilter(_not_noise)
    try:
        import coremltools
    except ImportError:
        raise ValueError("coremltools is not installed: pip install coremltools") from None
    return coremltools


class TextEncoderPart(nn.Module):
    """input_ids [1, L] int32 -> last_hidden_state [1, L, width] (after the final layer norm, as SD uses it)."""

    def __init__(self, pipe: Pipeline) -> None:
        super().__init__()
        self.encoder = pipe.text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids.long())


class UNetPart(nn.Module):
    """(sample [B, 4, h, w], timestep [B], encoder_hidden_states [B, L, width]) -> the network's output (eps or v)."""

    def __init__(self, pipe: Pipeline) -> None:
        super().__init__()
        self.unet = pipe.unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states)


class DecoderPart(nn.Module):
    """Scaled latent z [1, 4, h, w] -> image [1, 3, H, W] in [0, 1] (the latent scale is folded in)."""

    def __init__(self, pipe: Pipeline) -> None:
        super().__init__()
        self.decoder, self.scale = pipe.vae.decoder, pipe.latent_scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.decoder(z / self.scale) / 2 + 0.5).clamp(0, 1)


def part_io(pipe: Pipeline, part: str, resolution: int, batch: int) -> tuple[nn.Module, dict, list[str]]:
    """The wrapper module, its named example inputs, and its output name(s)."""
    h = resolution // pipe.vae.cfg.factor
    width, length = pipe.text_encoder.cfg.width, pipe.text_encoder.cfg.context_length
    if part == "text_encoder":
        return TextEncoderPart(pipe), {"input_ids": torch.zeros(1, length, dtype=torch.int32)}, ["last_hidden_state"]
    if part == "unet":
        inputs = {"sample": torch.randn(batch, pipe.unet.spec.in_channels, h, h),
                  "timestep": torch.full((batch,), 999.0), "encoder_hidden_states": torch.randn(batch, length, width)}
        return UNetPart(pipe), inputs, ["noise_pred" if pipe.prediction == "eps" else "v_pred"]
    return DecoderPart(pipe), {"z": torch.randn(1, pipe.vae.cfg.latent_channels, h, h)}, ["image"]


def metadata(pipe: Pipeline, resolution: int, batch: int, attention: str, precision: str) -> dict:
    """What an app needs to sample without guessing."""
    cfg = pipe.config()
    return {"arch": cfg["arch"], "prediction": pipe.prediction, "latent_scale": pipe.latent_scale,
            "scheduler": {"name": "DDIM", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                          "train_steps": 1000, "spacing": pipe.sampler.spacing},
            "steps": pipe.sampler.steps, "guidance": pipe.sampler.guidance, "resolution": resolution,
            "unet_batch": batch, "vae": cfg["vae"], "text": cfg["text"], "attention": attention,
            "precision": precision, "source": Path(pipe.source).name}


def convert(module: nn.Module, inputs: dict, outputs: list[str], precision: str, meta: dict) -> object:
    """torch.export -> coremltools ML Program with the given input / output names and metadata."""
    import numpy as np

    ct = load_coremltools()

    module = module.eval()
    with torch.no_grad():
        program = torch.export.export(module, tuple(inputs.values())).run_decompositions({})
    types = [ct.TensorType(name=name, shape=tuple(x.shape), dtype=np.int32 if x.dtype == torch.int32 else np.float32)
             for name, x in inputs.items()]
    with warnings.catch_warnings():  # numpy's, when coremltools folds the text encoder's -inf causal mask
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        model = ct.convert(program, inputs=types, outputs=[ct.TensorType(name=n, dtype=np.float32) for n in outputs],
                           convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                           compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)
    model.user_defined_metadata["snapfusion_min"] = json.dumps(meta)
    model.short_description = f"snapfusion-min {meta['part']} ({meta['source']})"
    return model


def export(pipe: Pipeline, out: Path, parts: list[str], *, resolution: int = 64, batch: int = 2,
           precision: str = "fp16", attention: str = "default", log: bool = True) -> dict[str, Path]:
    """Write <out>/<part>.mlpackage for each part and <out>/snapfusion_min.json; returns the package paths."""
    for m in pipe.unet.modules():
        if isinstance(m, Attention):
            m.split_einsum = attention == "split_einsum"
    pipe.unet.to(memory_format=torch.contiguous_format)
    out.mkdir(parents=True, exist_ok=True)
    meta = metadata(pipe, resolution, batch, attention, precision)
    paths = {}
    for part in parts:
        start = time.perf_counter()
        module, inputs, outputs = part_io(pipe, part, resolution, batch)
        model = convert(module, inputs, outputs, precision, {**meta, "part": part})
        paths[part] = out / f"{part}.mlpackage"
        model.save(str(paths[part]))
        if log:
            print(f"{paths[part]}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    (out / "snapfusion_min.json").write_text(json.dumps({**meta, "parts": {p: f"{p}.mlpackage" for p in paths}},
                                                        indent=1))
    return paths


def verify(pipe: Pipeline, paths: dict[str, Path], resolution: int, batch: int) -> None:
    """macOS only: each package on random inputs vs torch, max abs difference."""
    ct = load_coremltools()

    for part, path in paths.items():
        module, inputs, outputs = part_io(pipe, part, resolution, batch)
        with torch.no_grad():
            want = module.eval()(*inputs.values())
        got = ct.models.MLModel(str(path)).predict({k: v.numpy() for k, v in inputs.items()})[outputs[0]]
        print(f"{part}: max |coreml - torch| = {(torch.from_numpy(got).float() - want).abs().max().item():.3e}")




def check_resolution(pipe: Pipeline, resolution: int) -> None:
    """The latent must survive the UNet's downsamples: a positive multiple of factor * 2^(levels - 1)."""
    step = pipe.vae.cfg.factor * 2 ** (len(pipe.unet.spec.channels) - 1)
    if resolution <= 0 or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of {step} for this model, got {resolution}")
