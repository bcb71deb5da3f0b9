"""eval/bootstrap.py: intervals over prompts *and* training seeds, and the one rule that reads them -- against
brute force and against the constructed cases an outside audit found (a verdict whose direction came from the point
estimate, a 'keeps' claim that counted a tie, intervals that left seeds out, a best over guidance taken outside the
resample)."""

import numpy as np
import pytest
import torch

from snapfusion_min.eval import bootstrap
from snapfusion_min.eval.metrics import fid


def test_draws_start_with_the_identity_and_resample_prompts_and_seeds():
    d = bootstrap.draws(40, 3, 200)
    assert d.prompts.shape == (201, 40) and d.seeds.shape == (201, 3) and d.count == 201
    assert d.prompts[0].tolist() == list(range(40)) and d.seeds[0].tolist() == [0, 1, 2]
    assert len(set(d.prompts[1].tolist())) < 40  # with replacement
    assert any(len(set(row.tolist())) < 3 for row in d.seeds[1:])  # seeds too
    again = bootstrap.draws(40, 3, 200)
    assert torch.equal(d.prompts, again.prompts) and torch.equal(d.seeds, again.seeds)


def test_means_and_fids_of_each_draw_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    cos = [0.8 + 0.05 * torch.randn(30, generator=g) for _ in range(3)]
    feats = [torch.randn(30, 5, generator=g) for _ in range(3)]
    real = torch.randn(30, 5, generator=g)
    d = bootstrap.draws(30, 3, 6)
    means, fids = bootstrap.mean_draws(cos, d), bootstrap.fid_draws(feats, real, d)
    for r in range(d.count):
        i, seeds = d.prompts[r], d.seeds[r].tolist()
        assert means[r] == pytest.approx(np.mean([cos[s][i].double().mean().item() for s in seeds]), rel=1e-12)
        assert fids[r] == pytest.approx(np.mean([fid(feats[s][i], real[i]) for s in seeds]), rel=1e-12)
    every = bootstrap.fid_draws_all({"student": feats, "teacher": feats[2:]}, real, d)  # one real fit a draw, shared
    assert every["student"] == pytest.approx(fids, rel=1e-12)
    assert every["teacher"] == pytest.approx([fid(feats[2][i], real[i]) for i in d.prompts], rel=1e-12)
    one = bootstrap.mean_draws(cos[:1], d)  # a model of one seed (the teacher) keeps it in every draw
    assert one == pytest.approx([cos[0][i].double().mean().item() for i in d.prompts])
    with pytest.raises(ValueError, match="2 seeds"):
        bootstrap.mean_draws(cos[:2], d)


def test_the_interval_counts_the_training_seeds():
    """Two arms whose prompts agree closely but whose seeds scatter: over prompts alone they would look apart; over
    seeds as well, the interval holds 0 -- a tie."""
    g = torch.Generator().manual_seed(1)
    base = 0.01 * torch.randn(200, generator=g)
    a = [base + m for m in (0.80, 0.86, 0.74)]  # seed means scatter by +-0.06
    b = [base + m for m in (0.79, 0.81, 0.77)]
    d = bootstrap.draws(200, 3, 1000)
    gains = bootstrap.gain(bootstrap.mean_draws(a, d), bootstrap.mean_draws(b, d), True)
    assert gains[0] == pytest.approx(0.01, abs=1e-6) and bootstrap.verdict(gains) == "tie"
    prompts_only = bootstrap.Draws(d.prompts, torch.arange(3).expand(d.count, 3))
    narrow = bootstrap.gain(bootstrap.mean_draws(a, prompts_only), bootstrap.mean_draws(b, prompts_only), True)
    assert bootstrap.verdict(narrow) == "better"  # what leaving the seeds out would have said


def test_one_rule_direction_and_significance_from_the_interval():
    """FID's resamples are biased upward: a constructed difference whose estimate says 'better' while every
    resample says 'worse' is 'worse'."""
    est_better = np.concatenate([[0.5], np.linspace(-3.0, -1.0, 500)])
    assert bootstrap.verdict(est_better) == "worse"
    assert bootstrap.verdict(np.concatenate([[-0.5], np.linspace(1.0, 3.0, 500)])) == "better"
    assert bootstrap.verdict(np.concatenate([[2.0], np.linspace(-1.0, 3.0, 500)])) == "tie"
    assert bootstrap.verdict(bootstrap.gain(np.full(9, 10.0), np.full(9, 12.0), False)) == "better"  # FID lower


def test_keeps_needs_the_interval_above_the_margin_not_a_tie():
    wide_tie = np.concatenate([[0.0], np.linspace(-0.05, 0.05, 500)])
    assert bootstrap.verdict(wide_tie) == "tie" and not bootstrap.keeps(wide_tie, margin=0.01)
    narrow = np.concatenate([[-0.002], np.linspace(-0.006, 0.002, 500)])
    assert bootstrap.keeps(narrow, margin=0.01) and not bootstrap.keeps(narrow, margin=0.005)
    with pytest.raises(ValueError, match="margin"):
        bootstrap.keeps(narrow, -1)


def test_the_best_over_guidance_is_taken_inside_each_draw():
    curve = {1.0: np.array([0.5, 0.9, 0.1]), 2.0: np.array([0.6, 0.2, 0.3])}
    assert bootstrap.best_over(curve, True).tolist() == [0.6, 0.9, 0.3]
    assert bootstrap.best_over(curve, False).tolist() == [0.5, 0.2, 0.1]
