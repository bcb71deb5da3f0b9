"""Diffusion math: SD's noise schedule, the eps / v / x conversions, DDIM, DPM-Solver and CFG (paper §2.1, §4, App. C).

Notation as in the paper: z_t = alpha_t x + sigma_t eps (§2.1), with alpha_t^2 + sigma_t^2 = 1 (variance preserving);
v = alpha_t eps - sigma_t x (Eq. 6). Timesteps are SD's integers 0..999; ``CLEAN = -1`` stands for the data itself
(alpha = 1, sigma = 0), the t'' = 0 of App. C that a distilled student's last step lands on.
All helpers take keyword-only arguments so that alpha and sigma cannot be swapped by position.
"""

from __future__ import annotations

from fractions import Fraction

import torch

TRAIN_STEPS = 1000  # SD-v1.5's discrete training timesteps
BETA_START, BETA_END = 0.00085, 0.012  # SD-v1.5's "scaled_linear" schedule
CLEAN = -1  # pseudo-timestep of clean data: alpha = 1, sigma = 0
SPACINGS = ("leading", "trailing")  # timestep grids of ``timesteps``
SOLVERS = ("ddim", "dpm", "dpm++")  # samplers of ``Solver``: Eq. 2; multistep DPM-Solver-2; DPM-Solver++(2M)
Scalar = torch.Tensor | float  # a per-sample [B] tensor or one number


class Schedule:
    """alpha_t and sigma_t of SD's scaled-linear schedule: beta_t = (linspace(sqrt(b0), sqrt(b1), 1000))^2."""

    def __init__(self, beta_start: float = BETA_START, beta_end: float = BETA_END, steps: int = TRAIN_STEPS):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # \bar{alpha}_t, float32 as in diffusers
        self.steps = steps

    def alpha_sigma(self, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)); t = CLEAN gives (1, 0). Float32, shape of t."""
        t = torch.as_tensor(t)
        abar = torch.where(t < 0, 1.0, self.alphas_cumprod.to(t.device)[t.clamp(min=0)])
        return abar.sqrt(), (1.0 - abar).sqrt()

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2 (lambda_t = log SNR)."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / sigma**2


def expand(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars [B] (or []) -> broadcastable to a latent [B, C, H, W], in its dtype and device."""
    a = torch.as_tensor(a, device=like.device, dtype=like.dtype)
    return a.reshape(a.shape + (1,) * (like.dim() - a.dim()))


