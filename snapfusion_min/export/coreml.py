"""Core ML export (Apple's ml-stable-diffusion, the paper's iPhone deployment): text encoder, UNet of any
architecture spec, and the (pruned) decoder, each converted on its own through torch.export into an ML Program, with
fixed shapes, named inputs and outputs, and the settings an app needs to sample in every package's metadata.

What the packages compute is in ``parts`` (our layout or Apple's, the UNet whole or in two chunks); weight
compression (palettization, int8) and its error in ``coreml_compress``; ``verify`` runs them on macOS.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..formats.checkpoint import atomic_write, full_disk_said
from ..pipeline import Pipeline
from ..text_encoder import write_bpe_files
from ..unet import Attention
from .compress import check_compression, compress, package_bytes
from .parts import PARTS, Package, balanced_cut, packages, sampling_settings

LAYOUTS = ("snapfusion", "apple")  # apple: the names and conventions Apple's Swift StableDiffusionPipeline loads
PSNR_PASS = 35.0  # dB: ml-stable-diffusion's bound for a converted model's outputs vs torch
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
        import coremltools  # here, not at the top: seconds to import, and only export needs it
    except ImportError:
        raise ValueError("coremltools is not installed: pip install coremltools") from None
    return coremltools


def metadata(pipe: Pipeline, resolution: int, batch: int, options: ExportOptions) -> dict:
    """What an app needs to sample without guessing (and how the packages were made)."""
    return {**sampling_settings(pipe, resolution, batch), **dataclasses.asdict(options),
            "unet_output": "eps" if options.layout == "apple" else pipe.prediction}


def convert(module: nn.Module, inputs: dict, outputs: list[str], precision: str, meta: dict) -> object:
    """torch.export -> coremltools ML Program with the given input / output names and metadata."""
    ct = load_coremltools()

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


@dataclass(frozen=True)
class ExportOptions:
    """How to write the packages: weight precision, attention kernel, file layout (ours, or Apple's Swift
    pipeline's), the UNet in two chunks, and weight compression (``coreml_compress.COMPRESSIONS``)."""

    precision: str = "fp16"
    attention: str = "default"
    layout: str = "snapfusion"
    chunk: bool = False
    compress: str | None = None

    def check(self, batch: int) -> None:
        """ValueError for a setting that cannot be written, before any work."""
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "apple" and batch != 2:
            raise ValueError("Apple's Swift pipeline runs the UNet at batch 2 (CFG's two halves): use --unet-batch 2")
        check_compression(self.compress, self.precision)


def export(pipe: Pipeline, out: Path, parts: list[str], *, resolution: int = 64, batch: int = 2,
           options: ExportOptions = ExportOptions(), log: bool = True) -> dict[str, Path]:
    """Write one .mlpackage per package of each part (two for a chunked UNet), ``snapfusion_min.json`` with the
    settings, sizes and weight errors, and in Apple's layout the tokenizer's vocab.json and merges.txt. Returns the
    package paths by package name."""
    options.check(batch)
    if options.layout == "apple" and pipe.unet.spec.guidance_embed:
        raise ValueError("a w-conditioned UNet takes the guidance scale as an input, which Apple's Swift pipeline "
                         "does not feed: export it with --layout snapfusion")
    for m in pipe.unet.modules():
        if isinstance(m, Attention):
            m.split_einsum = options.attention == "split_einsum"
    pipe.unet.to(memory_format=torch.contiguous_format)
    out.mkdir(parents=True, exist_ok=True)
    meta = metadata(pipe, resolution, batch, options)
    if options.chunk:
        k = balanced_cut(pipe.unet)
        stage, name, _ = pipe.unet.plan()[k - 1]
        meta["chunk_after"] = f"{stage}.{name}"  # the last block of the first chunk (plan step k - 1)
    paths, report = {}, {}
    for part in parts:
        for pkg in packages(pipe, part, resolution, batch, layout=options.layout, chunk=options.chunk):
            paths[pkg.name], report[pkg.name] = write_package(pkg, out, meta, options)
            if log:
                print(describe(pkg.name, report[pkg.name]), file=sys.stderr)
    if options.layout == "apple":
        write_bpe_files(out)
    sidecar = out / "snapfusion_min.json"  # a second export into the folder (e.g. a pruned decoder) adds its rows
    earlier = json.loads(sidecar.read_text()).get("packages", {}) if sidecar.exists() else {}
    report = {**{k: v for k, v in earlier.items() if (out / v["file"]).exists()}, **report}
    atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps({**meta, "packages": report}, indent=1)))
    return paths


