"""§5's evaluation at SD scale: captions -> a folder of generated images -> CLIP score and FID.

The protocol of the paper and its peers (BK-SDM): 30K MS-COCO val2014 captions, one per image; 512x512 images,
resized to 256x256 for FID on Inception-v3 features against the real images (or their precomputed statistics); CLIP
score with open_clip's ViT-g/14 as the mean cosine of each image with its caption (0.30 for SD-v1.5 in Table 2).

Generation is resumable and shards over ``torchrun`` ranks: image i is ``<folder>/<i:05d>.png``, started from
seed + i (so neither batching nor the number of ranks changes it), written atomically, and skipped when it exists;
``generation.json`` records the settings, and a folder made with other settings or prompts is refused.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from ..formats.checkpoint import atomic_write, regular_file
from ..pipeline import Pipeline
from .metrics import (
    Judge,
    clip_score,
    fid_from_statistics,
    fid_statistics,
    image_files,
    inception_features,
    load_statistics,
    read_images,
)


def read_prompt_file(path: str | Path, n: int | None = None, seed: int = 0) -> list[str]:
    """Captions to generate from: a text file (one per line, in order), or MS-COCO's ``captions_*.json``, where each
    image gets one of its captions, chosen with ``seed``, and the images are taken in a seeded random order (the first
    ``n``: a fixed subset, e.g. 30K of val2014's 40,504)."""
    path = regular_file(path, "prompts file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path} is not UTF-8 text (byte {e.start} cannot be read)") from None
    if path.suffix.lower() == ".json":
        prompts = _coco_captions(path, text, seed)
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts")
    if n is not None and n > len(prompts):
        raise ValueError(f"asked for {n} prompts, {path} has {len(prompts)}")
    return prompts[:n]


def _coco_captions(path: Path, text: str, seed: int) -> list[str]:
    try:
        annotations = json.loads(text)["annotations"]
        by_image: dict[int, list[tuple[int, str]]] = {}
        for a in annotations:
            if not isinstance(a["caption"], str):  # null or a number: not a caption to generate from
                raise ValueError(f"annotation {a.get('id')}'s caption is {json.dumps(a['caption'])}, not text")
            by_image.setdefault(int(a["image_id"]), []).append((int(a["id"]), a["caption"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not an MS-COCO captions file ({type(e).__name__}: {e})") from None
    rng = random.Random(seed)
    chosen = [rng.choice(sorted(by_image[i]))[1] for i in sorted(by_image)]  # captions in annotation-id order
    rng.shuffle(chosen)
    return [" ".join(c.split()) for c in chosen]  # COCO captions carry stray newlines and double spaces


def _settings(pipe: Pipeline, prompts: list[str], steps: int, guidance: float, seed: int, size: int) -> dict:
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    source = str(Path(pipe.source).resolve()) if pipe.source and Path(pipe.source).exists() else pipe.source
    return {"checkpoint": source, "steps": steps, "guidance": guidance, "spacing": pipe.sampler.spacing,
            "sampler": pipe.sampler.solver,
            "seed": seed, "resolution": size, "prediction": pipe.prediction, "n": len(prompts),
            "prompts_sha256": digest}


def check_folder(folder: Path, settings: dict) -> None:
    """Refuse a folder whose images were made with other settings (resuming there would mix two experiments)."""
    record = folder / "generation.json"
    if record.is_file():
        old = {"sampler": "ddim", **json.loads(record.read_text())}  # folders made before the sampler was recorded
        differ = [f"{k} {old.get(k)!r} vs {v!r}" for k, v in settings.items() if old.get(k) != v]
        if differ:
            raise ValueError(f"{folder} holds images made with other settings ({'; '.join(differ[:3])}); "
                             "choose another folder")
    elif folder.is_dir() and image_files(folder):
        raise ValueError(f"{folder} holds images but no generation.json; choose another folder")


@torch.no_grad()
def generate_folder(pipe: Pipeline, prompts: list[str], folder: str | Path, *, steps: int | None = None,
                    guidance: float | None = None, seed: int = 0, batch: int = 8, rank: int = 0, world: int = 1,
                    size: int | None = None, progress: bool = True) -> int:
    """Generate image i of ``prompts`` into ``folder/<i:05d>.png`` for this rank's share (batches b with
    b % world == rank), skipping images already there; returns how many were made. Resumed with the same ``batch``,
    the images are byte for byte those of one uninterrupted run (a batch's float sums depend on its size)."""
    folder = Path(folder)
    steps = pipe.sampler.steps if steps is None else steps
    guidance = pipe.sampler.guidance if guidance is None else guidance
    size = pipe.sampler.resolution if size is None else size
    settings = _settings(pipe, prompts, steps, guidance, seed, size)
    check_folder(folder, settings)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "generation.json", lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=1)))
    blocks = [range(start, min(start + batch, len(prompts))) for start in range(rank * batch, len(prompts),
                                                                               world * batch)]
    todo = [b for b in blocks if not all((folder / f"{i:05d}.png").is_file() for i in b)]
    made = 0
    bar = tqdm(total=sum(map(len, todo)), desc=f"images (rank {rank})" if world > 1 else "images",
               disable=not progress)
    for block in todo:  # a whole batch even where some of it exists: the same batch, the same bytes as one run
        z = torch.cat([pipe.initial_latents(1, size, size, seed + i) for i in block])
        images = pipe([prompts[i] for i in block], steps=steps, guidance=guidance, latents=z, height=size, width=size)
        for i, image in zip(block, images):
            if (folder / f"{i:05d}.png").is_file():
                continue
            meta = PngInfo()
            for key in ("prompt", "seed", "steps", "guidance", "checkpoint"):
                meta.add_text(key, str({"prompt": prompts[i], "seed": seed + i}.get(key, settings.get(key))))
            atomic_write(folder / f"{i:05d}.png",
                         lambda tmp, image=image, meta=meta: image.save(tmp, format="PNG", pnginfo=meta))
            made += 1
        bar.update(len(block))
    bar.close()
    return made


def generated_files(folder: str | Path, n: int) -> list[Path]:
    """The n images of a finished generation, in prompt order; ValueError naming what is missing."""
    files = [Path(folder) / f"{i:05d}.png" for i in range(n)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{folder}: {len(missing)} of {n} images missing (e.g. {missing[0]}); run the generation "
                         "again to finish it")
    return files


def check_reference(reference: str | Path) -> dict[str, np.ndarray] | list[Path]:
    """FID's reference, checked before any work: an .npz's statistics (finite, 'mu' and 'sigma'), or the image files
    of a folder of real images (at least 2)."""
    if not Path(reference).is_dir():
        return load_statistics(reference)
    files = image_files(reference)
    if len(files) < 2:  # no covariance from fewer
        raise ValueError(f"FID reference folder {reference} holds {len(files)} image(s); FID needs at least 2 "
                         "(the paper's protocol: 30,000)")
    return files


def reference_statistics(checked: dict[str, np.ndarray] | list[Path], net: torch.nn.Module,
                         size: int | None) -> dict[str, np.ndarray]:
    """FID's reference from ``check_reference``'s answer: the .npz's statistics as they are, or those of the folder's
    real images (resized to ``size``)."""
    return checked if isinstance(checked, dict) else fid_statistics(inception_features(net, read_images(checked, size)))


def score_folder(folder: str | Path, prompts: list[str], *, judge: Judge | None = None,
                 inception: torch.nn.Module | None = None, reference: dict[str, np.ndarray] | None = None,
                 fid_size: int | None = 256, batch: int = 50) -> dict[str, float]:
    """CLIP score (with ``judge``) and FID (Inception features vs ``reference`` statistics, images resized to
    ``fid_size``) of a finished generation."""
    files = generated_files(folder, len(prompts))
    out: dict[str, float] = {"n": len(files)}
    if judge is not None:
        total = 0.0
        for k, images in enumerate(read_images(files, batch=batch)):
            total += clip_score(judge, images.float() / 255, prompts[k * batch:(k + 1) * batch]) * len(images)
        out["clip_score"] = total / len(files)
    if inception is not None and reference is not None:
        out["fid"] = fid_from_statistics(fid_statistics(inception_features(inception, read_images(files, fid_size))),
                                         reference)
    return out


def subfolder(steps: int, guidance: float) -> str:
    """Where one (steps, guidance) setting of a sweep goes: e.g. 's8-w7.5'."""
    return re.sub(r"[^\w.-]", "_", f"s{steps}-w{guidance:g}")


def clip_scorer(judge: Judge, prompts: list[str], *, steps: int | None = None, guidance: float | None = None,
                seed: int = 0, batch: int = 8) -> Callable[[Pipeline], float]:
    """Alg. 1's quality measure at SD scale: the CLIP score of a pipeline's images of a fixed prompt subset (e.g. 2K
    COCO captions), same seeds every call, so ΔCLIP compares architectures, not noise draws."""

    @torch.no_grad()
    def score(pipe: Pipeline) -> float:
        total = 0.0
        for k in range(0, len(prompts), batch):
            chunk = prompts[k:k + batch]
            images = pipe(chunk, steps=steps, guidance=guidance, seed=seed + k, output_type="pt")
            total += clip_score(judge, images, chunk) * len(chunk)
        return total / len(prompts)

    return score
