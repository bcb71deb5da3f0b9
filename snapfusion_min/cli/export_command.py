"""Export a pipeline to Core ML: text encoder, UNet (any architecture spec) and (pruned) decoder as .mlpackage files.

    python export.py --out-dir exports/toy                              # the bundled toy model, fp16
    python export.py --checkpoint distilled.safetensors --unet-batch 1  # a guidance-free student: UNet batch 1
    python export.py --checkpoint v1-5-pruned-emaonly.safetensors --resolution 512 --parts unet \\
        --attention split_einsum --out-dir exports/sd15                 # Neural Engine-style attention
    python export.py --out-dir exports/toy --verify                     # macOS: run each model, compare to torch
    python export.py --checkpoint sd15-v.safetensors --to diffusers --out-dir sd15-v   # a diffusers folder instead
    python export.py --to onnx --out-dir exports/onnx                   # ONNX files (fp32), checked in ONNX Runtime
    python export.py --to onnx --shapes dynamic --remove up2.A0         # free batch and size; a block switched off

Models go through torch.export into ML Programs (coremltools), fixed shapes from --resolution, named inputs and
outputs. The settings an app needs to sample (architecture spec, prediction type, scheduler, steps, guidance, latent
scale) are stored in every package's metadata and in <out-dir>/snapfusion_min.json.

``--to diffusers`` writes the pipeline as a diffusers folder instead (``StableDiffusionPipeline.from_pretrained``):
SD-v1.5's block layout (any widths) and an unpruned decoder only -- diffusers' classes cannot express the others.

``--to onnx`` writes <part>.onnx files (fp32; ONNX Runtime, OpenVINO, onnxruntime-web), each run in ONNX Runtime
against torch before it is kept, with snapfusion_min.json (settings, timestep grid, abar_t, tokenizer files) and
CLIP's vocab.json / merges.txt. Needs the extra: pip install 'snapfusion-min[onnx]'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..arch import preset
from ..export.compress import COMPRESSIONS
from ..export.coreml import (
    ATTENTIONS,
    LAYOUTS,
    PARTS,
    PRECISIONS,
    ExportOptions,
    check_resolution,
    export,
    load_coremltools,
    verify,
)
from ..export.diffusers_folder import save_diffusers
from ..export.onnx import MAX_RELATIVE_ERROR, SHAPES, export_onnx, load_onnxruntime
from ..pipeline import Pipeline, SamplerConfig, random_pipeline, read_pipeline
from ..toy import BUNDLED
from ..toy.tables import remove_blocks
from . import check_writable, flag, parser, run


def build_parser():  # noqa: ANN201
    p = parser(__doc__)
    flag(p, "--checkpoint", str(BUNDLED / "model.safetensors"), "default: the bundled toy model")
    p.add_argument("--arch", help="instead of a checkpoint: a randomly initialised preset (sd15, snapfusion) at SD's "
                                  "widths, to measure conversion time and package size")
    flag(p, "--out-dir", "exports")
    p.add_argument("--to", choices=["coreml", "onnx", "diffusers"], default="coreml",
                   help="coreml: .mlpackage files; onnx: .onnx files (fp32); diffusers: a diffusers folder at "
                        "--out-dir (new or empty)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of these")
    p.add_argument("--resolution", type=int, help="image size (default: the checkpoint's)")
    p.add_argument("--unet-batch", type=int, choices=[1, 2], default=2,
                   help="UNet batch: 2 for CFG, 1 without (with --shapes dynamic: the example traced)")
    flag(p, "--remove", [], "the exported UNet runs it so", action="append")
    p.add_argument("--keep-input", action="store_true",
                   help="onnx: the UNet takes one more input, keep, a weight in [0, 1] per block (1 runs it, 0 drops "
                        "it as Eq. 5): Fig. 5's removals at run time (the browser page's toggles)")
    p.add_argument("--shapes", choices=SHAPES, default="static",
                   help="onnx: static (the traced sizes) or dynamic (batch and latent height / width free)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="of the weights and the compute (default: fp16; --to onnx writes fp32)")
    p.add_argument("--attention", choices=ATTENTIONS, default="default",
                   help="split_einsum: the Neural Engine-friendly attention of Apple's ml-stable-diffusion")
    p.add_argument("--layout", choices=LAYOUTS, default="snapfusion",
                   help="apple: the file names and input/output conventions of Apple's Swift StableDiffusionPipeline "
                        "(TextEncoder, Unet or UnetChunk1/2, VAEDecoder, vocab.json, merges.txt; the UNet outputs "
                        "eps); compile with xcrun coremlcompiler (docs/export.md)")
    p.add_argument("--chunk", action="store_true",
                   help="the UNet as two packages of about equal size, cut at a block boundary of its spec")
    p.add_argument("--compress", choices=list(COMPRESSIONS),
                   help="weights: k-means palettization to 8/6/4 bits (fp16 lookup tables; needs kmeans1d) or int8 "
                        "linear quantization (default: none, fp16)")
    p.add_argument("--verify", action="store_true",
                   help="run each package and compare with torch: PSNR, pass at >= 35 dB (macOS only)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not parts or set(parts) - set(PARTS):
        raise ValueError(f"--parts must be a subset of {','.join(PARTS)}, got {args.parts!r}")
    if args.verify and sys.platform != "darwin":
        raise ValueError("--verify runs Core ML models, which needs macOS; export without --verify here")
    refuse_unused(args)
    check_writable(args.out_dir, folder=True)
    if args.to == "diffusers":
        return to_diffusers(args)
    if args.to == "onnx":
        load_onnxruntime()
    else:
        load_coremltools()
        options = ExportOptions(precision=args.precision or "fp16", attention=args.attention, layout=args.layout,
                                chunk=args.chunk, compress=args.compress)
        options.check(args.unet_batch)
    if args.arch:
        pipe = random_pipeline(preset(args.arch), source=f"random-{args.arch}", sampler=SamplerConfig())
    else:
        pipe = read_pipeline(args.checkpoint)
    remove_blocks(pipe, args.remove)
    resolution = pipe.sampler.resolution if args.resolution is None else args.resolution
    check_resolution(pipe, resolution)
    if args.to == "onnx":
        return to_onnx(pipe, args, parts, resolution)
    paths = export(pipe, Path(args.out_dir), parts, resolution=resolution, batch=args.unet_batch, options=options)
    if args.verify and not verify(pipe, paths, resolution, args.unet_batch, options):
        raise SystemExit(1)


def refuse_unused(args: argparse.Namespace) -> None:
    """An option the chosen --to does not use is a mistake said in one line, before any work."""
    coreml = [("--precision", args.precision not in (None, "fp32") if args.to == "onnx" else args.precision),
              ("--attention", args.attention != "default"), ("--layout", args.layout != "snapfusion"),
              ("--chunk", args.chunk), ("--compress", args.compress), ("--verify", args.verify)]
    onnx_only = [("--shapes", args.shapes != "static"), ("--keep-input", args.keep_input)]
    unused = {"coreml": onnx_only,
              "onnx": coreml,
              "diffusers": [*coreml, *onnx_only, ("--arch", args.arch), ("--resolution", args.resolution),
                            ("--remove", args.remove)]}[args.to]
    given = [name for name, used in unused if used]
    if given:
        raise ValueError(f"{', '.join(given)}: not used with --to {args.to}")


def to_onnx(pipe: Pipeline, args: argparse.Namespace, parts: list[str], resolution: int) -> None:
    """--to onnx: every file run in ONNX Runtime against torch before it is kept; exit 1 if one is off."""
    rows = export_onnx(pipe, Path(args.out_dir), parts, resolution=resolution, batch=args.unet_batch,
                       shapes=args.shapes, gated=args.keep_input)
    bad = [f"{row['file']} {row['max_relative_error']:.1e}" for row in rows.values()
           if row["max_relative_error"] > MAX_RELATIVE_ERROR]
    if bad:
        print(f"ONNX Runtime differs from torch by more than {MAX_RELATIVE_ERROR:g} (relative): {', '.join(bad)}",
              file=sys.stderr)
        raise SystemExit(1)


def to_diffusers(args: argparse.Namespace) -> None:
    """--to diffusers: a used folder refused first; an evolved UNet or a pruned decoder once the checkpoint is read,
    before anything is written."""
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out-dir {out} is not empty; a diffusers folder needs a new or empty one")
    pipe = read_pipeline(args.checkpoint)  # save_diffusers refuses before writing
    print(f"wrote {save_diffusers(pipe, out)} (diffusers' StableDiffusionPipeline; sample with "
          f"num_inference_steps={pipe.sampler.steps}, guidance_scale={pipe.sampler.guidance:g})")


def entry() -> None:
    """``python export.py``, ``snapfusion-export``, ``python -m snapfusion_min export``; a mistake is one line."""
    run(main)