def write_package(pkg: Package, out: Path, meta: dict, options: ExportOptions) -> tuple[Path, dict]:
    """Convert (and compress) one package; saved beside its path and renamed into place, replacing an earlier
    export of the same name (said in its row: 'replaced'). Returns the path and its row of the report."""
    start = time.perf_counter()
    model = convert(pkg.module, pkg.inputs, pkg.outputs, options.precision,
                    {**meta, "part": pkg.part, "package": pkg.name})
    row = {}
    if options.compress:
        model, row["weight_error"] = compress(model, options.compress)
    path, tmp = out / f"{pkg.name}.mlpackage", out / f".{pkg.name}.partial.mlpackage"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with full_disk_said(out, path.name):
            model.save(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial package left behind
        raise
    del model
    if path.exists():
        row["replaced"] = True
        shutil.rmtree(path)
    tmp.rename(path)
    row.update(file=path.name, source=meta["source"], bytes=package_bytes(path),
               seconds=round(time.perf_counter() - start, 1))
    return path, row


def describe(name: str, row: dict) -> str:
    """One line per written package: size, time, and the weight error compression introduced."""
    text = f"{row['file']}: {row['bytes'] / 1e6:.1f} MB, {row['seconds']:.1f} s"
    if row.get("replaced"):
        text += " (replaced the earlier one)"
    if "weight_error" in row:
        e = row["weight_error"]
        text += f", weight error {e['relative']:.2e} (worst tensor {e['worst']:.2e}, {e['tensors']} compressed)"
    return text


def output_psnr(got: torch.Tensor, want: torch.Tensor) -> float:
    """PSNR of a Core ML output against torch's, with the reference's largest |value| as the peak: the check of
    Apple's ml-stable-diffusion, which calls >= 35 dB a pass (``PSNR_PASS``)."""
    rms = ((got.double() - want.double()) ** 2).mean().sqrt().clamp_min(1e-12)
    return 20 * math.log10(max(want.abs().max().item(), 1e-12) / rms.item())


def verify(pipe: Pipeline, paths: dict[str, Path], resolution: int, batch: int,
           options: ExportOptions = ExportOptions()) -> bool:
    """macOS only: each written package on its example inputs vs torch; prints per package the lowest PSNR of its
    outputs and pass/fail against Apple's 35 dB; True if all pass."""
    ct = load_coremltools()
    ok = True
    for part in PARTS:
        for pkg in packages(pipe, part, resolution, batch, layout=options.layout, chunk=options.chunk):
            if pkg.name not in paths:
                continue
            with torch.no_grad():
                want = pkg.module.eval()(*pkg.inputs.values())
            want = want if isinstance(want, tuple) else (want,)
            got = ct.models.MLModel(str(paths[pkg.name])).predict({k: v.numpy() for k, v in pkg.inputs.items()})
            psnr = min(output_psnr(torch.from_numpy(got[n]).float(), w) for n, w in zip(pkg.outputs, want))
            ok &= psnr >= PSNR_PASS
            verdict = "pass" if psnr >= PSNR_PASS else "FAIL"
            print(f"{pkg.name}: PSNR {psnr:.1f} dB vs torch ({verdict}; Apple's bound {PSNR_PASS:.0f} dB)")
    return ok


def check_resolution(pipe: Pipeline, resolution: int) -> None:
    """The latent must survive the UNet's downsamples: a positive multiple of factor * 2^(levels - 1)."""
    step = pipe.vae.cfg.factor * 2 ** (len(pipe.unet.spec.channels) - 1)
    if resolution <= 0 or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of {step} for this model, got {resolution}")
