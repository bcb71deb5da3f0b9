"""FID's Frechet distance against closed forms; CLIP score and zero-shot accuracy with the bundled toy CLIP."""

import numpy as np
import pytest
import torch

from snapfusion_min.metrics import fid, frechet_distance


def random_rotation(d, rng):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def test_frechet_distance_commuting_gaussians_closed_form():
    """Same eigenvectors: FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    d = 16
    q = random_rotation(d, rng)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_non_commuting_2x2_closed_form():
    """For 2x2: tr sqrt(C1 C2) = sqrt(tr(C1 C2) + 2 sqrt(det(C1 C2))), any PSD C1, C2."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
        c1, c2 = a @ a.T + 0.01 * np.eye(2), b @ b.T + 0.01 * np.eye(2)
        tr_sqrt = np.sqrt(np.trace(c1 @ c2) + 2 * np.sqrt(np.linalg.det(c1 @ c2)))
        expected = np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
        assert frechet_distance(np.zeros(2), c1, np.zeros(2), c2) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert abs(fid(x, x)) < 1e-8
    shifted = [fid(x, x + s) for s in (0.5, 1.0, 2.0)]
    assert shifted == pytest.approx([8 * 0.25, 8 * 1.0, 8 * 4.0], rel=1e-6)  # a pure shift adds |delta mu|^2
    assert fid(x, 1.5 * x) > 0
