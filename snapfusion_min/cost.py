"""What a model costs: parameters, multiply-accumulates and measured latency (the paper's Table 1 / Fig. 2 columns)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(fn: Callable[[], object]) -> int:
    """MACs of one call of ``fn``: half of PyTorch's FLOP count (convolutions, matmuls and attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


@torch.no_grad()
def median_time(fn: Callable[[], object], warmup: int = 1, repeat: int = 5,
                device: torch.device | None = None) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` calls; synchronises CUDA / MPS around each call."""

    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        elif device is not None and device.type == "mps":
            torch.mps.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
