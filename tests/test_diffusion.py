"""Diffusion math against closed forms and diffusers' DDIMScheduler (paper §2.1 Eq. 2-3, §4.1 Eq. 6, App. C Eq. 12)."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from helpers import tiny_pipeline, trailing

from snapfusion_min import diffusion as D
from snapfusion_min.arch import tiny


def sd15_scheduler(prediction: str = "epsilon", spacing: str = "leading", **kw) -> DDIMScheduler:
    kw = {"set_alpha_to_one": False, **kw}
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         steps_offset=1, prediction_type=prediction, timestep_spacing=spacing, **kw)


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


def test_bad_grids_are_refused_and_edges_accepted():
    with pytest.raises(ValueError, match="^steps must be positive, got 0$"):
        D.timesteps(0)
    with pytest.raises(ValueError, match="^steps must be at most 1000, got 1001$"):
        D.timesteps(1001, "trailing")
    with pytest.raises(ValueError, match=r"^unknown timestep spacing 'linspace' \(expected 'leading' or 'trailing'\)$"):
        D.timesteps(8, "linspace")
    with pytest.raises(ValueError, match=r"^unknown prediction type 'x' \(expected 'v' or 'eps'\)$"):
        D.predict_x_eps(torch.zeros(1), z=torch.zeros(1), alpha=1.0, sigma=0.0, prediction="x")
    assert D.timesteps(1000, "trailing") == list(range(999, -1, -1)) + [D.CLEAN]  # every training timestep
    assert D.timesteps(50) == D.timesteps(50, "leading")  # SD-v1.5's grid is the default


def test_schedule_and_expand_do_not_follow_the_default_dtype_or_device():
    """The table stays float32 (as diffusers') under a float64 default; per-sample scalars move to the latent's
    device (the meta device stands in for a GPU)."""
    torch.set_default_dtype(torch.float64)
    try:
        table = D.Schedule().alphas_cumprod
    finally:
        torch.set_default_dtype(torch.float32)
    assert table.dtype == torch.float32 and torch.equal(table, sd15_scheduler().alphas_cumprod)
    like = torch.zeros(2, 4, 8, 8, device="meta", dtype=torch.float16)
    for a in (torch.tensor([0.5, 2.0]), 0.5, torch.tensor(0.5)):
        out = D.expand(a, like)
        assert out.device.type == "meta" and out.dtype == torch.float16 and out.dim() == 4


def test_eq12_14_v_eps_x_conversions_are_consistent():
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


def test_eq3_cfg_is_identity_at_w1_and_extrapolates():
    cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(D.cfg(cond, uncond, 7.5), 7.5 * cond - 6.5 * uncond)
    torch.testing.assert_close(D.cfg(cond, uncond, 1.0), cond)
    w = torch.tensor([2.0, 14.0])  # per-sample scales, as the CFG-aware loss draws them (Eq. 10)
    torch.testing.assert_close(D.cfg(cond, uncond, w)[1], 14 * cond[1] - 13 * uncond[1])


@pytest.mark.parametrize("prediction,ours", [("epsilon", "eps"), ("v_prediction", "v")])
def test_eq2_ddim_sampling_loop_equals_diffusers(prediction, ours):
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


def test_snr_against_the_betas_in_closed_form():
    """SNR_t = abar_t / (1 - abar_t), abar_t = prod_{s<=t} (1 - beta_s), from the betas in float64."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    abar = np.cumprod(1 - betas)
    ours = D.Schedule().snr(torch.arange(1000)).double().numpy()
    np.testing.assert_allclose(ours, abar / (1 - abar), rtol=2e-4)
    assert D.Schedule().snr(0) > 1000 and D.Schedule().snr(999) < 0.01


class Smooth(torch.nn.Module):
    """A fixed nonlinear 'network output' of (z, t): enough to make where each DDIM step lands matter."""

    def __init__(self):
        super().__init__()
        self.calls, self.spec = [], tiny()  # a UNet stand-in carries the spec the pipeline reads

    def forward(self, z, t, c):
        self.calls.append(int(torch.as_tensor(t).reshape(-1)[0]))
        return torch.tanh(z + float(t) / 500) - 0.3 * z


def reference_ddim(z, grid, v_of):
    """Eq. 12 in float64 from the betas, stepping t_i -> t_{i+1} on ``grid`` (t = -1: clean data)."""
    abar = D.Schedule().alphas_cumprod.double()
    z = z.double()
    for t, t_next in zip(grid[:-1], grid[1:]):
        (a, s), (a2, s2) = ((abar[u] ** 0.5, (1 - abar[u]) ** 0.5) if u >= 0 else (1.0, 0.0) for u in (t, t_next))
        v = v_of(z.float(), t).double()
        z = a2 * (a * z - s * v) + s2 * (s * z + a * v)
    return z


@pytest.mark.parametrize("steps", [16, 32])
def test_trailing_sampler_steps_onto_the_next_grid_point(steps):
    """The paper's teacher counts: each DDIM step of ``Pipeline.denoise`` goes t_i -> t_{i+1} of the trailing grid
    (the last to clean data), and the 16-step grid is every other point of the 32-step one."""
    grid = trailing(steps)  # diffusers' formula
    assert D.timesteps(steps, "trailing") == grid
    assert D.timesteps(16, "trailing") == D.timesteps(32, "trailing")[::2]
    net = Smooth()
    pipe = tiny_pipeline().with_parts(unet=net, prediction="v")
    z = torch.randn(2, 4, 8, 8)
    got = pipe.denoise(z, torch.zeros(2, 1, 1), None, steps, 1.0, "trailing")
    assert net.calls == grid[:-1]
    want = reference_ddim(z, grid, lambda z, t: Smooth()(z, t, None))
    assert (got.double() - want).abs().max() < 1e-4 * want.abs().max()


def test_diffusers_trailing_ddim_steps_off_the_grid():
    """diffusers' DDIMScheduler with trailing spacing steps from t to t - 1000 // N, not to the next grid point
    (937 -> 875 while the grid's next point is 874 for N = 16), then restarts from the grid point. The two samplers
    differ, measurably (docs/training.md quotes the numbers)."""
    steps = 16
    sched = sd15_scheduler("v_prediction", "trailing")
    sched.set_timesteps(steps)
    grid = D.timesteps(steps, "trailing")
    assert sched.timesteps.tolist() == grid[:-1]
    landing = [t - 1000 // steps for t in grid[:-1]]  # where diffusers' step from t lands
    assert landing[1] == 875 and grid[2] == 874
    assert [(a, b) for a, b in zip(landing, grid[1:]) if a != b] == [(875, 874), (812, 811), (625, 624), (562, 561),
                                                                     (375, 374), (312, 311), (125, 124), (62, 61)]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = reference_ddim(z, grid, lambda z, t: Smooth()(z, t, None))
    for alpha_to_one in (True, False):  # SD-v1.5's scheduler config: False (its last step lands on abar_0)
        sched = sd15_scheduler("v_prediction", "trailing", set_alpha_to_one=alpha_to_one)
        sched.set_timesteps(steps)
        z_ref = z
        for t in grid[:-1]:
            z_ref = sched.step(Smooth()(z_ref, t, None), t, z_ref, eta=0.0).prev_sample
        rel = ((z_ref.double() - ours).abs().max() / ours.abs().max()).item()
        print(f"diffusers trailing DDIM (set_alpha_to_one={alpha_to_one}) vs next-grid-point DDIM, {steps} steps: "
              f"max |difference| / max |x| = {rel:.2e}")
        assert rel > 1e-3
