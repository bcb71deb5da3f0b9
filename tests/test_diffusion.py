"""Diffusion math against closed forms and diffusers' DDIMScheduler (paper §2.1 Eq. 2-3, §4.1 Eq. 6, App. C Eq. 12)."""

import pytest
import torch
from diffusers import DDIMScheduler

from snapfusion_min import diffusion as D


def sd15_scheduler(prediction: str = "epsilon", spacing: str = "leading", **kw) -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction,
                         timestep_spacing=spacing, **kw)


def test_schedule_equals_diffusers_scaled_linear():
    ours = D.Schedule().alphas_cumprod
    assert torch.equal(ours, sd15_scheduler().alphas_cumprod)
    alpha, sigma = D.Schedule().alpha_sigma(torch.arange(1000))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(1000))  # variance preserving


def test_clean_pseudo_timestep_is_data():
    alpha, sigma = D.Schedule().alpha_sigma(D.CLEAN)
    assert alpha.item() == 1.0 and sigma.item() == 0.0


@pytest.mark.parametrize("steps", [1, 8, 16, 25, 50])
def test_leading_grid_equals_sd15_ddim(steps):
    sched = sd15_scheduler()
    sched.set_timesteps(steps)
    grid = D.timesteps(steps, "leading")
    assert grid[:-1] == sched.timesteps.tolist()
    assert grid[-1] == 0  # diffusers' final alpha is abar_0 when set_alpha_to_one=False


@pytest.mark.parametrize("steps", [1, 3, 8, 16, 32])
def test_trailing_grid_equals_diffusers_trailing(steps):
    sched = sd15_scheduler(spacing="trailing")
    sched.set_timesteps(steps)
    assert D.timesteps(steps, "trailing")[:-1] == sched.timesteps.tolist()


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 25, 32])
def test_trailing_student_grid_nests_in_teacher_grid(n):
    """Each student step t -> t'' spans exactly two teacher steps t -> t' -> t'' (§4.2)."""
    student, teacher = D.timesteps(n, "trailing"), D.timesteps(2 * n, "trailing")
    assert student == teacher[::2]
    assert student[-1] == D.CLEAN  # the last student step lands on x (App. C: t'' = 0)


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="positive"):
        D.timesteps(0)
    with pytest.raises(ValueError, match="spacing"):
        D.timesteps(8, "linspace")


def test_v_eps_x_conversions_are_consistent():
    """v = alpha eps - sigma x (Eq. 6) and its inverses of Eq. 12 recover x and eps exactly."""
    sched = D.Schedule()
    t = torch.randint(0, 1000, (16,))
    alpha, sigma = sched.alpha_sigma(t)
    x, eps = torch.randn(16, 4, 8, 8, dtype=torch.float64), torch.randn(16, 4, 8, 8, dtype=torch.float64)
    z = D.noisy(x=x, eps=eps, alpha=alpha, sigma=sigma)
    v = D.v_target(x=x, eps=eps, alpha=alpha, sigma=sigma)
    torch.testing.assert_close(D.x_from_v(z=z, v=v, alpha=alpha, sigma=sigma), x)
    torch.testing.assert_close(D.eps_from_v(z=z, v=v, alpha=alpha, sigma=sigma), eps)
    torch.testing.assert_close(D.x_from_eps(z=z, eps=eps, alpha=alpha, sigma=sigma), x)
    torch.testing.assert_close(D.eps_from_x(z=z, x=x, alpha=alpha, sigma=sigma), eps)


def test_cfg_matches_eq3_and_is_identity_at_w1():
    cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(D.cfg(cond, uncond, 7.5), 7.5 * cond - 6.5 * uncond)
    torch.testing.assert_close(D.cfg(cond, uncond, 1.0), cond)
    w = torch.tensor([2.0, 14.0])  # per-sample scales, as the CFG-aware loss draws them (Eq. 10)
    torch.testing.assert_close(D.cfg(cond, uncond, w)[1], 14 * cond[1] - 13 * uncond[1])


@pytest.mark.parametrize("prediction,ours", [("epsilon", "eps"), ("v_prediction", "v")])
def test_ddim_sampling_loop_equals_diffusers(prediction, ours):
    """Eq. 2 (eps) and Eq. 12 (v), step by step over SD-v1.5's 50-step grid, against DDIMScheduler.step."""
    sched, schedule = sd15_scheduler(prediction), D.Schedule()
    sched.set_timesteps(50)
    grid = D.timesteps(50, "leading")
    z_ref = z = torch.randn(2, 4, 8, 8)
    for i, t in enumerate(grid[:-1]):
        out = torch.randn(2, 4, 8, 8)  # any network output
        z_ref = sched.step(out, t, z_ref, eta=0.0).prev_sample
        alpha, sigma = schedule.alpha_sigma(t)
        alpha_next, sigma_next = schedule.alpha_sigma(grid[i + 1])
        x, eps = D.predict_x_eps(out, z=z, alpha=alpha, sigma=sigma, prediction=ours)
        z = D.ddim_step(x=x, eps=eps, alpha_next=alpha_next, sigma_next=sigma_next)
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)


def test_snr():
    sched = D.Schedule()
    alpha, sigma = sched.alpha_sigma(999)
    torch.testing.assert_close(sched.snr(999), alpha**2 / sigma**2)
    assert sched.snr(0) > 1000 and sched.snr(999) < 0.01
