"""Shared test helpers: random weights of a sane scale, error measures, tiny pipelines, running a script."""

from __future__ import annotations

import dataclasses
import io
import math
import runpy
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from snapfusion_min.arch import ArchSpec, tiny
from snapfusion_min.pipeline import Pipeline, SamplerConfig
from snapfusion_min.text_encoder import TextConfig, TextEncoder, write_bpe_files
from snapfusion_min.unet import UNet
from snapfusion_min.vae import TOY_VAE, VAE, VAEConfig

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "models" / "toy" / "clip.safetensors"
TINY_SAMPLER = SamplerConfig(steps=4, guidance=3.0, spacing="trailing", resolution=64)


def random_model(build: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """``randomize(build())`` without the default initialisation (16 s for SD-v1.5's UNet): built on the meta device,
    then every parameter filled by ``randomize``. Only for models without buffers, which it would leave empty."""
    with torch.device("meta"):
        model = build()
    assert not list(model.buffers()), "random_model would leave the buffers uninitialised"
    return randomize(model.to_empty(device="cpu"), seed)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with random values of a sane scale (no zero-initialised layer hides a mapping bug)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=g)  # 1 / sqrt(fan-in)
            elif "norm" in name and name.endswith("weight") or name.endswith("ln_1.weight"):
                p.normal_(1, 0.1, generator=g)
            else:
                p.normal_(0, 0.1, generator=g)
    return model


def trailing(n: int) -> list[int]:
    """diffusers' trailing timesteps, round(arange(1000, 0, -1000/n)) - 1, then the clean data (-1): an independent
    statement of the grid ``diffusion.timesteps(n, "trailing")`` must equal."""
    return [int(t) for t in np.round(np.arange(1000, 0, -1000 / n)) - 1] + [-1]


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the reference output's scale (its max magnitude)."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def few_blocks(context: int = 32) -> ArchSpec:
    """``tiny`` with 14 of its 38 blocks, every kind of stage and block still there: for Core ML conversions, whose
    time grows with the number of ops."""
    stages = {"down1": "R0", "down2": "R0 A0", "down3": "R0", "mid_down": "", "mid": "R0 A0", "mid_up": "R0",
              "up1": "R0 R1", "up2": "R0 A0 R1", "up3": "R0 R1"}
    return dataclasses.replace(tiny(context), stages={s: tuple(b.split()) for s, b in stages.items()})


def tiny_pipeline(seed: int = 0, prediction: str = "v", context: int = 32, sampler: SamplerConfig = TINY_SAMPLER,
                  vae: VAEConfig = TOY_VAE, latent_scale: float = 0.5, arch: ArchSpec | None = None) -> Pipeline:
    """The tiny UNet preset (or ``arch``), the toy autoencoder's shapes and a one-layer text encoder, all with random
    weights."""
    text = randomize(TextEncoder(TextConfig(width=context, layers=1, heads=2, context_length=16)), seed + 1)
    return Pipeline(randomize(UNet(arch or tiny(context)), seed), randomize(VAE(vae), seed + 2), text,
                    prediction=prediction, latent_scale=latent_scale, sampler=sampler, source="tiny.safetensors")


def run_script(script: str, *args: str, torchrun: bool = False, cwd: Path = ROOT,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one of the top-level scripts as a user would (a subprocess), capturing its output. No time limit: a slow
    machine is not a failure; a hang is caught by pytest-timeout (pyproject.toml)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] \
        if torchrun else [sys.executable]
    return subprocess.run([*launcher, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd, env=env)


def run_main(script: str, *args: str) -> int | str | None:
    """Run a script as ``__main__`` in this process (no interpreter start-up): its exit code, or the one-line error
    message ``cli.run`` exits with. Any other exception (a traceback a user would see) propagates."""
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv
    return 0


def one_line_error(r: subprocess.CompletedProcess, message: str) -> bool:
    """A user's mistake: non-zero exit, one line on stderr naming the problem, no traceback."""
    lines = r.stderr.strip().splitlines()
    return r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr and len(lines) == 1


def sd_tokenizer(folder: Path):  # noqa: ANN201
    """SD-v1.5's CLIPTokenizer (transformers), its vocab.json / merges.txt rebuilt from the BPE file open_clip ships."""
    from transformers import CLIPTokenizer

    write_bpe_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A small PNG whose header says width x height (a decompression bomb's header: decoding it would take GBs)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    png = bytearray(buffer.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # and its CRC
    return bytes(png)
