"""Table 1 at SD-v1.5's shapes on this machine: SD-v1.5 (50 DDIM steps, CFG, its decoder) vs ours (Table 3's UNet,
8 steps, the 50%-pruned decoder), one 512x512 image, random weights (latency does not depend on them).

    python bench/table1_sd.py                          # fp32, and bf16 where the CPU computes it natively
    python bench/table1_sd.py --dtype float32 --dtype bfloat16 --rounds 3
    python bench/table1_sd.py --size 256 --toy runs/recipe/final.safetensors   # smaller; and the toy world's pair

Each part (text encoder, one UNet step, decoder) and both end-to-end runs are timed in the same interleaved rounds
(``cost.table1_times``): a slow spell of the machine moves both pipelines alike. With --toy, the bundled toy teacher
(50 steps) against that final toy pipeline (evolved UNet, 8 steps, pruned decoder) is timed the same way.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from snapfusion_min import read_pipeline
from snapfusion_min.arch import sd15, snapfusion
from snapfusion_min.cost import count_params, table1_times
from snapfusion_min.pipeline import SamplerConfig, native_bf16, pick_device, pick_dtype, random_pipeline
from snapfusion_min.prune import prune_decoder

TOY = Path(__file__).resolve().parent.parent / "models" / "toy" / "model.safetensors"
PAPER = ("paper (Table 1, iPhone 14 Pro): SD-v1.5 text encoder 4 ms x 2, UNet ~1,700 ms x 50, decoder 369 ms "
         "= 85.4 s;\n  ours 4 ms x 2, UNet 230 ms x 8, decoder 116 ms = 1.96 s (43x); params: text encoder 123M, "
         "UNet 860M -> 848M, decoder 50M -> 13M")


def sd_pair(dtype: torch.dtype, device: torch.device) -> dict:
    """SD-v1.5 and ours, random weights; ours shares SD's text encoder and its decoder is SD's, pruned to 50%."""
    torch.manual_seed(0)
    base = random_pipeline(sd15(), sampler=SamplerConfig(steps=50, guidance=7.5))
    ours = random_pipeline(snapfusion(), sampler=SamplerConfig(steps=8, guidance=7.5, spacing="trailing",
                                                                distilled=True))
    ours = ours.with_parts(text_encoder=base.text_encoder, vae=prune_decoder(base.vae, 0.5))
    return {"SD-v1.5": (base.to(device, dtype), 50), "ours": (ours.to(device, dtype), 8)}


def toy_pair(final: str, dtype: torch.dtype, device: torch.device) -> dict:
    return {"toy teacher": (read_pipeline(TOY).to(device, dtype), 50),
            "toy final": (read_pipeline(final).to(device, dtype), 8)}


def table(pipes: dict, size: int, rounds: int, warm_e2e: bool) -> float:
    """Print the table; return the end-to-end speed-up (first pipeline / second)."""
    start = time.perf_counter()
    seconds = table1_times(pipes, size, guidance=7.5, repeat=rounds, warm_e2e=warm_e2e)
    print(f"{'':12s}{'part':14s}{'params':>10s}{'ms / call':>12s}{'calls':>7s}{'total ms':>12s}")
    e2e = []
    for name, (pipe, steps) in pipes.items():
        for part, module, calls in (("text encoder", pipe.text_encoder, 1), ("UNet", pipe.unet, steps),
                                    ("decoder", pipe.vae.decoder, 1)):
            ms = 1e3 * seconds[name, part]
            print(f"{name:12s}{part:14s}{count_params(module) / 1e6:9.1f}M{ms:12.1f}{calls:7d}{ms * calls:12.0f}")
        e2e.append(1e3 * seconds[name, "e2e"])
        print(f"{name:12s}{'end to end':14s}{'':10s}{'':12s}{'':7s}{e2e[-1]:12.0f}   (measured, one image)")
    print(f"speed-up end to end: {e2e[0] / e2e[1]:.1f}x  ({rounds} round(s), {time.perf_counter() - start:.0f} s)")
    return e2e[0] / e2e[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dtype", action="append", help="float32, bfloat16 (repeat for several; default: float32, and "
                   "bfloat16 if the CPU has native bf16)")
    p.add_argument("--size", type=int, default=512, help="image side (default: 512)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds, median (default: 1; one "
                   "fp32 round of SD-v1.5 takes minutes on a CPU: docs/speed.md)")
    p.add_argument("--toy", help="a final toy pipeline (recipe.py's final.safetensors) to time against the bundled "
                   "toy teacher, the same way")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    dtypes = args.dtype or ["float32"] + (["bfloat16"] if device.type != "cpu" or native_bf16() else [])
    print(f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}; native bf16 on this CPU: "
          f"{native_bf16()}")
    for name in dtypes:
        dtype = pick_dtype(name, device)
        print(f"\n== {args.size}x{args.size}, {name}: SD-v1.5 (50 steps) vs ours (Table 3's UNet, 8 steps, "
              f"pruned decoder)")
        table(sd_pair(dtype, device), args.size, args.rounds, warm_e2e=False)
        if args.toy:
            print(f"\n== toy world, 64x64, {name}: bundled teacher (50 steps) vs {args.toy} (8 steps)")
            table(toy_pair(args.toy, dtype, device), 64, max(args.rounds, 5), warm_e2e=True)
    print("\n" + PAPER)


if __name__ == "__main__":
    main()
