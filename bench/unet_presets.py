"""Per-step UNet latency of the `snapfusion` preset (Table 3) vs `sd15`, measured side by side in one run.

    python bench/unet_presets.py                 # fp32, batch 2 (one CFG step), 64x64 latents (512x512 images)
    python bench/unet_presets.py --latent 32 --repeat 5

Random weights (only shapes matter for speed). Also prints parameters and MACs, and the paper's figures beside ours.
"""

from __future__ import annotations

import argparse

import torch

from snapfusion_min.arch import preset
from snapfusion_min.cost import count_macs, count_params, median_time
from snapfusion_min.pipeline import pick_device
from snapfusion_min.unet import UNet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = pick_device(args.device)
    rows = {}
    for name in ("sd15", "snapfusion"):
        torch.manual_seed(0)
        unet = UNet(preset(name)).eval().to(device).to(memory_format=torch.channels_last)
        z = torch.randn(args.batch, 4, args.latent, args.latent, device=device)
        t = torch.full((args.batch,), 500, device=device)
        ctx = torch.randn(args.batch, 77, 768, device=device)
        step = lambda u=unet, z=z, t=t, ctx=ctx: u(z, t, ctx)  # noqa: E731
        macs = count_macs(step)
        ms = 1e3 * median_time(step, warmup=1, repeat=args.repeat, device=device)
        rows[name] = (count_params(unet), macs, ms)
        del unet, step
    print(f"UNet, fp32, batch {args.batch}, {args.latent}x{args.latent} latents, {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeat}")
    print(f"{'':12s}{'params':>10s}{'GMACs':>9s}{'ms / step':>11s}")
    for name, (params, macs, ms) in rows.items():
        print(f"{name:12s}{params / 1e6:9.1f}M{macs / 1e9:9.0f}{ms:11.0f}")
    (p0, m0, t0), (p1, m1, t1) = rows["sd15"], rows["snapfusion"]
    print(f"{'ratio':12s}{p1 / p0:10.3f}{m1 / m0:9.3f}{t1 / t0:11.3f}")
    print("paper: A100 + TensorRT 26.2 / 51.2 ms (ratio 0.51); iPhone 14 Pro 230 / ~1,700 ms (0.14); "
          "params 848M / 860M")


if __name__ == "__main__":
    main()
