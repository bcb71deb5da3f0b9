"""Is bfloat16 safe for the image? PSNR of images drawn with every part in bf16 against the same images in fp32; and
how much an image depends on the batch it was drawn in (one batch against one image at a time, same seeds).

    python bench/bf16_psnr.py               # the bundled toy model, and random weights in SD-v1.5's layout (small)
    python bench/bf16_psnr.py --full-size   # also SD-v1.5's full-size decoder and text encoder (slow on a CPU
                                            # without native bf16)

The gate is 35 dB, the parity bound Apple's Core ML converter uses; ``tests/test_pipeline.py`` holds the first two
rows to it. Random weights are drawn at a sane scale (N(0, 1/fan_in)), so no layer is silent.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from snapfusion_min import read_pipeline
from snapfusion_min.arch import tiny
from snapfusion_min.eval.metrics import psnr
from snapfusion_min.pipeline import SamplerConfig, native_bf16, random_pipeline
from snapfusion_min.text_encoder import TextConfig, TextEncoder, Tokenizer
from snapfusion_min.vae import VAE, VAEConfig

TOY = Path(__file__).resolve().parent.parent / "models" / "toy" / "model.safetensors"
TOY_PROMPTS = ["a large red circle at the top left on a gray background",
               "a small blue square in the center on a white background",
               "a large yellow triangle at the bottom right on a black background",
               "a small purple cross at the top right on a gray background"]


def sane(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape,
                                                                                                      generator=g))
    return model.eval()


def pipelines(make) -> float:  # noqa: ANN001
    """PSNR of a whole generation (text encoder, UNet, decoder) in bf16 vs fp32."""
    fp32, bf16 = make(), make().to(dtype=torch.bfloat16)
    prompts = TOY_PROMPTS[:2]
    return psnr(fp32(prompts, seed=3, output_type="pt"), bf16(prompts, seed=3, output_type="pt"))


def batch_dependence(pipe, dtype: torch.dtype) -> str:  # noqa: ANN001
    """8 images drawn as one batch and one at a time (image i from seed 3 + i, as sample.py draws them): the largest
    difference of an 8-bit pixel, and PSNR. Kernels may block a batched matmul differently by batch size; in fp32
    the sums agree to rounding below 1/255, in bf16 they need not."""
    pipe = pipe.to(dtype=dtype)
    prompts = TOY_PROMPTS * 2
    whole = pipe(prompts, seed=3, output_type="pt")
    alone = torch.cat([pipe([p], seed=3 + i, output_type="pt") for i, p in enumerate(prompts)])
    levels = ((whole * 255).round() - (alone * 255).round()).abs()
    return (f"max {levels.max().item():3.0f}/255, {(levels > 0).float().mean().item():6.2%} of pixels differ, "
            f"PSNR {psnr(whole, alone):5.1f} dB")


def random_sd_layout():  # noqa: ANN201
    """SD-v1.5's layout (every block kind, CFG, SD's VAE shape at small widths), random weights."""
    pipe = random_pipeline(tiny(32), VAEConfig(channels=(32, 64, 64, 64), decoder_channels=(64, 64, 64, 32),
                                               layers=1, groups=8, decoder_groups=8),
                           TextConfig(width=32, layers=2, heads=2, context_length=16),
                           sampler=SamplerConfig(steps=4, guidance=3.0, spacing="trailing", resolution=64))
    for i, m in enumerate((pipe.unet, pipe.vae, pipe.text_encoder)):
        sane(m, i)
    return pipe


def full_size() -> None:
    """SD-v1.5's full-size decoder (a 128x128 image) and text encoder, random weights."""
    vae = sane(VAE(VAEConfig()), 2)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = (vae.decode(z) / 2 + 0.5).clamp(0, 1)
        start = time.perf_counter()
        b = (vae.to(torch.bfloat16).decode(z.bfloat16()).float() / 2 + 0.5).clamp(0, 1)
        print(f"SD-v1.5 decoder, full size, 128x128 image    : {psnr(a, b):5.1f} dB  "
              f"(bf16 decode {time.perf_counter() - start:.0f} s)")
        te = sane(TextEncoder(TextConfig()), 1)
        ids = Tokenizer(77)(["a photograph of an astronaut riding a horse", ""])
        c = te(ids)
        err = ((te.to(torch.bfloat16)(ids).float() - c).norm() / c.norm()).item()
        print(f"SD-v1.5 text encoder, full size: relative error of the embeddings {err:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full-size", action="store_true", help="also SD-v1.5's full-size decoder and text encoder")
    args = p.parse_args()
    print(f"cpu, {torch.get_num_threads()} threads, native bf16: {native_bf16()}; PSNR of bf16 vs fp32 images "
          "(gate: 35 dB)")
    print(f"bundled toy model, 20 steps, 64x64             : {pipelines(lambda: read_pipeline(TOY)):5.1f} dB")
    print(f"random weights, SD-v1.5 layout (small), 4 steps : {pipelines(random_sd_layout):5.1f} dB")
    for dtype in (torch.float32, torch.bfloat16):
        print(f"batch of 8 vs one at a time, toy model, {str(dtype)[6:]:8s}: "
              f"{batch_dependence(read_pipeline(TOY), dtype)}")
    if args.full_size:
        full_size()


if __name__ == "__main__":
    main()
