"""Training plumbing shared by train.py, distill.py and evolve.py: DDP set-up, EMA, exact resume, atomic saves.

Exact resume without saving RNG streams: every random draw of step s on rank r (noise, timesteps, caption dropout,
block dropping of Eq. 5, which samples index) comes from the global torch RNG re-seeded with (seed, s, r) at the start
of the step, and the data of step s is a pure function of s. A run resumed at step k therefore repeats bit for bit
what the uninterrupted run did from step k on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import atomic_write


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """Join the torchrun job if there is one: NCCL on GPUs, gloo on CPU. Each rank takes its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, device)


def average_gradients(model: torch.nn.Module, d: Dist) -> None:
    """All-reduce mean of gradients (blocks dropped by Eq. 5 have none: they count as zero on that rank).

    Used instead of DistributedDataParallel because a block skipped on one rank but not another would leave DDP
    waiting for gradients that never come; every rank runs this on every parameter, so nothing can deadlock.
    """
    if d.world == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= d.world


def broadcast_parameters(model: torch.nn.Module, d: Dist) -> None:
    """Start every rank from rank 0's weights."""
    if d.world > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    """Re-seed the global RNG for one step, from (seed, step, rank) only: the key to exact resume."""
    torch.manual_seed((seed * 1_000_003 + step) * 1009 + rank)


class EMA:
    """Exponential moving average of a model's floating-point state: shadow <- decay * shadow + (1 - decay) * w."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: early weights are forgotten fast
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1 - decay)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict({**model.state_dict(), **self.shadow})


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_state(path: str | Path, state: dict) -> None:
    """Atomically write a resumable training state (tensors, numbers, strings: readable with weights_only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
