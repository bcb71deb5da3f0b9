"""Intervals that count both sources of noise, and one rule that reads them (the report pages' verdicts).

A model's score moves with the prompts it is judged on *and* with the seed it was trained with (on the toy world,
training seeds move CLIP by more than prompt sets do). So a resample here draws the n prompts *and* the k training
seeds with replacement — the same draws for every model (paired), a model of one seed (a teacher) keeping it in
every draw — and recomputes the statistic. Draw 0 is every prompt and seed once: the estimate.

One rule reads the interval of a difference, for its direction and its significance alike: 'better' when the whole
95% interval lies on the better side of 0, 'worse' when it lies on the other, else 'tie'. The point estimate decides
nothing (FID's resamples repeat images, which raises FID, so its estimate can lie outside its own interval). A claim
that a model *keeps* another's quality holds only when the interval lies above minus a stated margin: a tie alone
shows nothing. A curve's best value over guidance is taken inside each draw (``best_over``), so the search over the
grid is part of the noise too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from .metrics import fid_statistics, frechet_distance, psd_sqrt

K = TypeVar("K")


@dataclass(frozen=True)
class Draws:
    """Row r of ``prompts`` [count + 1, n] and ``seeds`` [count + 1, k] is resample r; row 0 is the identity."""

    prompts: torch.Tensor
    seeds: torch.Tensor

    @property
    def count(self) -> int:
        return self.prompts.shape[0]


def draws(n: int, k: int, count: int, seed: int = 0) -> Draws:
    """``count`` resamples of n prompts and k training seeds (with replacement), after the identity."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.cat([torch.arange(n)[None], torch.randint(n, (count, n), generator=g)])
    seeds = torch.cat([torch.arange(k)[None], torch.randint(k, (count, k), generator=g)])
    return Draws(prompts, seeds)


def _seed_rows(models: int, d: Draws) -> torch.Tensor:
    """The drawn seeds as indices into a model's ``models`` seeds: all of them, or its single one every time."""
    k = d.seeds.shape[1]
    if models not in (1, k):
        raise ValueError(f"a model judged with {models} seeds, the draws resample {k}: give 1 or {k}")
    return d.seeds if models == k else torch.zeros_like(d.seeds)


def mean_draws(per_seed: list[torch.Tensor], d: Draws) -> np.ndarray:
    """Per draw, the mean over the drawn seeds and prompts of a per-prompt score (CLIP cosines: one [n] a seed)."""
    values = torch.stack(per_seed).double()  # [k, n]
    rows = _seed_rows(len(per_seed), d)
    return values[rows[:, :, None], d.prompts[:, None, :]].mean((1, 2)).numpy()


def fid_draws(per_seed: list[torch.Tensor], real: torch.Tensor, d: Draws) -> np.ndarray:
    """Per draw, the mean over the drawn seeds of FID between the drawn prompts' generated features (one [n, dim]
    a seed) and the same prompts' real ones."""
    return fid_draws_all({0: per_seed}, real, d)[0]


def fid_draws_all(models: Mapping[K, list[torch.Tensor]], real: torch.Tensor, d: Draws) -> dict[K, np.ndarray]:
    """``fid_draws`` of every model (key -> per-seed features) against the same real features: a draw's real fit
    and its covariance's square root are computed once for all of them."""
    rows = {k: _seed_rows(len(per_seed), d) for k, per_seed in models.items()}
    out = {k: np.empty(d.count) for k in models}
    for r in range(d.count):
        i = d.prompts[r]
        ref = fid_statistics(real[i])
        root = psd_sqrt(ref["sigma"])
        for k, per_seed in models.items():
            drawn = rows[k][r].tolist()
            fits = {s: fid_statistics(per_seed[s][i]) for s in set(drawn)}
            each = {s: frechet_distance(ref["mu"], ref["sigma"], f["mu"], f["sigma"], root) for s, f in fits.items()}
            out[k][r] = np.mean([each[s] for s in drawn])
    return out


def interval(values: np.ndarray) -> tuple[float, float, float]:
    """(estimate, 2.5th, 97.5th percentile) of ``values`` = [estimate, resample 1, ...]."""
    lo, hi = np.percentile(values[1:], [2.5, 97.5])
    return float(values[0]), float(lo), float(hi)


def gain(mine: np.ndarray, theirs: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """How much better ``mine`` is than ``theirs`` in each draw (positive: better)."""
    return mine - theirs if higher_is_better else theirs - mine


def verdict(gains: np.ndarray) -> str:
    """'better' / 'worse' when the 95% interval of ``gains`` lies wholly above / below 0, else 'tie'."""
    _, lo, hi = interval(gains)
    return "better" if lo > 0 else "worse" if hi < 0 else "tie"


def keeps(gains: np.ndarray, margin: float) -> bool:
    """'Mine keeps theirs': the 95% interval of ``gains`` lies above ``-margin`` (a tie within a wide interval
    shows nothing)."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    return interval(gains)[1] > -margin


def keeps_quality(mine: np.ndarray, theirs: np.ndarray, metric: str, margin: float) -> bool:
    """``keeps`` on a metric's draws ('clip': higher is better, the margin absolute; 'fid': lower is better, the
    margin a fraction of ``theirs``' estimate)."""
    scale = 1.0 if metric == "clip" else abs(theirs[0])
    return keeps(gain(mine, theirs, metric == "clip"), margin * scale)


def best_over(curve: dict[float, np.ndarray], higher_is_better: bool) -> np.ndarray:
    """A curve's best value over guidance, taken inside each draw (``curve``: guidance -> draws)."""
    stacked = np.stack(list(curve.values()))
    return stacked.max(0) if higher_is_better else stacked.min(0)
