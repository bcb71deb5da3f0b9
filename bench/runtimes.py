"""Our PyTorch against the CPU runtimes users pick -- ONNX Runtime and OpenVINO -- on the same weights, timed side by
side in one run (interleaved rounds): the SD-v1.5 and Table 3 UNets at 64x64 latents, batch 2 (one CFG step), and
the bundled toy pipeline end to end. docs/speed.md keeps the figures.

    python bench/runtimes.py                         # all three, median of 3 (about 25 minutes on 2 cores)
    python bench/runtimes.py --models toy --repeat 7

Each UNet (freshly initialised: only shapes matter for speed) is exported once by export.py's code (ONNX, fp32,
checked against torch) to a scratch folder. Variants: torch fp32, and bf16 where the CPU has it natively; ONNX
Runtime fp32, and int8 (its dynamic quantization of the same file: int8 weights); OpenVINO fp32 and bf16 (its
inference precision hint) and int8 (the same int8 file). Each row says how far its output is from torch fp32.
Needs the runtimes: pip install -e '.[onnx,openvino]'.
"""

from __future__ import annotations

import argparse
import copy
import gc
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from snapfusion_min import read_pipeline
from snapfusion_min.arch import preset
from snapfusion_min.cost import cpu_flags, median_times
from snapfusion_min.eval.metrics import psnr
from snapfusion_min.export.onnx import export_onnx, relative_error
from snapfusion_min.export.parts import packages
from snapfusion_min.export.runtimes import RuntimePipeline, open_file
from snapfusion_min.pipeline import native_bf16, random_pipeline
from snapfusion_min.vae import VAEConfig

TOY = Path(__file__).resolve().parents[1] / "models" / "toy" / "model.safetensors"
PROMPT = "a large red striped circle at the top left and a blue square on a dark background"
SMALL_VAE = VAEConfig(channels=(32, 32, 32, 32), decoder_channels=(32, 32, 32, 32), layers=1, groups=8,
                      decoder_groups=8)  # the UNet's latents (factor 8) without SD's 84M-parameter VAE: not timed


def quantized(src: Path) -> Path:
    """ONNX Runtime's dynamic quantization of ``src``: int8 weights (MatMul and Conv), activations quantized at
    run time; written beside it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = src.with_name(f"{src.stem}.int8.onnx")
    quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8, use_external_data_format=True)
    return out


def runtime_label(runtime: str, kind: str) -> str:
    return f"{'ONNX Runtime' if runtime == 'onnxruntime' else 'OpenVINO'} {kind}"


def unet_rows(name: str, work: Path, bf16: bool, repeat: int) -> None:
    """One UNet: torch fp32 against each other variant, a pair at a time (SD-v1.5's size does not fit in memory
    seven times), each pair timed side by side; the error is against torch fp32's output on the same inputs."""
    pipe = random_pipeline(preset(name), SMALL_VAE)
    folder = work / name
    export_onnx(pipe, folder, ["unet"], resolution=512, batch=2)
    files = {"fp32": folder / "unet.onnx", "int8": quantized(folder / "unet.onnx")}
    (pkg,) = packages(pipe, "unet", 512, 2)
    feed = {k: v.numpy() for k, v in pkg.inputs.items()}
    unet = pkg.module.eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = unet(*pkg.inputs.values())

    def opened(runtime: str, precision: str, file: str) -> Callable[[], object]:
        run = open_file(files[file], runtime, precision)
        return lambda: run(feed)[0]

    makers = {**({"torch bf16": lambda: unet_bf16(pkg)} if bf16 else {}),
              **{runtime_label(r, f if f == "int8" else p): (lambda r=r, p=p, f=f: opened(r, p, f))
                 for r, p, f in [("onnxruntime", "fp32", "fp32"), ("onnxruntime", "fp32", "int8"),
                                 ("openvino", "fp32", "fp32"), *[("openvino", "bf16", "fp32")] * bf16,
                                 ("openvino", "fp32", "int8")]}}
    pairs(f"{name} UNet, batch 2, 64x64 latents (one CFG step)", lambda: unet(*pkg.inputs.values()), makers,
          lambda out: relative_error(np.asarray(out if isinstance(out, np.ndarray) else out.float()), want),
          "relative error vs torch fp32", repeat)


