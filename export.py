"""Export a pipeline to Core ML: text encoder, UNet (any architecture spec) and (pruned) decoder as .mlpackage files.

    python export.py --out exports/toy                                  # the bundled toy model, fp16
    python export.py --checkpoint distilled.safetensors --batch 1      # a guidance-free student: UNet batch 1
    python export.py --checkpoint v1-5-pruned-emaonly.safetensors --resolution 512 --parts unet \
        --attention split_einsum --out exports/sd15                     # Neural Engine-style attention
    python export.py --out exports/toy --verify                         # macOS: run each model, compare to torch

Models go through torch.export into ML Programs (coremltools), fixed shapes from --resolution, named inputs and
outputs. The settings an app needs to sample (architecture spec, prediction type, scheduler, steps, guidance, latent
scale) are stored in every package's metadata and in <out>/snapfusion_min.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
BUNDLED = ROOT / "models" / "toy" / "model.safetensors"
PARTS = ("text_encoder", "unet", "decoder")


class TextEncoderPart(nn.Module):
    """input_ids [1, L] int32 -> last_hidden_state [1, L, width] (after the final layer norm, as SD uses it)."""

    def __init__(self, pipe) -> None:  # noqa: ANN001
        super().__init__()
        self.encoder = pipe.text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids.long())


class UNetPart(nn.Module):
    """(sample [B, 4, h, w], timestep [B], encoder_hidden_states [B, L, width]) -> the network's output (eps or v)."""

    def __init__(self, pipe) -> None:  # noqa: ANN001
        super().__init__()
        self.unet = pipe.unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states)


class DecoderPart(nn.Module):
    """Scaled latent z [1, 4, h, w] -> image [1, 3, H, W] in [0, 1] (the latent scale is folded in)."""

    def __init__(self, pipe) -> None:  # noqa: ANN001
        super().__init__()
        self.decoder, self.scale = pipe.vae.decoder, pipe.latent_scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.decoder(z / self.scale) / 2 + 0.5).clamp(0, 1)


def part_io(pipe, part: str, resolution: int, batch: int) -> tuple[nn.Module, dict, list[str]]:  # noqa: ANN001
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


def metadata(pipe, resolution: int, batch: int, attention: str, precision: str) -> dict:  # noqa: ANN001
    """What an app needs to sample without guessing."""
    cfg = pipe.config()
    return {"arch": cfg["arch"], "prediction": pipe.prediction, "latent_scale": pipe.latent_scale,
            "scheduler": {"name": "DDIM", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                          "train_steps": 1000, "spacing": pipe.sampler["spacing"]},
            "steps": pipe.sampler["steps"], "guidance": pipe.sampler["guidance"], "resolution": resolution,
            "unet_batch": batch, "vae": cfg["vae"], "text": cfg["text"], "attention": attention,
            "precision": precision, "source": Path(pipe.source).name}


def convert(module: nn.Module, inputs: dict, outputs: list[str], precision: str, meta: dict):  # noqa: ANN201
    """torch.export -> coremltools ML Program with the given input / output names and metadata."""
    import coremltools as ct
    import numpy as np

    module = module.eval()
    with torch.no_grad():
        program = torch.export.export(module, tuple(inputs.values())).run_decompositions({})
    types = [ct.TensorType(name=name, shape=tuple(x.shape), dtype=np.int32 if x.dtype == torch.int32 else np.float32)
             for name, x in inputs.items()]
    model = ct.convert(program, inputs=types, outputs=[ct.TensorType(name=n, dtype=np.float32) for n in outputs],
                       convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                       compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)
    model.user_defined_metadata["snapfusion_min"] = json.dumps(meta)
    model.short_description = f"snapfusion-min {meta['part']} ({meta['source']})"
    return model


def export(pipe, out: Path, parts: list[str], resolution: int = 64, batch: int = 2,  # noqa: ANN001
           precision: str = "fp16", attention: str = "default", log: bool = True) -> dict[str, Path]:
    """Write <out>/<part>.mlpackage for each part and <out>/snapfusion_min.json; returns the package paths."""
    from snapfusion_min.unet import Attention

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


def verify(pipe, paths: dict[str, Path], resolution: int, batch: int) -> None:  # noqa: ANN001
    """macOS only: each package on random inputs vs torch, max abs difference."""
    import coremltools as ct

    for part, path in paths.items():
        module, inputs, outputs = part_io(pipe, part, resolution, batch)
        with torch.no_grad():
            want = module.eval()(*inputs.values())
        got = ct.models.MLModel(str(path)).predict({k: v.numpy() for k, v in inputs.items()})[outputs[0]]
        print(f"{part}: max |coreml - torch| = {(torch.from_numpy(got).float() - want).abs().max().item():.3e}")


def random_pipeline(arch: str):  # noqa: ANN201
    """SD-v1.5's text encoder and VAE with a UNet of the preset ``arch``, random weights (shapes are what count)."""
    from snapfusion_min.arch import preset
    from snapfusion_min.pipeline import Pipeline
    from snapfusion_min.text_encoder import TextConfig, TextEncoder
    from snapfusion_min.unet import UNet
    from snapfusion_min.vae import VAE, VAE_SCALE

    return Pipeline(UNet(preset(arch)), VAE(), TextEncoder(TextConfig()), "eps", VAE_SCALE, f"random-{arch}",
                    {"resolution": 512})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default=str(BUNDLED), help="ours, an SD-v1 file or a diffusers folder "
                                                               "(default: the bundled toy model)")
    p.add_argument("--arch", help="instead of a checkpoint: a randomly initialised preset (sd15, snapfusion) at SD's "
                                  "widths, to measure conversion time and package size")
    p.add_argument("--out", default="exports", help="output folder (default: exports/)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--resolution", type=int, help="image size (default: the checkpoint's)")
    p.add_argument("--batch", type=int, choices=[1, 2], default=2, help="UNet batch: 2 for CFG, 1 without (default 2)")
    p.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--attention", choices=["default", "split_einsum"], default="default",
                   help="split_einsum: the Neural Engine-friendly attention of Apple's ml-stable-diffusion")
    p.add_argument("--verify", action="store_true", help="run each package and compare with torch (macOS only)")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not parts or set(parts) - set(PARTS):
        raise ValueError(f"--parts must be a subset of {','.join(PARTS)}, got {args.parts!r}")
    if args.verify and sys.platform != "darwin":
        raise ValueError("--verify runs Core ML models, which needs macOS; export without --verify here")
    try:
        import coremltools  # noqa: F401
    except ImportError:
        raise ValueError("coremltools is not installed: pip install coremltools") from None
    if args.arch:
        pipe = random_pipeline(args.arch)
    elif not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"no such checkpoint: {args.checkpoint}")
    else:
        from snapfusion_min import load_pipeline

        pipe = load_pipeline(args.checkpoint, device="cpu", dtype="float32")
    resolution = args.resolution or pipe.sampler["resolution"]
    step = pipe.vae.cfg.factor * 2 ** (len(pipe.unet.spec.channels) - 1)  # latent must survive the UNet's downsamples
    if resolution <= 0 or resolution % step:
        raise ValueError(f"--resolution must be a positive multiple of {step} for this model, got {resolution}")
    paths = export(pipe, Path(args.out), parts, resolution, args.batch, args.precision, args.attention)
    if args.verify:
        verify(pipe, paths, resolution, args.batch)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"export.py: error: {e}")
