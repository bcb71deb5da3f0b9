"""The one training loop (``fit``) and its plumbing: DDP set-up, EMA, exact resume, atomic saves, a non-finite guard.

Every stage -- the toy autoencoder, the UNet (Eq. 6, robust training of Eq. 5), decoder data distillation (App. B.2)
and step distillation (Eq. 11) -- gives ``fit`` its model, a loss for step s, and a ``TrainConfig``; nothing else.

Exact resume without saving RNG streams: every random draw of step s on rank r (noise, timesteps, caption dropout,
block dropping of Eq. 5, which samples index) comes from the global torch RNG re-seeded with (seed, s, r) at the start
of the step, and the data of step s is a pure function of s. A run resumed at step k therefore repeats bit for bit
what the uninterrupted run did from step k on.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .data import CaptionedFolder
from .formats.checkpoint import atomic_write, config_dict, remove_stale_temps, writer_lock
from .formats.figures import caption_grid, loss_plot
from .formats.shards import Shards, is_shards
from .world import World

if TYPE_CHECKING:
    from .pipeline import Pipeline


OPTIMIZERS = ("adamw", "adafactor")


@dataclass(frozen=True)
class TrainConfig:
    """The loop's settings. Each stage has its own defaults (``UNET``, ``AUTOENCODER``, ... in their modules)."""

    train_steps: int = 3500  # optimizer steps
    batch_size: int = 32  # global batch, split over DDP ranks (and over accumulation micro-batches)
    lr: float = 1e-3  # peak learning rate
    warmup: int = 200  # linear warm-up steps, then cosine decay to 10% (the paper gives no schedule)
    weight_decay: float = 0.01  # AdamW, §5
    ema_decay: float | None = 0.999  # checkpoints store the EMA weights; None: the weights as trained
    accum: int = 1  # gradient accumulation: micro-batches per optimizer step
    save_every: int = 500  # checkpoint + resumable state every N steps (and at the end)
    seed: int = 0  # every random draw of step s is seeded by (seed, s, rank): exact resume
    stop_after: int | None = None  # run at most N steps in this invocation, save, return (then resume)
    resume: bool = False  # continue from <out>.state.pt
    overwrite: bool = False  # start afresh over an <out> whose <out>.state.pt holds a resumable run
    workers: int = 0  # data-loader processes decoding WebDataset shards (0: this process decodes)
    optimizer: str = "adamw"  # or 'adafactor': a factored second moment and no first (less state than AdamW's 2 copies)
    checkpointing: bool = False  # gradient checkpointing of the UNet's blocks: less memory, ~1 more forward pass
    save_state: bool = True  # write <out>.state.pt (model, optimizer, EMA) for --resume
    amp: bool = False  # mixed precision: the forward pass under autocast (``amp_dtype``), weights kept in float32

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("train_steps", "batch_size", "accum", "save_every"):
            if getattr(self, name) < (0 if name == "train_steps" else 1):
                raise ValueError(f"{name.replace('_', '-')} must be {'>= 0' if name == 'train_steps' else '>= 1'}, "
                                 f"got {getattr(self, name)}")
        if self.batch_size % self.accum:
            raise ValueError(f"batch-size {self.batch_size} is not divisible by accum {self.accum}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup < 0 or (self.stop_after is not None and self.stop_after < 1):
            raise ValueError("warmup must be >= 0 and stop-after >= 1")


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a torchrun job (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


LOCAL = Dist()  # one process on the CPU


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


BUCKET_BYTES = 25 * 2**20  # gradients all-reduced together, as DistributedDataParallel's default bucket


def buckets(grads: list[torch.Tensor], limit: int = BUCKET_BYTES) -> Iterator[list[torch.Tensor]]:
    """``grads`` in order, in runs of one dtype and device of at most ``limit`` bytes (a larger tensor goes alone)."""
    run: list[torch.Tensor] = []
    for g in grads:
        if run and (g.dtype != run[0].dtype or g.device != run[0].device
                    or sum(t.numel() * t.element_size() for t in run) + g.numel() * g.element_size() > limit):
            yield run
            run = []
        run.append(g)
    if run:
        yield run


def average_gradients(model: torch.nn.Module, d: Dist) -> None:
    """All-reduce mean of gradients, bucketed: ~25 MB a call (114 calls a step for SD-v1.5's UNet, not one
    per parameter: 686). Blocks dropped by Eq. 5 have no gradient: they count as zero on that rank.

    Used instead of DistributedDataParallel because a block skipped on one rank but not another would leave DDP
    waiting for gradients that never come; every rank runs this on every parameter, so nothing can deadlock.
    """
    if d.world == 1:
        return
    grads = []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    for run in buckets(grads, BUCKET_BYTES):
        flat = torch.cat([g.reshape(-1) for g in run])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= d.world
        for g, part in zip(run, flat.split([g.numel() for g in run]), strict=True):
            g.copy_(part.view_as(g))


def on_main(d: Dist, fn: Callable[[], object]) -> object:
    """``fn()`` run on rank 0 only, its (picklable) result handed to every rank: a decision all ranks must share."""
    box = [fn() if d.main else None]
    if d.world > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    """Wait until every rank is here (e.g. until rank 0 has written a file the others read next)."""
    if d.world > 1:
        dist.barrier()


def broadcast_parameters(model: torch.nn.Module, d: Dist) -> None:
    """Start every rank from rank 0's weights."""
    if d.world > 1:
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


def amp_dtype(device: torch.device) -> torch.dtype:
    """--amp's autocast dtype: bfloat16 on a CUDA GPU that has it and on a CPU with native bf16 (no loss scaling
    needed: bf16 has float32's range), else float16, whose small range needs a gradient scaler."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        from .pipeline import native_bf16  # (pipeline imports nothing of training)

        return torch.bfloat16 if native_bf16() else torch.float16
    return torch.float16


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
    """A resumable state written by ``save_state``; a truncated file, or one of anything else, is one ValueError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a pickle carrying code, not a torch file: a user's file, not our bug
        raise ValueError(f"{path} is not a readable resumable state ({str(e).splitlines()[0][:200]})") from None
    missing = {"model", "optimizer", "step", "losses", "tag"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise ValueError(f"{path} is not a resumable state of this project (no {', '.join(sorted(missing))})")
    return state


def make_dataset(data: str, resolution: int, seed: int = 0, skip_bad: bool = False,
                 workers: int = 0) -> torch.utils.data.Dataset | Shards:
    """'toy' -> the endless toy world (train split); WebDataset shards (a folder of .tar, a glob, a brace range) ->
    a stream of them (bad samples always skipped and counted; ``workers`` data-loader processes decode); else a
    folder of captioned images."""
    if data == "toy":
        return World("train", length=10**9, seed=seed, resolution=resolution)
    if is_shards(data):
        shards = Shards(data, resolution, workers)
        shards.window(0, 1, 0, 1, seed)  # one usable sample, or the reason there is none, before any work
        return shards
    folder = CaptionedFolder(data, resolution=resolution, skip_bad=skip_bad)
    if folder.skipped:  # --skip-bad: say what was left out
        name, problem = next(iter(folder.skipped.items()))
        print(f"warning: left out {len(folder.skipped)} of {len(folder) + len(folder.skipped)} images of {data} "
              f"(e.g. {name}: {problem})", file=sys.stderr)
    return folder


def batch_at(data: torch.utils.data.Dataset | Shards, step: int, size: int, d: Dist,
             seed: int) -> tuple[torch.Tensor, list]:
    """This rank's share of the global batch of ``step``: a pure function of (step, rank), so resume is exact.

    A finite dataset is walked in a fresh permutation per epoch (seeded by the epoch); the endless toy world in order;
    shards by their stream (``Shards``).
    """
    if isinstance(data, Shards):
        return data.batch(step, size, d.rank, d.world, seed)
    n = len(data)
    start = step * size
    order = None if n >= 10**9 else torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + start // n))
    items = [data[i if order is None else int(order[i % n])] for i in range(start + d.rank, start + size, d.world)]
    return torch.stack([x for x, _ in items]), [c for _, c in items]


def captions(data: torch.utils.data.Dataset | Shards, n: int, seed: int = 0) -> list[str]:
    """n captions of the training data, in a fixed order (prompts for synthetic data, App. B.2)."""
    if isinstance(data, Shards):
        return data.captions(n, seed)
    return [data[k % len(data)][1] for k in range(n)]


def encoded_batch(pipe: Pipeline, data: torch.utils.data.Dataset, step: int, micro: int, cfg: TrainConfig,
                  d: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``micro`` of step ``step``: latents x0 = scale * E(x) of the frozen VAE, and the text context."""
    x, captions = batch_at(data, step * cfg.accum + micro, cfg.batch_size // cfg.accum, d, cfg.seed)
    with torch.no_grad():
        return pipe.vae.encode(x.to(d.device)) * pipe.latent_scale, pipe.encode_prompts(captions)


def swap_ema(model: torch.nn.Module, ema: EMA | None) -> None:
    """Exchange the model's tensors with the EMA's, without a copy (twice: everything is back). Checkpoints store the
    EMA weights this way: a copy of the model would be one more copy of the weights in memory (3.2 GiB at SD-v1.5's
    size, enough to run out of 24 GiB)."""
    if ema is None:
        return
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for k, shadow in ema.shadow.items():
            tensors[k].data, ema.shadow[k] = shadow, tensors[k].data


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
    """<out>.loss.png and .svg (running mean of the loss; skipped, with a note, without matplotlib) and
    <out>.samples.png (held-out toy prompts, the pipeline's sampler; toy-world models only)."""
    k = max(1, len(losses) // 200)
    smooth = [sum(losses[i:i + k]) / k for i in range(0, len(losses) - k + 1, k)]
    try:
        loss_plot([(i + 1) * k for i in range(len(smooth))], smooth, out + ".loss.png", title,
                  f"loss (mean of {k} step{'s' if k > 1 else ''})")
    except ImportError as e:
        print(f"skipped {out}.loss.png: {e}")
    if (pipe.training or {}).get("data", "toy") != "toy":  # held-out toy prompts say nothing of another world
        return
    prompts = [World("heldout", seed=5).sample(i)[1].caption for i in range(8)]
    images = pipe(prompts)  # the pipeline's own sampler settings
    grid = caption_grid(images, prompts, cols=8)
    atomic_write(out + ".samples.png", lambda tmp: grid.save(tmp, format="PNG"))


def optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (§5), or Adafactor (Shazeer & Stern 2018: row and column statistics of the last two dimensions)."""
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


@contextmanager
def ema_weights(model: torch.nn.Module, ema: EMA | None) -> Iterator[None]:
    """The model holds the EMA weights inside the block (``swap_ema`` in, then out)."""
    swap_ema(model, ema)
    try:
        yield
    finally:
        swap_ema(model, ema)


def fit(model: torch.nn.Module, loss_at: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig,
        d: Dist, *, out: str | None = None, tag: str | dict = "",
        save: Callable[[torch.nn.Module, int, list[float]], None] | None = None,
        desc: str = "train") -> tuple[torch.nn.Module, list[float]]:
    """Train ``model`` for ``cfg.train_steps`` steps; returns the model to store (the EMA copy, if any) and the losses.

    ``loss_at(step, micro)`` draws micro-batch ``micro`` of step ``step`` and returns (loss to minimise, value to log).
    With ``out``, the resumable state goes to <out>.state.pt and ``save(stored model, step, losses)`` writes the
    checkpoint, every ``cfg.save_every`` steps and at the end, on rank 0. ``tag`` names what a state belongs to
    (``run_tag``: the run's settings; a resume with other settings is refused).
    A non-finite loss or weight, or weights whose norm jumped (``DIVERGED``), stop the run before anything is written:
    the last checkpoint on disk stays good. One run writes an ``out`` at a time (``<out>.lock``); a fresh run over a
    resumable state needs ``cfg.overwrite``.
    """
    with writer_lock(out) if out and d.main else nullcontext():  # one writer per output
        if out and d.main and not (cfg.resume or cfg.overwrite) and Path(f"{out}.state.pt").is_file():
            raise ValueError(f"{out}.state.pt holds a resumable run: --resume continues it, --overwrite starts "
                             "afresh over it")
        return _fit(model, loss_at, cfg, d, out=out, tag=tag, save=save, desc=desc)


def guard_weights(params: list[torch.nn.Parameter], saved_norm: float, step: int, since: str, out: str) -> float:
    """Before a save: the weights are finite and their norm has not grown more than DIVERGED times since ``since``
    (the norm then: ``saved_norm``); else a FloatingPointError naming the last good checkpoint. Returns the norm."""
    if not all(torch.isfinite(p).all() for p in params):
        raise FloatingPointError(f"weights are not finite after step {step}; {last_good(out)}")
    if (norm := weight_norm(params)) > DIVERGED * saved_norm:
        raise FloatingPointError(f"the run diverged: the weights' norm grew {norm / saved_norm:.3g}x since {since} "
                                 f"(more than {DIVERGED:g}x) by step {step}; {last_good(out)}")
    return norm


def _fit(model: torch.nn.Module, loss_at: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig,
         d: Dist, *, out: str | None = None, tag: str | dict = "",
         save: Callable[[torch.nn.Module, int, list[float]], None] | None = None,
         desc: str = "train") -> tuple[torch.nn.Module, list[float]]:
    """``fit`` under its writer lock."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, cfg)
    if hasattr(model, "checkpointing"):
        model.checkpointing = cfg.checkpointing
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    amp = amp_dtype(d.device) if cfg.amp else None
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp == torch.float16)  # float16's loss scaling
    start, losses = 0, []
    state_path = Path(f"{out}.state.pt") if out else None
    if out and d.main:
        for name in (out, state_path):  # what a killed run was writing when it died
            remove_stale_temps(name)
    if cfg.resume:
        start, losses = resume(state_path, model, opt, ema, tag, scaler)
    broadcast_parameters(model, d)
    saved_norm = weight_norm(params)  # the divergence guard's reference: the weights at the last save (or start)
    end = cfg.train_steps if cfg.stop_after is None else min(cfg.train_steps, start + cfg.stop_after)
    bar = tqdm(range(start, end), desc=desc, disable=not d.main, initial=start, total=cfg.train_steps)
    smooth = None  # the progress bar's loss: an exponential moving average over ~50 steps
    for step in bar:
        seed_step(cfg.seed, step, d.rank)
        opt.zero_grad(set_to_none=True)
        logged, finite = backward(loss_at, step, cfg.accum, d.device, amp, scaler)
        if not (finite and math.isfinite(logged)):
            raise FloatingPointError(f"loss is {logged} at step {step}; {last_good(out)}")
        average_gradients(model, d)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.train_steps)
        scaler.step(opt)  # opt.step(), unless float16's scaled gradients overflowed (then the scale halves)
        scaler.update()
        if ema is not None:
            ema.update(model, step)
        losses.append(logged)
        smooth = logged if smooth is None else 0.98 * smooth + 0.02 * logged
        bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
        if out and d.main and ((step + 1) % cfg.save_every == 0 or step + 1 == end):
            saved_norm = guard_weights(params, saved_norm, step, "the last save" if start or step >= cfg.save_every
                                       else "the start", out)
            if cfg.save_state:
                save_state(state_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                        "step": step + 1, "ema": ema.shadow if ema else {}, "losses": losses,
                                        "tag": tag, "scaler": scaler.state_dict()})
            if save is not None:
                with ema_weights(model, ema):
                    save(model, step + 1, losses)
                model.train()  # a Pipeline made by the save hook puts its parts in eval mode
    check_ranks_agree(model, d)
    if ema is not None:
        swap_ema(model, ema)  # for good: the model returned holds the EMA weights
        model.eval()
    return model, losses


def backward(loss_at: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], step: int, accum: int,
             device: torch.device, amp: torch.dtype | None, scaler: torch.amp.GradScaler) -> tuple[float, bool]:
    """Step ``step``'s ``accum`` micro-batches: each loss under autocast (``amp``; None: off), scaled and
    backpropagated; returns (the logged value averaged over them, whether every loss was finite)."""
    logged, finite = 0.0, True
    for micro in range(accum):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, value = loss_at(step, micro)
        scaler.scale(loss.float() / accum).backward()
        logged += value.item() / accum
        finite &= bool(torch.isfinite(loss))
    return logged, finite


# how a run is driven, not what it computes: the fields a resumed run may change
RUN_CONTROL = frozenset({"resume", "overwrite", "stop_after", "save_every", "save_state", "workers", "checkpointing"})


def run_tag(cfg: object, **extra: object) -> dict[str, object]:
    """What makes a run's result, as {field: value}: every field of the stage config ``cfg`` (nested configs
    flattened, 'sampler.steps'; the loop's own fields, 'lr', without a prefix) but ``RUN_CONTROL``, and ``extra``.
    ``resume`` refuses a state whose tag differs, naming the fields."""
    flat: dict[str, object] = {}

    def walk(prefix: str, fields: dict) -> None:
        for k, v in fields.items():
            if isinstance(v, dict):
                walk("" if k == "train" else f"{prefix}{k}.", v)
            elif k not in RUN_CONTROL:
                flat[prefix + k] = v

    walk("", config_dict(cfg))
    return flat | extra


DIVERGED = 3.0  # the divergence guard: a save refuses weights whose norm grew more than this since the last save.
# Training moves the toy teacher's norm by 2% over its whole run (and no tensor's by more than 1.7x); lr 1e6 by 1e5x.


def weight_norm(params: list[torch.nn.Parameter]) -> float:
    """The L2 norm of all ``params`` together."""
    with torch.no_grad():
        return math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in params))


def last_good(out: str | None) -> str:
    return f"the last good checkpoint is {out}" if out and Path(out).is_file() else "nothing was written"


def resume(state_path: Path | None, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA | None,
           tag: str | dict, scaler: torch.amp.GradScaler | None = None) -> tuple[int, list]:
    """Load a resumable state into model, optimizer, EMA and --amp's gradient scaler; returns (step, losses).

    ``tag`` names what the state belongs to (architecture, configuration); a state of anything else is refused.
    """
    if state_path is None or not state_path.is_file():
        raise FileNotFoundError(f"nothing to resume: {state_path} does not exist")
    state = load_state(state_path)
    old = state["tag"]
    if isinstance(old, dict) and isinstance(tag, dict) and old != tag:
        changed = [f"{k} {old.get(k, 'unset')} -> {tag.get(k, 'unset')}" for k in sorted(old.keys() | tag.keys())
                   if k != "arch" and old.get(k) != tag.get(k)] + (["the architecture"] if old.get("arch") !=
                                                                    tag.get("arch") else [])
        raise ValueError(f"{state_path} is of another run ({', '.join(changed)}); refusing to resume (resume with the "
                         "run's own settings, or write to another --out)")
    if old != tag:
        raise ValueError(f"{state_path} was trained with another architecture or configuration; refusing to resume")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.shadow = state["ema"]
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["step"], state["losses"]


def save_with_figures(out: str, pipe: Pipeline, title: str) -> Callable[[torch.nn.Module, int, list[float]], None]:
    """A ``fit`` save hook for a UNet: ``pipe`` with the stored UNet -> <out>, <out>.loss.png, <out>.samples.png."""

    def save(unet: torch.nn.Module, step: int, losses: list[float]) -> None:
        stored = pipe.with_parts(unet=unet)
        stored.save(out)
        write_figures(out, losses, stored, title)

    return save
