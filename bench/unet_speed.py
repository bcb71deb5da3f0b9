"""Our UNet vs diffusers' UNet2DConditionModel: same config, same weights, timed side by side in one run.

    python bench/unet_speed.py                 # sd15, fp32, batch 2 (CFG), 64x64 latent, on cuda if present else cpu
    python bench/unet_speed.py --arch tiny --latent 32 --repeats 5

Prints the median latency of each, the ratio ours / diffusers (goal <= 1.0), the achieved GFLOP/s of each, and the
GFLOP/s of a large fp32 matmul on the same device (the practical ceiling).
"""

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from snapfusion_min.arch import preset  # noqa: E402
from snapfusion_min.pipeline import pick_device  # noqa: E402
from snapfusion_min.unet import UNet  # noqa: E402
from snapfusion_min.weights import apply_map, unet_source_key  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(device, n=4096, repeats=5):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = min(timed(lambda: a @ b, device, repeats))
    return 2 * n**3 / best / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd15", help="architecture preset with SD-v1.5's layout (sd15, tiny)")
    p.add_argument("--batch", type=int, default=2, help="batch size (2: conditional + unconditional for CFG)")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 for a 512x512 image)")
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes per model, interleaved")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    spec = preset(args.arch)
    torch.manual_seed(0)
    ref = UNet2DConditionModel(block_out_channels=spec.channels, cross_attention_dim=spec.context_dim,
                               attention_head_dim=spec.heads, norm_num_groups=spec.groups).eval().to(device)
    ours = UNet(spec).eval()
    apply_map(ours, ref.state_dict(), lambda k: [unet_source_key(k, "diffusers")], "UNet")
    ours.to(device, memory_format=torch.channels_last)  # as load_pipeline leaves it
    z = torch.randn(args.batch, 4, args.latent, args.latent, device=device)
    c = torch.randn(args.batch, 77, spec.context_dim, device=device)
    t = torch.tensor(500, device=device)
    with torch.inference_mode():
        run_ours, run_ref = (lambda: ours(z, t, c)), (lambda: ref(z, t, c).sample)
        err = ((run_ours() - run_ref()).abs().max() / run_ref().abs().max()).item()  # also warms up
        with FlopCounterMode(display=False) as counter:
            run_ours()
        flops = counter.get_total_flops()
        ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)  # diffusers' own speed-up advice
        z_cl = z.contiguous(memory_format=torch.channels_last)
        run_ref_cl = lambda: ref_cl(z_cl, t, c).sample  # noqa: E731
        run_ref_cl()
        t_ours, t_ref, t_ref_cl = [], [], []
        for _ in range(args.repeats):  # interleaved, so all see the same machine state
            t_ours += timed(run_ours, device, 1)
            t_ref += timed(run_ref, device, 1)
            t_ref_cl += timed(run_ref_cl, device, 1)
    m_ours, m_ref, m_ref_cl = (statistics.median(x) for x in (t_ours, t_ref, t_ref_cl))
    print(f"UNet {args.arch}, fp32, batch {args.batch}, {args.latent}x{args.latent} latent, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"  max relative difference ours vs diffusers: {err:.1e}")
    print(f"  forward FLOPs: {flops / 1e9:.1f} GFLOP")
    print(f"  ours     : {m_ours * 1000:9.1f} ms  ({flops / m_ours / 1e9:6.1f} GFLOP/s)")
    print(f"  diffusers: {m_ref * 1000:9.1f} ms  ({flops / m_ref / 1e9:6.1f} GFLOP/s)  as constructed (NCHW)")
    print(f"  diffusers: {m_ref_cl * 1000:9.1f} ms  ({flops / m_ref_cl / 1e9:6.1f} GFLOP/s)  with channels_last")
    print(f"  ratio ours / diffusers: {m_ours / m_ref:.3f} (NCHW), {m_ours / m_ref_cl:.3f} (both channels_last)")
    print(f"  fp32 4096^3 matmul: {matmul_gflops(device):.1f} GFLOP/s (practical ceiling)")


if __name__ == "__main__":
    main()
