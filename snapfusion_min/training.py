"""Training plumbing shared by train.py, distill.py and evolve.py: DDP set-up, EMA, exact resume, atomic saves.

Exact resume without saving RNG streams: every random draw of step s on rank r (noise, timesteps, caption dropout,
block dropping of Eq. 5, which samples index) comes from the global torch RNG re-seeded with (seed, s, r) at the start
of the step, and the data of step s is a pure function of s. A run resumed at step k therefore repeats bit for bit
what the uninterrupted run did from step k on.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .checkpoint import atomic_write

if TYPE_CHECKING:
    from .pipeline import Pipeline


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


def make_dataset(data: str, resolution: int, seed: int = 0, skip_bad: bool = False) -> torch.utils.data.Dataset:
    """'toy' -> the endless toy world (train split); else a folder of captioned images."""
    from .data import CaptionedFolder, ToyWorld

    if data == "toy":
        return ToyWorld("train", length=10**9, seed=seed, resolution=resolution)
    return CaptionedFolder(data, resolution=resolution, skip_bad=skip_bad)


def batch_at(data: torch.utils.data.Dataset, step: int, size: int, d: Dist, seed: int) -> tuple[torch.Tensor, list]:
    """This rank's share of the global batch of ``step``: a pure function of (step, rank), so resume is exact.

    A finite dataset is walked in a fresh permutation per epoch (seeded by the epoch); the endless toy world in order.
    """
    n = len(data)
    start = step * size
    order = None if n >= 10**9 else torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + start // n))
    items = [data[i if order is None else int(order[i % n])] for i in range(start + d.rank, start + size, d.world)]
    return torch.stack([x for x, _ in items]), [c for _, c in items]


def ema_model(model: torch.nn.Module, ema: EMA) -> torch.nn.Module:
    """A copy of ``model`` holding the EMA weights (what checkpoints store)."""
    averaged = copy.deepcopy(model)
    ema.copy_to(averaged)
    return averaged.eval()


def check_ranks_agree(model: torch.nn.Module, d: Dist) -> None:
    """DDP sanity check: every rank must end with the same weights (a checksum per rank, gathered)."""
    if d.world == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = [torch.zeros_like(checksum) for _ in range(d.world)]
    dist.all_gather(sums, checksum)
    if len({s.item() for s in sums}) != 1:
        raise RuntimeError(f"DDP ranks diverged: weight checksums {[s.item() for s in sums]}")
    if d.main:
        print(f"all {d.world} ranks agree: weight checksum {sums[0].item():.10e}")


def write_figures(out: str, losses: list[float], pipe: Pipeline, title: str = "training loss") -> None:
    """<out>.loss.png (running mean of the loss) and <out>.samples.png (held-out prompts, the pipeline's sampler)."""
    from .data import ToyWorld
    from .viz import caption_grid, line_plot

    k = max(1, len(losses) // 200)
    smooth = [sum(losses[i:i + k]) / k for i in range(0, len(losses) - k + 1, k)]
    line_plot({"loss": ([i * k for i in range(len(smooth))], smooth)}, title=title, xlabel="step").save(
        out + ".loss.png")
    prompts = [ToyWorld("heldout", seed=5).sample(i)[1].caption for i in range(8)]
    res = pipe.sampler["resolution"]
    images = pipe(prompts, steps=pipe.sampler["steps"], guidance=pipe.sampler["guidance"], height=res, width=res,
                  spacing=pipe.sampler["spacing"])
    caption_grid(images, prompts, cols=8).save(out + ".samples.png")


def resume(state_path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA, tag: str) -> tuple[int,
                                                                                                              list]:
    """Load a resumable state into model, optimizer and EMA; returns (step, losses).

    ``tag`` names what the state belongs to (architecture, configuration); a state of anything else is refused.
    """
    if not state_path.is_file():
        raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
    state = load_state(state_path)
    if state["tag"] != tag:
        raise ValueError(f"{state_path} was trained with another architecture or configuration; refusing to resume")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    ema.shadow = state["ema"]
    return state["step"], state["losses"]


def save_progress(out: str, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA, step: int,
                  losses: list[float], tag: str, pipe: Pipeline, title: str) -> None:
    """Write <out>.state.pt (resumable), <out> (a checkpoint with the EMA weights) and its figures, all atomically."""
    from .pipeline import Pipeline

    save_state(out + ".state.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema.shadow,
                                   "step": step, "losses": losses, "tag": tag})
    averaged = Pipeline(ema_model(model, ema), pipe.vae, pipe.text_encoder, pipe.prediction, pipe.latent_scale,
                        sampler=pipe.sampler)
    averaged.save(out)
    write_figures(out, losses, averaged, title)
