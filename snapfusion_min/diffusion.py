"""Diffusion math: SD's noise schedule, the eps / v / x conversions, the DDIM step and CFG (paper §2.1, §4, App. C).

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
