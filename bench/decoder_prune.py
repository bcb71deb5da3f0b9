"""SD-v1.5's VAE decoder vs the 50%-pruned one (§3.2): parameters, MACs and decode latency, measured in one run.

    python bench/decoder_prune.py                  # 512x512 images (64x64 latents), batch 1, fp32, this CPU
    python bench/decoder_prune.py --latent 32 --repeat 5

Weights are random (only shapes matter for cost); the paper: 50M -> 13M parameters, 369 ms -> 116 ms on an iPhone.
"""

from __future__ import annotations

import argparse

import torch

from snapfusion_min.cost import count_macs, count_params, median_time
from snapfusion_min.pipeline import pick_device
from snapfusion_min.prune import prune_decoder
from snapfusion_min.vae import VAE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--latent", type=int, default=64, help="latent size (64 = 512x512 images)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of channels kept (default: 0.5)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per decoder (median)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    device = pick_device(args.device)
    original = VAE().eval().to(device)
    pruned = prune_decoder(original, args.ratio).eval()
    z = torch.randn(1, 4, args.latent, args.latent, device=device)
    rows = []
    for name, vae in (("SD-v1.5 decoder", original), (f"pruned r={args.ratio}", pruned)):
        params = count_params(vae.decoder)
        macs = count_macs(lambda vae=vae: vae.decoder(z))
        seconds = median_time(lambda vae=vae: vae.decoder(z), warmup=1, repeat=args.repeat, device=device)
        rows.append((name, params, macs, seconds))
    size = 8 * args.latent
    print(f"decode one {size}x{size} image, fp32, {device}, {torch.get_num_threads()} threads, median of {args.repeat}")
    print(f"{'':18s}{'params':>10s}{'GMACs':>9s}{'latency':>11s}   widths")
    for (name, params, macs, seconds), vae in zip(rows, (original, pruned)):
        print(f"{name:18s}{params / 1e6:9.2f}M{macs / 1e9:9.1f}{seconds * 1e3:9.0f}ms   {vae.cfg.decoder_channels}")
    (_, p0, m0, t0), (_, p1, m1, t1) = rows
    print(f"{'ratio':18s}{p1 / p0:10.3f}{m1 / m0:9.3f}{t1 / t0:11.3f}   (speed-up {t0 / t1:.2f}x)")
    print("paper (iPhone 14 Pro, CoreML): 50M -> 13M params (0.26), 369 -> 116 ms (speed-up 3.2x)")


if __name__ == "__main__":
    main()
