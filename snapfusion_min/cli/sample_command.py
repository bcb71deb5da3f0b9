"""Text -> PNG files with any checkpoint: SD-v1.5 single file, diffusers folder, or a snapfusion-min checkpoint.

    python sample.py --prompt "a red circle at the top left on a gray background"
    python sample.py --checkpoint v1-5-pruned-emaonly.safetensors --prompt "an astronaut riding a horse" \\
        --num-inference-steps 50 --guidance 7.5 --height 512 --width 512

Sampling is DDIM (paper Eq. 2) with classifier-free guidance (Eq. 3). Image i of a run uses seed + i (with
--num-images-per-prompt n, each prompt counts n times in a row), so the same seed gives the same images whatever the
batch size (in fp32 within one of 255 levels; in bf16 a quarter of the pixels move, by up to 57: docs/speed.md), and
the ones ``pipe(prompts, seed=..., num_images_per_prompt=n)`` gives in Python. Files are named <seed>-<prompt>.png
and never overwritten (a second run into the same folder writes <seed>-<prompt>-2.png). Steps,
guidance, spacing and resolution default to what the checkpoint says it was trained for (a distilled student: its
own N steps), else to SD-v1.5's 50 / 7.5 / 512; so does ``pipe(prompts)``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from .. import load_pipeline
from ..diffusion import SOLVERS, SPACINGS
from ..eval.coco import read_prompt_file
from ..export.runtimes import RUNTIMES, RuntimePipeline
from ..formats.checkpoint import atomic_create
from ..pipeline import Pipeline, SamplerConfig, auto_dtype, check_seed, pick_dtype
from ..toy import BUNDLED
from . import check_writable, flag, parser, run

MODEL = BUNDLED / "model.safetensors"
CPU = torch.device("cpu")


def build_parser():  # noqa: ANN201
    p = parser(__doc__)
    flag(p, "--checkpoint", str(MODEL), "default: the bundled toy model, models/toy/model.safetensors")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    flag(p, "--prompts-file")
    p.add_argument("--num-images-per-prompt", "--num_images_per_prompt", type=int, default=1,
                   help="images of each prompt, each from its own seed")
    p.add_argument("--negative-prompt", default="", help="text for the unconditional half of CFG (default: empty)")
    flag(p, "--num-inference-steps", None, "default: the checkpoint's, else 50")
    flag(p, "--guidance", None, "default: the checkpoint's, else 7.5")
    flag(p, "--spacing", None, "default: the checkpoint's, else leading", choices=SPACINGS)
    flag(p, "--solver", None, "default: the checkpoint's, else ddim", choices=SOLVERS)
    flag(p, "--seed", 0, "image i uses seed + i")
    p.add_argument("--height", type=int, help="image height, a multiple of 8 (default: checkpoint's, else 512)")
    p.add_argument("--width", type=int, help="image width, a multiple of 8 (default: checkpoint's, else 512)")
    flag(p, "--batch-size", 4, "prompts per forward pass")
    flag(p, "--out-dir", "samples")
    flag(p, "--device", "auto")
    flag(p, "--dtype", "auto")
    p.add_argument("--ema", action="store_true", help="use the EMA UNet of an SD-v1 .ckpt/.safetensors file")
    p.add_argument("--decoder", help="decode with the (pruned, §3.2) autoencoder of this checkpoint")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the checkpoint's prediction type")
    p.add_argument("--runtime", choices=["torch", *RUNTIMES], default="torch",
                   help="run the networks in PyTorch, or in ONNX Runtime / OpenVINO on the CPU (--checkpoint: a folder "
                        "export.py --to onnx wrote; docs/speed.md says which is faster where)")
    return p


def read_prompts(args) -> list[str]:  # noqa: ANN001
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompt_file(args.prompts_file, seed=args.seed)
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    return prompts


def slug(text: str, n: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "image"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    prompts = read_prompts(args)
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.num_images_per_prompt <= 0:
        raise ValueError(f"--num-images-per-prompt must be positive, got {args.num_images_per_prompt}")
    prompts = [prompt for prompt in prompts for _ in range(args.num_images_per_prompt)]  # as pipe(...) repeats them
    try:
        check_seed(args.seed, len(prompts))  # the API's bound, named as the flag
    except ValueError:
        raise ValueError(f"--seed {args.seed} is out of range: image i uses seed + i, a 64-bit seed, so --seed must be "
                         f"in [-2**63, 2**63 - {len(prompts)}] for {len(prompts)} image(s)") from None
    if args.checkpoint == str(MODEL) and not MODEL.is_file():
        raise FileNotFoundError(f"the bundled toy model is not in this checkout ({MODEL}); pass --checkpoint")
    check_writable(args.out_dir, folder=True)
    pipe = load_pipeline(args.checkpoint, ema=args.ema, prediction=args.prediction, device=args.device,
                         dtype=args.dtype) if args.runtime == "torch" else runtime_pipeline(args)
    if args.decoder:
        other = load_pipeline(args.decoder, device=args.device, dtype=args.dtype)
        pipe.set_decoder(other.vae, other.latent_scale)
    s = pipe.sampler_with(steps=args.num_inference_steps, guidance=args.guidance, spacing=args.spacing,
                          solver=args.solver)
    height, width = (s.resolution if v is None else v for v in (args.height, args.width))
    if isinstance(pipe, RuntimePipeline):
        pipe.latent_shape(height, width)  # a static export's own size only
    elif height % (f := pipe.vae.cfg.factor) or width % f or height <= 0 or width <= 0:
        raise ValueError(f"--height and --width must be positive multiples of {f}, got {height}x{width}")
    out = Path(args.out_dir)
    made = [] if out.is_dir() else [out, *(p for p in out.parents if not p.exists())]  # removed again if left empty
    out.mkdir(parents=True, exist_ok=True)
    try:
        write_images(args, pipe, s, prompts, height, width, out)
    except BaseException:
        for folder in made:  # a run that fails leaves no empty folder behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def runtime_pipeline(args) -> RuntimePipeline:  # noqa: ANN001
    """--runtime onnxruntime / openvino: the exported folder in that runtime; options it cannot honour refused. The
    precision follows --dtype: auto is bf16 in OpenVINO where the CPU has it natively (as torch's auto), else fp32."""
    unused = [name for name, given in (("--ema", args.ema), ("--decoder", args.decoder),
                                       ("--prediction", args.prediction),
                                       ("--device", args.device not in ("auto", "cpu"))) if given]
    if unused:
        raise ValueError(f"{', '.join(unused)}: not used with --runtime {args.runtime} (it runs on the CPU what "
                         "export.py --to onnx wrote)")
    folder = Path(args.checkpoint)
    if not (folder / "snapfusion_min.json").is_file():
        raise ValueError(f"--runtime {args.runtime} samples a folder export.py --to onnx wrote; {folder} is not one "
                         f"(python export.py --to onnx --checkpoint {folder} --out-dir onnx, then --checkpoint onnx)")
    dtype = torch.float32 if args.dtype == "auto" and args.runtime == "onnxruntime" else pick_dtype(args.dtype, CPU)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16" if args.runtime == "openvino" else None}.get(dtype)
    if precision is None:
        kinds = "float32 or bfloat16" if args.runtime == "openvino" else "float32"
        raise ValueError(f"--dtype {args.dtype}: {args.runtime} runs {kinds} here")
    return RuntimePipeline(folder, args.runtime, precision)


def write_images(args, pipe: Pipeline | RuntimePipeline, s: SamplerConfig, prompts: list[str], height: int, width: int,  # noqa: ANN001
                 out: Path) -> None:
    """Sample ``prompts`` in batches, each image a PNG with its settings in the metadata, never over a file."""
    where = pipe.where if isinstance(pipe, RuntimePipeline) else (
        f"{pipe.device} {str(pipe.dtype).removeprefix('torch.')}"
        f"{f' ({auto_dtype(pipe.device)[1]})' if args.dtype == 'auto' else ''}")
    print(f"{pipe.source}: {pipe.prediction}-prediction, {s.steps} {s.solver} steps ({s.spacing}), "
          f"guidance {s.guidance}, {height}x{width}, {where}; {len(prompts):,} image"
          f"{'s' if len(prompts) > 1 else ''} into {out}", file=sys.stderr)
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="batches", disable=len(prompts) <= args.batch_size):
        batch = prompts[start:start + args.batch_size]
        images = pipe(batch, s, seed=args.seed + start, height=height, width=width,
                      negative_prompt=args.negative_prompt, progress=True)
        for i, (prompt, image) in enumerate(zip(batch, images)):
            meta = PngInfo()
            for key, value in (("prompt", prompt), ("negative_prompt", args.negative_prompt),
                               ("seed", args.seed + start + i), ("steps", s.steps), ("guidance", s.guidance),
                               ("spacing", s.spacing), ("sampler", s.solver), ("checkpoint", pipe.source)):
                meta.add_text(key, str(value))
            # named by the image's own seed; never over an existing file (a second run gets <name>-2.png)
            print(atomic_create(out, f"{args.seed + start + i:04d}-{slug(prompt)}", ".png",
                                lambda tmp, image=image, meta=meta: image.save(tmp, format="PNG", pnginfo=meta)))


def entry() -> None:
    """``python sample.py``, ``snapfusion-sample``, ``python -m snapfusion_min sample``; a mistake is one line."""
    run(main)
