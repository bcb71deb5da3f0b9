"""The paper's metrics (§3.1, §5): CLIP score and FID, plus per-attribute zero-shot accuracy for the toy world.

A ``Judge`` wraps any open_clip model: the toy CLIP here, or e.g. ViT-g/14 from a local weights file for real runs
(the paper's CLIP score uses ViT-g/14). FID is the Frechet distance between Gaussian fits of image features; its
extractor is pluggable (the toy CLIP's image features here; Inception features for real runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import ALL_COMBOS, ATTRIBUTES, Combo


class Judge:
    """Embeds images (float [B, 3, H, W] in [0, 1]) and captions with an open_clip model, both L2-normalised."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], image_size: int,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        self.model, self.tokenizer, self.image_size = model.eval(), tokenizer, image_size
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, normalize: bool = True, batch: int = 256) -> torch.Tensor:
        out = []
        for chunk in images.split(batch):
            x = chunk.float().to(self.device)
            if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
            out.append(self.model.encode_image(x, normalize=normalize).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, captions: Sequence[str], batch: int = 256) -> torch.Tensor:
        out = [self.model.encode_text(self.tokenizer(list(captions[i:i + batch])).to(self.device), normalize=True)
               for i in range(0, len(captions), batch)]
        return torch.cat(out).float().cpu()



def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images (or batches) in [0, 1]: 10 log10(1 / MSE)."""
    return 10 * torch.log10(1 / ((a.float() - b.float()) ** 2).mean().clamp_min(1e-12)).item()

def clip_score(judge: Judge, images: torch.Tensor, captions: Sequence[str]) -> float:
    """Mean cosine similarity of each image with its own caption (the paper reports e.g. 0.30)."""
    return (judge.image_features(images) * judge.text_features(captions)).sum(-1).mean().item()


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)), in float64.

    tr((C1 C2)^(1/2)) = tr((C1^(1/2) C2 C1^(1/2))^(1/2)): the inner matrix is symmetric PSD, so two symmetric
    eigendecompositions replace a general matrix square root (no complex parts, no ill-conditioned sqrtm).
    """
    mu1, mu2, cov1, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, cov1, cov2))
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    tr_covmean = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_covmean)


def fid(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """FID from two feature sets [N, D] (any extractor)."""
    f1, f2 = features1.double().numpy(), features2.double().numpy()
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def attribute_probabilities(judge: Judge, images: torch.Tensor, combos: Sequence[Combo] = ALL_COMBOS,
                            temperature: float = 100.0) -> dict[str, torch.Tensor]:
    """Zero-shot: softmax over the captions of all combinations, marginalised per attribute -> {attr: [B, values]}."""
    logits = temperature * judge.image_features(images) @ judge.text_features([c.caption for c in combos]).T
    probs = logits.softmax(-1)
    out = {}
    for attr, values in ATTRIBUTES.items():
        index = torch.tensor([values.index(getattr(c, attr)) for c in combos])
        out[attr] = torch.zeros(len(images), len(values)).index_add_(1, index, probs)
    return out


def zero_shot_accuracy(judge: Judge, images: torch.Tensor, truth: Sequence[Combo]) -> dict[str, float]:
    """Fraction of images whose most probable value of each attribute is the true one."""
    probs = attribute_probabilities(judge, images)
    return {attr: (probs[attr].argmax(-1) == torch.tensor([values.index(getattr(c, attr)) for c in truth]))
            .float().mean().item() for attr, values in ATTRIBUTES.items()}
