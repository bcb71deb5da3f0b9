"""Every stage of the recipe at SD-v1.5's full size, on random weights, in one command (``recipe.py --smoke sd15``).

Random SD-v1.5 weights are written in the original single-file layout, then each stage runs a few steps at a small
resolution: v-prediction fine-tune (§4.1) -> robust training (Eq. 5) -> the latency table of the sd15 spec and one
evolving step (Alg. 1, an open_clip scorer) -> 32->16 and 16->8 distillation (CFG loss on, Eq. 10-11) -> decoder
pruning and a data-distillation step (§3.2) -> Core ML conversion of the evolved UNet -> sampling. It proves the code
runs at the paper's size and measures what it costs: wall time and peak resident memory per stage (numbers are not
results: the weights are random). Memory options GPU users need anyway are settings here: ``SmokeConfig``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from ..arch import sd15
from ..formats.checkpoint import atomic_write
from ..formats.weights import to_ldm
from ..pipeline import random_pipeline
from ..world import World
from . import distill_command, evolve_command, export_command, sample_command, train_command

COMMANDS = {"train": train_command, "distill": distill_command, "evolve": evolve_command, "export": export_command,
            "sample": sample_command}  # what the smoke run calls, in this process


@dataclass(frozen=True)
class SmokeConfig:
    resolution: int = 128  # image side (latents 16x16); SD-v1.5's own is 512
    batch_size: int = 2
    steps: int = 1  # optimizer steps per training stage
    optimizer: str = "adamw"  # or 'adafactor'
    checkpointing: bool = False  # gradient checkpointing of the UNet's blocks
    teacher_dtype: str = "float32"  # or 'bfloat16' (emulated on a CPU without native bf16: ~20x slower here)
    ema: bool = False  # an EMA copy of the trained weights (+3.4 GB at SD-v1.5's size)


def peak_reset() -> None:
    """Start a new peak-memory measurement: free what Python and the allocator hold, reset the kernel's high-water
    mark of this process (Linux)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_gib() -> float:
    """The peak resident memory of this process since ``peak_reset`` (VmHWM), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_data(folder: Path, n: int, resolution: int) -> str:
    """n toy images with .txt captions: a captioned folder for the training stages."""
    folder.mkdir(parents=True, exist_ok=True)
    toy = World("train", seed=0, resolution=resolution)
    for i in range(n):
        image, combo = toy.sample(i)
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(combo.caption)
    return str(folder)


def commands(c: SmokeConfig, work: Path) -> list[tuple[str, str, list[str]]]:
    """(stage, command, flags) in order: docs/sd_scale.md's runbook with a smoke run's sizes."""
    f = {n: str(work / f"{n}.safetensors") for n in ("sd15", "v", "robust", "evolved", "teacher16", "student8",
                                                     "pruned")}
    data = str(work / "data")
    train = ["--data", data, "--train-steps", str(c.steps), "--batch-size", str(c.batch_size), "--lr", "1e-5",
             "--optimizer", c.optimizer, "--no-state"]
    options = [*([] if c.ema else ["--no-ema"]), *(["--checkpointing"] if c.checkpointing else [])]  # UNet training
    unet = [*train, *options, "--warmup", "0"]
    distil = [*train, *options, "--cfg-prob", "1", "--teacher-dtype", c.teacher_dtype]
    evolve = ["--checkpoint", f["robust"], "--data", data, "--clip", "ViT-B-32", "--clip-weights",
              str(work / "clip.pt"), "--prompts-file", str(work / "prompts.txt"), "--score-prompts", "2",
              "--num-prompts", "2", "--num-inference-steps", "2", "--table", str(work / "lut.json"), "--target",
              "0.99", "--iterations", "1", "--actions", "1", "--robust-steps", str(c.steps), "--finetune-steps",
              str(c.steps), "--batch-size", str(c.batch_size), "--lr", "1e-5", "--optimizer", c.optimizer, *options,
              "--out", f["evolved"]]
    return [
        ("v-prediction fine-tune (§4.1)", "train", ["unet", "--init", f["sd15"], "--prediction", "v", "--resolution",
                                                    str(c.resolution), *unet, "--out", f["v"]]),
        ("robust training (Eq. 5)", "train", ["unet", "--init", f["v"], "--keep-prob", "0.9", *unet, "--out",
                                              f["robust"]]),
        ("latency table + evolving step (Alg. 1)", "evolve", evolve),
        ("distillation 32 -> 16 (Eq. 10-11)", "distill", ["--teacher", f["v"], "--teacher-steps", "32",
                                                          "--student-steps", "16", *distil, "--out", f["teacher16"]]),
        ("distillation 16 -> 8 (Eq. 10-11)", "distill", ["--teacher", f["teacher16"], "--student-init", f["evolved"],
                                                         "--teacher-steps", "16", "--student-steps", "8", *distil,
                                                         "--out", f["student8"]]),
        ("decoder pruning + distillation (§3.2)", "train", ["decoder", "--init", f["v"], "--latents", "2",
                                                            "--teacher-steps", "2", *train, "--out", f["pruned"]]),
        ("Core ML (evolved UNet)", "export", ["--checkpoint", f["evolved"], "--parts", "unet", "--resolution",
                                              str(c.resolution), "--out-dir", str(work / "coreml")]),
        ("sampling (8 steps, pruned decoder)", "sample", ["--checkpoint", f["student8"], "--decoder", f["pruned"],
                                                          "--prompt", "a large red circle on a gray background",
                                                          "--out-dir", str(work / "samples")]),
    ]


def prepare(c: SmokeConfig, work: Path) -> str:
    """Random SD-v1.5 weights in the single-file layout, a captioned image folder, a random open_clip ViT-B-32 (the
    scorer's shape; ViT-g-14 in earnest) and a prompt file."""
    write_data(work / "data", 8, c.resolution)
    (work / "prompts.txt").write_text("\n".join(World("heldout", seed=1).sample(i)[1].caption for i in range(4)))
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), work / "clip.pt")
    pipe = random_pipeline(sd15())
    state = to_ldm(pipe.unet, pipe.vae, pipe.text_encoder)
    atomic_write(work / "sd15.safetensors", lambda tmp: save_file(state, tmp))
    size = (work / "sd15.safetensors").stat().st_size / 2**30
    return f"{sum(v.numel() for v in state.values()) / 1e6:.0f}M parameters, {size:.2f} GiB"


