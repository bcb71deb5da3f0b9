"""The toy world's CLIP: a tiny open_clip model trained contrastively on toy images and captions.

It plays both roles CLIP plays in the paper: its text tower is the frozen text encoder of the toy diffusion model
(as CLIP ViT-L/14 is for SD, §2.1), and the whole model is the judge of CLIP score and the feature extractor of FID
(as ViT-g/14 is in §5). Tokens follow SD: <|startoftext|> ... <|endoftext|>, padded with <|endoftext|>, so the text
tower's 'argmax' pooling picks the first <|endoftext|>.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..eval.metrics import Judge, clip_score, fid, zero_shot_accuracy
from ..formats.checkpoint import atomic_write, config_dict, read_state_dict
from ..formats.images import to_tensor
from ..formats.weights import CheckpointError, apply_map
from ..text_encoder import TextConfig, TextEncoder, Tokenizer
from ..world import Said, Twins, World
from .pixel_judge import caption_accuracy

if TYPE_CHECKING:
    from ..pipeline import Pipeline

TOY_TEXT = TextConfig(width=64, layers=3, heads=4, context_length=32)  # toy captions are < 20 tokens
TOY_IMAGE = 64


def build_toy_clip() -> CustomTextCLIP:
    """A small ResNet image tower (CLIP's ModifiedResNet, width 8) and a 3-layer text transformer of width 64.

    A conv tower learns shapes of a dozen pixels far faster on a CPU than a ViT of the same cost (docs/toy_world.md).
    """
    vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, head_width=16, image_size=TOY_IMAGE)
    text = CLIPTextCfg(context_length=TOY_TEXT.context_length, width=TOY_TEXT.width, heads=TOY_TEXT.heads,
                       layers=TOY_TEXT.layers)
    return CustomTextCLIP(embed_dim=64, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def toy_judge(model: CustomTextCLIP) -> Judge:
    """Images in [0, 1] are fed to the toy CLIP as [-1, 1], the range it was trained on."""
    return Judge(model, Tokenizer(TOY_TEXT.context_length), TOY_IMAGE)


def text_encoder_from_clip(model: CustomTextCLIP) -> TextEncoder:
    """The toy CLIP's text tower as the diffusion model's frozen text encoder (its projection is not used)."""
    encoder = TextEncoder(TOY_TEXT)
    state = {"tower." + k: v for k, v in model.text.state_dict().items() if k != "text_projection"}
    apply_map(encoder, state, lambda k: [k], "toy CLIP text tower")
    return encoder.eval().requires_grad_(False)


@dataclass(frozen=True)
class ClipConfig:
    train_steps: int = 2500  # contrastive training steps
    batch_size: int = 128  # image-caption pairs per step (CLIP's loss wants large batches)
    lr: float = 2e-3  # peak of the one-cycle schedule
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_steps < 1 or self.batch_size < 2 or self.batch_size % 2 or not self.lr > 0:
            raise ValueError("the toy CLIP needs train-steps >= 1, an even batch-size >= 2 (a sample and its twin) and "
                             "lr > 0")


def train_clip_stage(cfg: ClipConfig, out: str | Path) -> dict[str, float]:
    """Train the toy CLIP, judge it zero-shot on held-out real images, save it (with both) to ``out``."""
    model = train_toy_clip(cfg.train_steps, cfg.batch_size, cfg.lr, cfg.seed)
    accuracy = evaluate_toy_clip(model)
    save_toy_clip(model, out, {"zero_shot_accuracy_heldout": accuracy, "training": config_dict(cfg)})
    print("zero-shot accuracy on held-out real toy images: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))
    return accuracy


def train_toy_clip(steps: int = 2500, batch: int = 128, lr: float = 2e-3, seed: int = 0,
                   log: bool = True) -> CustomTextCLIP:
    """Contrastive training (open_clip's ClipLoss) on freshly rendered toy samples, each beside its twin that
    differs in one named word (``world.Twins``: hard negatives, without which the text tower never tells places
    and textures apart); captions name more than people's do (``world.THOROUGH``). AdamW with cosine decay."""
    torch.manual_seed(seed)
    model = build_toy_clip()
    tokenizer = Tokenizer(TOY_TEXT.context_length)
    data = Twins(steps * batch, seed=seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98), fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = ClipLoss()
    model.train()
    bar = tqdm(loader, total=steps, desc="toy CLIP", disable=not log)
    for images, captions in bar:
        image_f, text_f, scale = model(images, tokenizer(captions))
        loss = loss_fn(image_f, text_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP caps the temperature at 100
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def evaluate_toy_clip(model: CustomTextCLIP, n: int = 1000, seed: int = 1234) -> dict[str, float]:
    """Zero-shot accuracy per attribute on ``n`` real images of held-out captions (each attribute a caption names,
    against the captions that change only it)."""
    images, truth = real_heldout(n, seed)
    return zero_shot_accuracy(toy_judge(model), images, truth)


def save_toy_clip(model: CustomTextCLIP, path: str | Path, info: dict) -> None:
    """Plain open_clip weights (loadable by open_clip) with ``info`` (accuracy, training config) as metadata."""
    meta = {"snapfusion_min_toy_clip": json.dumps(info)}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def load_toy_clip(path: str | Path) -> CustomTextCLIP:
    """The toy CLIP of ``path``; a file that is not one is an error naming it."""
    state = read_state_dict(path)
    model = build_toy_clip()
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise CheckpointError(f"{path}: not a toy CLIP checkpoint (train.py clip writes one)") from None
    return model.eval()


def toy_clip_scorer(clip: CustomTextCLIP, n: int = 64, steps: int = 10, guidance: float | None = None,
                    seed: int = 99) -> Callable[[Pipeline], float]:
    """Alg. 1's quality score on the toy world: CLIP score on ``n`` fixed validation prompts and seeds (seed 99, not
    the held-out evaluation's 1234), ``steps`` DDIM steps, the pipeline's own guidance unless given."""

    def score(pipe: Pipeline) -> float:
        return evaluate_generation(pipe, clip, n=n, steps=steps, guidance=guidance, seed=seed,
                                   reference=False)["clip_score"]

    return score


@torch.no_grad()
def per_prompt(pipe: Pipeline, clip: CustomTextCLIP, n: int, steps: int, guidance: float,
               heldout: Heldout | None = None, progress: bool = False) -> dict:
    """Per held-out prompt: the generated image's CLIP cosine with its caption ('cos', [n]) and its image features
    ('features', [n, dim], for FID); and over all ``n``, both judges' accuracy per attribute ('accuracy', 'judged').
    What the bootstrap of the report pages resamples (``eval.bootstrap``)."""
    heldout = heldout or Heldout(clip, n)
    out = evaluate_generation(pipe, clip, n=n, steps=steps, guidance=guidance, reference=False, heldout=heldout,
                              progress=progress)
    j = toy_judge(clip)
    features = j.image_features(out["images"], normalize=False).cpu()  # encoded once: the cosine normalises them
    return {"cos": (F.normalize(features, dim=-1) * j.text_features(heldout.prompts)).sum(-1),
            "features": features, "accuracy": out["accuracy"], "judged": out["judged"]}


def real_heldout(n: int, seed: int = 1234) -> tuple[torch.Tensor, list[Said]]:
    """``n`` real held-out images in [0, 1] and what their captions say."""
    data = World("heldout", length=n, seed=seed)
    samples = [data.sample(i) for i in range(n)]
    return (torch.stack([to_tensor(image) for image, _ in samples]) + 1) / 2, [c for _, c in samples]


class Heldout:
    """``n`` real held-out images in [0, 1] and what their captions say; on first use, what the judges read in them
    and in their autoencoder round trip (the ceilings of a table's rows): worked out once a table, not once a row."""

    def __init__(self, clip: CustomTextCLIP, n: int, seed: int = 1234) -> None:
        self.clip, self.n, self.seed = clip, n, seed
        self.images, self.truth = real_heldout(n, seed)
        self.prompts = [c.caption for c in self.truth]
        self._real: dict | None = None
        self._decoded: list[tuple[torch.nn.Module, dict]] = []  # (autoencoder, its round trip's scores)

    def scores(self, images: torch.Tensor) -> dict:
        """Both judges' accuracy per attribute the captions name, and the CLIP score, of ``images`` ([0, 1])."""
        judge = toy_judge(self.clip)
        return {"accuracy": zero_shot_accuracy(judge, images, self.truth),
                "judged": caption_accuracy(images, self.truth), "clip_score": clip_score(judge, images, self.prompts)}

    def real(self) -> dict:
        """The real images' scores and toy-CLIP features (for FID)."""
        if self._real is None:
            features = toy_judge(self.clip).image_features(self.images, normalize=False)
            self._real = {**self.scores(self.images), "features": features}
        return self._real

    @torch.no_grad()
    def decoded(self, vae: torch.nn.Module, batch: int = 100) -> dict:
        """The scores of the real images after ``vae``'s round trip (the posterior's mean): the best a latent model
        can do."""
        for known, scores in self._decoded:
            if known is vae:
                return scores
        device = next(vae.parameters()).device
        images = torch.cat([vae.decode(vae.encode(x.to(device) * 2 - 1, sample=False)).add(1).div(2).clamp(0, 1).cpu()
                            for x in self.images.split(batch)])
        self._decoded.append((vae, self.scores(images)))
        return self._decoded[-1][1]


@torch.no_grad()
def evaluate_generation(pipe: Pipeline, clip: CustomTextCLIP, *, n: int = 500, steps: int | None = None,
                        guidance: float | None = None, seed: int = 1234, batch: int = 100,
                        reference: bool = True, progress: bool = False, heldout: Heldout | None = None) -> dict:
    """Generate images for ``n`` held-out prompts and judge them against real images of the same prompts.

    Returns, by both judges, per attribute the captions name: the toy CLIP's zero-shot accuracy ('accuracy') and the
    pixel judge's ('judged', ``pixel_judge.caption_accuracy``), and the CLIP score of the generated images; with
    ``reference`` the same of real images and of their autoencoder round trip (the ceilings, '_real' and '_decoded'),
    and FID between generated and real images on the toy CLIP's image features. ``heldout``: the prompts and their
    reference scores of an earlier call (the same ``n``, ``seed`` and judge), not worked out again.
    """
    heldout = heldout or Heldout(clip, n, seed)
    if (heldout.n, heldout.seed, heldout.clip) != (n, seed, clip):
        raise ValueError(f"held-out set of {heldout.n} prompts (seed {heldout.seed}) given for {n} (seed {seed})")
    steps = pipe.sampler.steps if steps is None else steps
    guidance = pipe.sampler.guidance if guidance is None else guidance
    bar = tqdm(total=n, unit="image", desc=f"{steps} steps, w={guidance:g}", disable=not progress, leave=False)
    generated = []
    for i in range(0, n, batch):
        generated.append(pipe(heldout.prompts[i:i + batch], steps=steps, guidance=guidance, seed=seed + i,
                              height=TOY_IMAGE, width=TOY_IMAGE, output_type="pt").cpu())
        bar.update(len(generated[-1]))
    bar.close()
    generated = torch.cat(generated)
    out = {**heldout.scores(generated), "steps": steps, "guidance": guidance, "n": n, "images": generated}
    if not reference:
        return out
    real, decoded = heldout.real(), heldout.decoded(pipe.vae, batch)
    features = toy_judge(clip).image_features(generated, normalize=False)
    return {**out, **{f"{k}_real": v for k, v in real.items() if k != "features"},
            **{f"{k}_decoded": v for k, v in decoded.items()}, "fid": fid(features, real["features"])}