def unet_bf16(pkg) -> Callable[[], object]:  # noqa: ANN001
    """A bfloat16 copy of the traced UNet, called on the same inputs (latents and text states cast; t as it is)."""
    module = copy.deepcopy(pkg.module).to(torch.bfloat16).eval().to(memory_format=torch.channels_last)
    inputs = [x.bfloat16() if n in ("sample", "encoder_hidden_states") else x for n, x in pkg.inputs.items()]
    return lambda: module(*inputs)


def toy_rows(work: Path, bf16: bool, repeat: int) -> None:
    """The bundled toy pipeline end to end (text, 20 DDIM steps with CFG, decode); PSNR (dB) against torch fp32's
    image from the same z_T."""
    pipe = read_pipeline(TOY)
    export_onnx(pipe, work / "toy", ["text_encoder", "unet", "decoder"], resolution=64, log=False)
    with torch.no_grad():
        want = pipe(PROMPT, seed=0, output_type="pt")

    def other(runtime: str, precision: str) -> Callable[[], object]:
        runner = RuntimePipeline(work / "toy", runtime, precision)
        return lambda: runner(PROMPT, seed=0, output_type="pt")

    def half() -> Callable[[], object]:
        bf = read_pipeline(TOY).to(dtype=torch.bfloat16)
        return lambda: bf(PROMPT, seed=0, output_type="pt")

    makers = {**({"torch bf16": half} if bf16 else {}),
              **{runtime_label(r, p): (lambda r=r, p=p: other(r, p))
                 for r, p in [("onnxruntime", "fp32"), ("openvino", "fp32"), *[("openvino", "bf16")] * bf16]}}
    pairs("toy pipeline end to end (text encoder, 20 DDIM steps with CFG, decoder), one 64x64 image",
          lambda: pipe(PROMPT, seed=0, output_type="pt"), makers, lambda out: psnr(out.float(), want),
          "PSNR vs torch fp32 (dB)", repeat)


def pairs(title: str, base: Callable[[], object], makers: dict[str, Callable[[], Callable[[], object]]],
          error: Callable[[object], float], unit: str, repeat: int) -> None:
    """Each variant made, checked and timed side by side with ``base`` (torch fp32), then dropped."""
    print(f"\n{title}")
    print(f"{'':20s}{'ms':>10s}{'torch fp32 ms':>15s}{'speed-up':>10s}   {unit}")
    for label, make in makers.items():
        try:
            fn = make()
        except Exception as e:  # noqa: BLE001  # a runtime that cannot read a file is a row that says so
            print(f"{label:20s}not run: {str(e).splitlines()[0][:160]}", flush=True)
            continue
        with torch.no_grad():
            err = error(fn())
            seconds = median_times({"torch fp32": base, label: fn}, warmup=1, repeat=repeat)
        shown = f"{err:.1e}" if unit.startswith("relative") else (">= 120 (psnr's cap)" if err >= 120 else f"{err:.1f}")
        mine, ours = seconds[label], seconds["torch fp32"]
        print(f"{label:20s}{1e3 * mine:10.1f}{1e3 * ours:15.1f}{ours / mine:9.2f}x   {shown}", flush=True)
        del fn
        gc.collect()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="toy,snapfusion,sd15",
                   help="which of toy, snapfusion, sd15 (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds (default: %(default)s)")
    p.add_argument("--work-dir", help="where the ONNX files go (default: a temporary folder, removed)")
    args = p.parse_args()
    bf16 = native_bf16()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="runtimes-"))
    print(f"CPU flags: {cpu_flags()}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"bf16 rows: {'yes' if bf16 else 'no (not native here)'}; median of {args.repeat}")
    try:
        for name in args.models.split(","):
            toy_rows(work, bf16, args.repeat) if name == "toy" else unet_rows(name, work, bf16, args.repeat)
            gc.collect()
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