def noisy(*, x: torch.Tensor, eps: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """z_t = alpha_t x + sigma_t eps (§2.1)."""
    return expand(alpha, x) * x + expand(sigma, x) * eps


def v_target(*, x: torch.Tensor, eps: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """v = alpha_t eps - sigma_t x (Eq. 6)."""
    return expand(alpha, x) * eps - expand(sigma, x) * x


def x_from_v(*, z: torch.Tensor, v: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """x_hat = alpha_t z_t - sigma_t v_hat (Eq. 12, 'teacher predicted clean latent')."""
    return expand(alpha, z) * z - expand(sigma, z) * v


def eps_from_v(*, z: torch.Tensor, v: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """eps_hat = sigma_t z_t + alpha_t v_hat (Eq. 12, 'teacher predicted noise')."""
    return expand(sigma, z) * z + expand(alpha, z) * v


def x_from_eps(*, z: torch.Tensor, eps: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """x_hat = (z_t - sigma_t eps_hat) / alpha_t (the fraction inside Eq. 2)."""
    return (z - expand(sigma, z) * eps) / expand(alpha, z)


def eps_from_x(*, z: torch.Tensor, x: torch.Tensor, alpha: Scalar, sigma: Scalar) -> torch.Tensor:
    """eps_hat = (z_t - alpha_t x_hat) / sigma_t (Eq. 14, 'student predicted noise')."""
    return (z - expand(alpha, z) * x) / expand(sigma, z)


def predict_x_eps(out: torch.Tensor, *, z: torch.Tensor, alpha: Scalar, sigma: Scalar,
                  prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The network output read as (x_hat, eps_hat), for 'v' (v-prediction) or 'eps' (noise prediction)."""
    if prediction == "v":
        return x_from_v(z=z, v=out, alpha=alpha, sigma=sigma), eps_from_v(z=z, v=out, alpha=alpha, sigma=sigma)
    if prediction == "eps":
        return x_from_eps(z=z, eps=out, alpha=alpha, sigma=sigma), out
    raise ValueError(f"unknown prediction type {prediction!r} (expected 'v' or 'eps')")


def ddim_step(*, x: torch.Tensor, eps: torch.Tensor, alpha_next: Scalar,
              sigma_next: Scalar) -> torch.Tensor:
    """Deterministic DDIM update to t' (Eq. 2; last line of Eq. 12): z_t' = alpha_t' x_hat + sigma_t' eps_hat."""
    return expand(alpha_next, x) * x + expand(sigma_next, x) * eps


def cfg(cond: torch.Tensor, uncond: torch.Tensor, w: Scalar) -> torch.Tensor:
    """Classifier-free guidance (Eq. 3 for eps, Eq. 10 for v): w * cond - (w - 1) * uncond.

    Computed as uncond + w (cond - uncond), the same value with one rounding less; w may be per-sample [B].
    """
    return uncond + expand(torch.as_tensor(w), cond) * (cond - uncond)


def timesteps(steps: int, spacing: str = "leading", offset: int = 1) -> list[int]:
    """The N + 1 points t_0 > ... > t_N of an N-step sampler; step i goes t_i -> t_{i+1}.

    'leading' is SD-v1.5's (diffusers' DDIMScheduler, steps_offset=1): t_i = (N - 1 - i) * (1000 // N) + 1, ending
    at t = 0, i.e. abar_0 (``set_alpha_to_one=False``). 'trailing' starts at t = 999: t_i = round(1000 (N - i) / N) - 1,
    ending at CLEAN. Its N-step grid is every other point of its 2N-step grid, which step distillation needs (§4.2).
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if steps > TRAIN_STEPS:
        raise ValueError(f"steps must be at most {TRAIN_STEPS}, got {steps}")
    if spacing == "leading":
        ratio = TRAIN_STEPS // steps
        return [(steps - 1 - i) * ratio + offset for i in range(steps)] + [0]
    if spacing == "trailing":
        return [round(Fraction(TRAIN_STEPS * (steps - i), steps)) - 1 for i in range(steps)] + [CLEAN]
    raise ValueError(f"unknown timestep spacing {spacing!r} (expected 'leading' or 'trailing')")


def dpm_step(*, z: torch.Tensor, d: torch.Tensor, alpha: Scalar, sigma: Scalar, alpha_next: Scalar,
             sigma_next: Scalar, data: bool) -> torch.Tensor:
    """One exponential-integrator step from t to t' with the prediction d held fixed over the step.

    data=False, d = eps_hat (DPM-Solver, Lu et al., arXiv 2206.00927, §3.3, DPM-Solver-1):
        z_t' = (alpha_t'/alpha_t) z_t - sigma_t' (e^h - 1) d;
    data=True, d = x_hat (DPM-Solver++, arXiv 2211.01095, §4, its first-order solver):
        z_t' = (sigma_t'/sigma_t) z_t - alpha_t' (e^-h - 1) d;
    h = lambda_t' - lambda_t, lambda = log(alpha / sigma). With d a first-order prediction both are DDIM (Eq. 2).
    e^h = alpha_t' sigma_t / (sigma_t' alpha_t) is written out, so that a step onto clean data (sigma_t' = 0,
    h = inf) stays finite.
    """
    if data:
        return expand(sigma_next / sigma, z) * z + expand(alpha_next - sigma_next * alpha / sigma, z) * d
    return expand(alpha_next / alpha, z) * z - expand(alpha_next * sigma / alpha - sigma_next, z) * d


def multistep(d: torch.Tensor, d_prev: torch.Tensor, r: float) -> torch.Tensor:
    """The second-order multistep prediction, d + (d - d_prev) / (2 r), r = h_prev / h (DPM-Solver++(2M),
    arXiv 2211.01095 Alg. 2: D = (1 + 1/(2r)) d - 1/(2r) d_prev; the same for eps in multistep DPM-Solver-2)."""
    return d + (d - d_prev) / (2 * r)


class Solver:
    """Steps z along a grid given the network's (guided) output at each point: 'ddim' (Eq. 2), 'dpm' (multistep
    DPM-Solver-2 on eps_hat) or 'dpm++' (DPM-Solver++(2M) on x_hat).

    The multistep solvers keep the previous step's prediction; the first step is first order (no history yet), and so
    is the last when it lands on clean data (h = inf) or when there are fewer than 15 steps -- DPM-Solver's
    'lower order final' rule, kept so that our steps equal diffusers' ``DPMSolverMultistepScheduler``.
    """

    def __init__(self, name: str, grid: list[int], schedule: Schedule, prediction: str):
        if name not in SOLVERS:
            raise ValueError(f"unknown sampler {name!r} (expected one of {SOLVERS})")
        self.name, self.grid, self.schedule, self.prediction = name, grid, schedule, prediction
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None  # (d, lambda) at the previous point

    def step(self, i: int, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """z at grid[i] and the network's output there -> z at grid[i + 1]."""
        alpha, sigma = self.schedule.alpha_sigma(self.grid[i])
        alpha_next, sigma_next = self.schedule.alpha_sigma(self.grid[i + 1])
        x, eps = predict_x_eps(out, z=z, alpha=alpha, sigma=sigma, prediction=self.prediction)
        if self.name == "ddim":
            return ddim_step(x=x, eps=eps, alpha_next=alpha_next, sigma_next=sigma_next)
        d, lam = (x if self.name == "dpm++" else eps), (alpha / sigma).log()
        prev, self.prev = self.prev, (d, lam)
        steps = len(self.grid) - 1
        last_first_order = i == steps - 1 and (sigma_next == 0 or steps < 15)
        if prev is not None and not last_first_order:
            h, h_prev = (alpha_next / sigma_next).log() - lam, lam - prev[1]
            d = multistep(d, prev[0], float(h_prev / h))
        return dpm_step(z=z, d=d, alpha=alpha, sigma=sigma, alpha_next=alpha_next, sigma_next=sigma_next,
                        data=self.name == "dpm++")