def run_command(command: str, argv: list[str]) -> str:
    """``python <command>.py <argv>`` in this process (its memory is this process's); returns its name, e.g.
    `train.py unet`."""
    COMMANDS[command].main(argv)
    return f"`{command}.py {argv[0] if not argv[0].startswith('-') else ''}`".replace(" `", "`")


def run_smoke(c: SmokeConfig, work: Path, keep: bool = False) -> list[dict]:
    """Every stage in order; a table row each (wall time, peak memory); the work folder (several 3-4 GB files) is
    deleted at the end unless ``keep``."""
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"settings: {dataclasses.asdict(c)}\n| stage | wall | peak RSS | note |\n|---|---|---|---|", flush=True)
    try:
        steps = [("random SD-v1.5 weights (single file)", lambda: prepare(c, work))]
        for name, command, argv in commands(c, work):
            steps.append((name, lambda command=command, argv=argv: run_command(command, argv)))
        for name, run in steps:
            peak_reset()
            start = time.perf_counter()
            note = run()
            rows.append({"stage": name, "seconds": time.perf_counter() - start, "peak_gib": peak_gib(), "note": note})
            r = rows[-1]
            print(f"| {name} | {r['seconds']:.0f} s | {r['peak_gib']:.1f} GiB | {note} |", flush=True)
        atomic_write(work.parent / f"{work.name}.json",
                     lambda tmp: Path(tmp).write_text(json.dumps({"config": dataclasses.asdict(c), "rows": rows},
                                                                 indent=1)))
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return rows
