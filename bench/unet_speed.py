"""Our UNet vs diffusers' UNet2DConditionModel: same config, same weights, same dtype, timed side by side in one run.

    python bench/unet_speed.py                 # sd15, batch 2 (CFG), 64x64 latent, fp32 (+ bf16 where native)
    python bench/unet_speed.py --arch tiny --latent 32 --repeats 5 --dtype float32
    python bench/unet_speed.py --compile --profile   # also torch.compile(ours) (and its compile time); where time goes

Prints, per dtype, the median latency of each, the ratio ours / diffusers (goal <= 1.0), the achieved GFLOP/s of
each, and the GFLOP/s of a large matmul in that dtype on the same device (the practical ceiling).
"""

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from snapfusion_min.arch import preset
from snapfusion_min.cost import median_time, median_times
from snapfusion_min.formats.weights import apply_map, unet_source_key
from snapfusion_min.pipeline import native_bf16, pick_device, pick_dtype
from snapfusion_min.unet import UNet


def matmul_gflops(device, dtype, n=4096):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_time(lambda: a @ b, warmup=1, repeat=3, device=device) / 1e9


def profile(fn):
    """Self CPU time of one call by operator kind, the largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    print("  where ours spends its time (self CPU, one call):")
    for e in rows[:8]:
        print(f"    {e.key[:40]:40s} {100 * e.self_cpu_time_total / total:5.1f}%")


def compare(ref, ours, spec, args, device, dtype):
    """Both UNets in ``dtype``, timed in interleaved rounds; prints the rows of one dtype."""
    if dtype != torch.float32:
        ref, ours = copy.deepcopy(ref).to(dtype=dtype), copy.deepcopy(ours).to(dtype=dtype)
    z = torch.randn(args.batch, 4, args.latent, args.latent, device=device, dtype=dtype)
    c = torch.randn(args.batch, 77, spec.context_dim, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)  # diffusers' own speed-up advice
    z_cl = z.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        fns = {"ours": lambda: ours(z, t, c), "diffusers": lambda: ref(z, t, c).sample,
               "diffusers, channels_last": lambda: ref_cl(z_cl, t, c).sample}
        if args.compile:
            start, compiled = time.perf_counter(), torch.compile(ours)
            compiled(z, t, c)
            compile_s = time.perf_counter() - start
            fns["ours, compiled"] = lambda: compiled(z, t, c)
        a, b = fns["ours"]().float(), fns["diffusers"]().float()
        err = ((a - b).abs().max() / b.abs().max()).item()
        with FlopCounterMode(display=False) as counter:
            fns["ours"]()
        flops = counter.get_total_flops()
        ms = {k: 1e3 * v for k, v in median_times(fns, warmup=1, repeat=args.repeats, device=device).items()}
    name = str(dtype).removeprefix("torch.")
    print(f"\nUNet {args.arch}, {name}, batch {args.batch}, {args.latent}x{args.latent} latent, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats}")
    print(f"  max relative difference ours vs diffusers: {err:.1e}")
    print(f"  forward FLOPs: {flops / 1e9:.1f} GFLOP")
    for key, label in (("ours", ""), ("diffusers", "  as constructed (NCHW)"),
                       ("diffusers, channels_last", "  with channels_last"),
                       ("ours, compiled", f"  torch.compile (inductor), {compile_s if args.compile else 0:.1f} s to "
                                          "compile")):
        if key in ms:
            print(f"  {key.split(',')[0]:9s}: {ms[key]:9.1f} ms  ({flops / ms[key] / 1e6:6.1f} GFLOP/s){label}")
    print(f"  ratio ours / diffusers: {ms['ours'] / ms['diffusers']:.3f} (NCHW), "
          f"{ms['ours'] / ms['diffusers, channels_last']:.3f} (both channels_last)")
    if args.compile:
        print(f"  ratio compiled / eager (ours): {ms['ours, compiled'] / ms['ours']:.3f}")
    print(f"  {name} 4096^3 matmul: {matmul_gflops(device, dtype):.1f} GFLOP/s (practical ceiling)")
    if args.profile:
        with torch.inference_mode():
            profile(fns["ours"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd15", help="architecture preset with SD-v1.5's layout (sd15, tiny)")
    p.add_argument("--batch", type=int, default=2, help="batch size (2: conditional + unconditional for CFG)")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 for a 512x512 image)")
    p.add_argument("--repeats", type=int, default=3, help="timed forward passes per model, interleaved")
    p.add_argument("--dtype", action="append", help="float32, bfloat16, float16 (repeat; default: float32, and "
                   "bfloat16 on a GPU or a CPU with native bf16)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours), after compiling it")
    p.add_argument("--profile", action="store_true", help="also print where ours spends its time (torch profiler)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = pick_device(args.device)
    spec = preset(args.arch)
    torch.manual_seed(0)
    ref = UNet2DConditionModel(block_out_channels=spec.channels, cross_attention_dim=spec.context_dim,
                               attention_head_dim=spec.heads, norm_num_groups=spec.groups).eval().to(device)
    ours = UNet(spec).eval()
    apply_map(ours, ref.state_dict(), lambda k: [unet_source_key(k, "diffusers")], "UNet")
    ours.to(device, memory_format=torch.channels_last)  # as read_pipeline leaves it
    if device.type == "cpu":
        print(f"native bf16 on this CPU: {native_bf16()}")
    native = device.type != "cpu" or native_bf16()  # emulated bf16 on a CPU is slower than fp32 by far
    for name in args.dtype or ["float32"] + (["bfloat16"] if native else []):
        compare(ref, ours, spec, args, device, pick_dtype(name, device))


if __name__ == "__main__":
    main()
