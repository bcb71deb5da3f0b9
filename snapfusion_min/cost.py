"""What a model costs: parameters, multiply-accumulates and measured latency (the paper's Table 1 / Fig. 2 columns)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from .pipeline import Pipeline


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(fn: Callable[[], object]) -> int:
    """MACs of one call of ``fn``: half of PyTorch's FLOP count (convolutions, matmuls and attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with torch on ``n`` CPU threads (timings of small models are steadier on one), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def median_time(fn: Callable[[], object], warmup: int = 1, repeat: int = 5,
                device: torch.device | None = None) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` calls; synchronises CUDA / MPS around each call."""
    return median_times({"fn": fn}, warmup, repeat, device)["fn"]


@torch.no_grad()
def median_times(fns: dict[str, Callable[[], object]], warmup: int = 1, repeat: int = 5,
                 device: torch.device | None = None) -> dict[str, float]:
    """Median wall time in seconds of each of ``fns``, timed in interleaved rounds (each once per round).

    Things to compare are timed side by side: a machine that slows down for a while slows all of them alike, so
    their ratios hold where separate runs of ``median_time`` would drift apart.
    """

    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device is not None and device.type == "mps":
            torch.mps.synchronize()

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


PROMPT = "a large red striped circle at the top left and a blue square on a dark background"


@torch.no_grad()
def table1_times(pipes: dict[str, tuple[Pipeline, int]], size: int, guidance: float, repeat: int = 5,
                 warm_e2e: bool = True, prompt: str = PROMPT) -> dict[tuple[str, str], float]:
    """Table 1's latencies in seconds, per pipeline name (pipeline, DDIM steps): its text encoder (the prompt and the
    empty prompt in one call), one UNet step (CFG: a batch of two), its decoder (one latent), and end to end (one
    ``size`` x ``size`` image). Every part of every pipeline and every end-to-end run is timed in the same
    interleaved rounds (``median_times``), so a slow spell of the machine moves them alike; the parts are called once
    before (and with ``warm_e2e`` the end-to-end runs too)."""
    fns: dict[tuple[str, str], Callable[[], object]] = {}
    for name, (pipe, steps) in pipes.items():
        f = pipe.vae.cfg.factor
        z = torch.randn(2, pipe.unet.spec.in_channels, size // f, size // f, device=pipe.device, dtype=pipe.dtype)
        t = torch.tensor([500, 500], device=pipe.device)
        ids = pipe.tokenizer([prompt, ""]).to(pipe.device)
        context = pipe.encode_prompts([prompt, ""])
        fns |= {(name, "text encoder"): lambda pipe=pipe, ids=ids: pipe.text_encoder(ids),
                (name, "UNet"): lambda pipe=pipe, z=z, t=t, c=context: pipe.unet(z, t, c),
                (name, "decoder"): lambda pipe=pipe, z=z: pipe.decode(z[:1]),
                (name, "e2e"): lambda pipe=pipe, steps=steps: pipe([prompt], steps=steps, guidance=guidance,
                                                                   height=size, width=size, output_type="pt")}
    for key, fn in fns.items():
        if key[1] != "e2e" or warm_e2e:
            fn()
    device = next(iter(pipes.values()))[0].device
    return median_times(fns, warmup=0, repeat=repeat, device=device)  # type: ignore[arg-type]


def cpu_flags() -> str:
    """The CPU's vector and bf16 flags that decide its speed (Linux), for the record."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor() or "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "no AVX2"
