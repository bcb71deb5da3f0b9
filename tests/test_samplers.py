"""DPM-Solver and DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler and against the exact ODE solution
of Gaussian data (Table 2's DPM / DPM++ rows; DPM-Solver arXiv 2206.00927, DPM-Solver++ arXiv 2211.01095)."""

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from helpers import tiny_pipeline

from snapfusion_min import diffusion as D

ALGORITHM = {"dpm": "dpmsolver", "dpm++": "dpmsolver++"}
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


def dpm_scheduler(solver: str, prediction: str, spacing: str, steps: int) -> DPMSolverMultistepScheduler:
    """diffusers' multistep DPM-Solver (order 2, its defaults otherwise) on our grid: the trailing grid is its own
    'trailing' spacing (ending at sigma = 0); our leading grid (SD-v1.5's DDIM grid, ending at abar_0) is passed as
    custom timesteps with final_sigmas_type 'sigma_min' -- diffusers' own 'leading' for this scheduler is another
    grid (spacing 1000 // (N + 1)). diffusers refuses to take DPM-Solver (eps) onto sigma = 0; there it ends at abar_0,
    and only the last step differs."""
    final = "zero" if spacing == "trailing" and solver == "dpm++" else "sigma_min"
    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        steps_offset=1, prediction_type=PREDICTION[prediction], solver_order=2,
                                        algorithm_type=ALGORITHM[solver], timestep_spacing=spacing,
                                        final_sigmas_type=final)
    if spacing == "trailing":
        sched.set_timesteps(steps)
        assert sched.timesteps.tolist() == D.timesteps(steps, "trailing")[:-1]
    else:
        sched.set_timesteps(timesteps=D.timesteps(steps, "leading")[:-1])
    return sched


@pytest.mark.parametrize("steps", [8, 20])  # < 15 steps: the last step is first order (diffusers' rule); 20: not
@pytest.mark.parametrize("spacing", D.SPACINGS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("solver", ["dpm", "dpm++"])
def test_dpm_solvers_step_by_step_equal_diffusers(solver, prediction, spacing, steps):
    sched, grid = dpm_scheduler(solver, prediction, spacing, steps), D.timesteps(steps, spacing)
    ours = D.Solver(solver, grid, D.Schedule(), prediction)
    g = torch.Generator().manual_seed(steps)
    z_ref = z = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(grid[:-1]):
        out = torch.randn(2, 4, 8, 8, generator=g) + z_ref  # any network output
        x_hat = D.predict_x_eps(out, z=z, **dict(zip(("alpha", "sigma"), D.Schedule().alpha_sigma(t))),
                                prediction=prediction)[0]
        z_ref, z = sched.step(out, t, z_ref).prev_sample, ours.step(i, z, out)
        if grid[i + 1] == D.CLEAN and solver == "dpm":  # diffusers cannot: on clean data z is x_hat (DPM-Solver-1)
            torch.testing.assert_close(z, x_hat, rtol=1e-5, atol=1e-5 * x_hat.abs().max().item())
        else:
            torch.testing.assert_close(z, z_ref, rtol=2e-5, atol=2e-5 * z_ref.abs().max().item())


@pytest.mark.parametrize("solver,prediction,spacing", [("dpm++", "v", "trailing"), ("dpm", "eps", "leading")])
def test_whole_generation_with_cfg_equals_diffusers(solver, prediction, spacing):
    """Pipeline.denoise (CFG at w = 3, [uncond; cond] in one batch) vs the same UNet driven by diffusers' scheduler."""
    pipe = tiny_pipeline(prediction=prediction)
    steps, w = 6, 3.0
    context, uncond = pipe.encode_prompts(["a red circle"] * 2), pipe.encode_prompts([""] * 2)
    z0 = torch.randn(2, 4, 8, 8)
    ours = pipe.denoise(z0, context, uncond, steps, w, spacing, solver=solver)
    sched, z = dpm_scheduler(solver, prediction, spacing, steps), z0
    for t in sched.timesteps.tolist():
        out_uncond, out_cond = pipe.unet(torch.cat([z, z]), t, torch.cat([uncond, context])).chunk(2)
        z = sched.step(out_uncond + w * (out_cond - out_uncond), t, z).prev_sample
    torch.testing.assert_close(ours, z, rtol=1e-4, atol=1e-4 * z.abs().max().item())
    ddim = pipe.denoise(z0, context, uncond, steps, w, spacing)
    assert (ddim - ours).abs().max() > 1e-3 * z.abs().max()  # a second-order sampler, not DDIM again


def gaussian_denoiser(s: float, prediction: str):  # noqa: ANN201
    """The exact network for data x ~ N(0, s^2 I): x_hat = E[x | z_t] = alpha s^2 z / (alpha^2 s^2 + sigma^2)."""
    schedule = D.Schedule()

    def net(z: torch.Tensor, t: int) -> torch.Tensor:
        alpha, sigma = (a.double() for a in schedule.alpha_sigma(t))
        x = alpha * s**2 * z / (alpha**2 * s**2 + sigma**2)
        eps = (z - alpha * x) / sigma
        return eps if prediction == "eps" else alpha * eps - sigma * x  # Eq. 6

    return net


def exact_flow(z: torch.Tensor, t: int, t_next: int, s: float) -> torch.Tensor:
    """The probability-flow ODE of Gaussian data moves z_t along sqrt(alpha_t^2 s^2 + sigma_t^2) (it keeps z_t's
    quantile): in y = z / alpha, kappa = sigma / alpha, dy/dkappa = eps_hat = kappa y / (s^2 + kappa^2)."""
    scale = [(a.double() ** 2 * s**2 + b.double() ** 2).sqrt() for a, b in map(D.Schedule().alpha_sigma, (t, t_next))]
    return z * scale[1] / scale[0]


def solve(solver: str, steps: int, s: float, prediction: str) -> float:
    """Relative error of an N-step solve of the Gaussian's ODE from t = 980 to t = 20 (a grid even in t whose halvings
    nest; away from t = 0, where lambda_t is steep, so that the solvers reach their asymptotic order by N ~ 100)."""
    grid, net = [980 - k * 960 // steps for k in range(steps + 1)], gaussian_denoiser(s, prediction)
    alpha, sigma = (a.double() for a in D.Schedule().alpha_sigma(grid[0]))
    z = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * (
        alpha**2 * s**2 + sigma**2).sqrt()
    want = exact_flow(z, grid[0], grid[-1], s)
    sampler = D.Solver(solver, grid, D.Schedule(), prediction)
    for i, t in enumerate(grid[:-1]):
        z = sampler.step(i, z, net(z, t))
    return ((z - want).norm() / want.norm()).item()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_convergence_order_on_gaussian_data(prediction):
    """Halving the step halves DDIM's error (first order) and quarters the multistep solvers' (second order, the
    papers' claim), measured against the exact solution, independent of diffusers."""
    order, errors = {}, {}
    for solver in D.SOLVERS:
        errors[solver] = [solve(solver, n, 0.5, prediction) for n in (60, 120, 240)]
        order[solver] = [math.log2(a / b) for a, b in zip(errors[solver], errors[solver][1:])]
        print(solver, prediction, [f"{e:.2e}" for e in errors[solver]], [f"{p:.2f}" for p in order[solver]])
    assert all(0.9 < p < 1.1 for p in order["ddim"])
    assert all(1.7 < p < 2.2 for p in order["dpm"] + order["dpm++"])
    assert errors["dpm++"][-1] < errors["ddim"][-1] / 20
