"""The derivations of App. C, checked in closed form (no training): Eq. 7-10, 12-16 and the loss of Eq. 11."""

import pytest
import torch
from torch import nn

from snapfusion_min import diffusion as D
from snapfusion_min.distill import DistillConfig, distill_loss, snr_weight, teacher_z, x_target

SCHEDULE = D.Schedule()


def test_eq9_target_lands_student_on_teacher_z_t2():
    """Eq. 14-16: one student DDIM step from z_t with x_hat = x_target reaches the teacher's z_t'' exactly."""
    g = torch.Generator().manual_seed(0)
    teacher_grid = D.timesteps(16, "trailing")
    for i in range(8):  # every student step, including the last one that lands on t'' = CLEAN
        t, t2 = torch.tensor(teacher_grid[2 * i]), torch.tensor(teacher_grid[2 * i + 2])
        z_t = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
        z_t2 = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)  # any teacher result
        (a, s), (a2, s2) = SCHEDULE.alpha_sigma(t), SCHEDULE.alpha_sigma(t2)
        a, s, a2, s2 = (v.double() for v in (a, s, a2, s2))
        x = x_target(z_t=z_t, z_t2=z_t2, alpha_t=a, sigma_t=s, alpha_t2=a2, sigma_t2=s2)
        eps = D.eps_from_x(z=z_t, x=x, alpha=a, sigma=s)  # Eq. 14: the student's implied noise
        torch.testing.assert_close(D.ddim_step(x=x, eps=eps, alpha_next=a2, sigma_next=s2), z_t2)


def test_eq7_two_teacher_steps_are_eq12_13_written_out():
    """teacher_z with k = 2 equals the closed form of Eq. 7 for a teacher with arbitrary (fixed) outputs."""
    v1, v2 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)

    class TwoOutputs(nn.Module):
        calls = 0

        def forward(self, z, t, c):
            self.calls += 1
            return v1 if self.calls == 1 else v2

    z = torch.randn(2, 4, 8, 8)
    t, t1, t2 = (torch.full((2,), x) for x in (999, 874, 749))
    (a, s), (a1, s1), (a2, s2) = (SCHEDULE.alpha_sigma(x) for x in (t, t1, t2))
    a, s, a1, s1, a2, s2 = (x[:, None, None, None] for x in (a, s, a1, s1, a2, s2))
    z1 = a1 * (a * z - s * v1) + s1 * (s * z + a * v1)  # Eq. 7, first line
    z2 = a2 * (a1 * z1 - s1 * v2) + s2 * (s1 * z1 + a1 * v2)  # Eq. 7, second line
    got = teacher_z(TwoOutputs(), z, [t, t1, t2], torch.zeros(2, 1, 1), None, None, SCHEDULE)
    torch.testing.assert_close(got, z2)


def test_truncated_snr_weight_at_the_ends_of_the_schedule():
    for t in (0, 500, 999):
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        assert snr_weight(alpha, sigma).item() == pytest.approx(max(alpha.item() ** 2 / sigma.item() ** 2, 1.0))
    assert snr_weight(*SCHEDULE.alpha_sigma(999)).item() == 1.0  # SNR 0.0047: truncated to 1
    assert snr_weight(*SCHEDULE.alpha_sigma(0)).item() == pytest.approx(SCHEDULE.snr(0).item())  # SNR ~1176


class PointMass(nn.Module):
    """An exact v-model of data concentrated at x*: v = (alpha z - x*) / sigma. Its DDIM steps follow the true ODE,
    so two teacher steps equal one; the 'context' is x* itself. A scale != 1 makes it inexact."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, z, t, context):
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        alpha, sigma = D.expand(alpha, z), D.expand(sigma, z)
        return self.scale * (alpha * z - context) / sigma


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_cond, x_uncond = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    return x_cond, x_cond, x_uncond  # data x0, context (= x* of the conditional model), uncond (= its x*)


@pytest.mark.parametrize("use_cfg", [False, True])
def test_loss_is_zero_when_two_teacher_steps_equal_one(use_cfg):
    """CFG of two point-mass models is the point-mass model at x_u + w (x_c - x_u): still exact, so L_dstl = 0."""
    x0, context, uncond = batch()
    torch.manual_seed(0)
    out = distill_loss(PointMass(), PointMass(), x0, context, uncond, DistillConfig(), SCHEDULE, use_cfg=use_cfg)
    assert out["dstl"].item() < 1e-8, out
    assert out["ori"].item() < 1e-8  # the point-mass model at x* = x0 also predicts the true v


def test_loss_is_not_zero_for_an_inexact_student():
    x0, context, uncond = batch()
    torch.manual_seed(0)
    out = distill_loss(PointMass(1.1), PointMass(), x0, context, uncond, DistillConfig(), SCHEDULE, use_cfg=False)
    assert out["dstl"].item() > 1e-4  # vs < 1e-8 for the exact student above


def test_cfg_loss_with_w_1_equals_vanilla_loss():
    x0, context, uncond = batch(1)
    student, teacher = PointMass(1.05), PointMass(0.97)
    torch.manual_seed(3)
    vanilla = distill_loss(student, teacher, x0, context, uncond, DistillConfig(), SCHEDULE, use_cfg=False)
    torch.manual_seed(3)
    guided = distill_loss(student, teacher, x0, context, uncond, DistillConfig(), SCHEDULE, use_cfg=True,
                          w=torch.ones(6))
    torch.testing.assert_close(guided["dstl"], vanilla["dstl"], rtol=1e-5, atol=0)
    torch.manual_seed(3)
    strong = distill_loss(student, teacher, x0, context, uncond, DistillConfig(), SCHEDULE, use_cfg=True,
                          w=torch.full((6,), 7.0))
    assert not torch.allclose(strong["dstl"], vanilla["dstl"])


def test_dynamic_gamma_rescales_l_ori_to_the_distillation_loss():
    """Eq. 11 with the dynamic gamma: gamma_dyn * L_ori = gamma * L_dstl in value (but L_ori keeps its gradient)."""
    x0, context, uncond = batch(2)
    torch.manual_seed(0)
    out = distill_loss(PointMass(1.2), PointMass(), x0, context, uncond, DistillConfig(gamma=0.2), SCHEDULE,
                       use_cfg=False)
    torch.testing.assert_close(out["loss"], 1.2 * out["dstl"])


def test_student_grid_nests_in_teacher_grid_and_bad_configs_fail():
    for n, k in ((8, 2), (8, 4), (4, 2), (1, 2)):
        student, teacher = D.timesteps(n, "trailing"), D.timesteps(n * k, "trailing")
        assert student == teacher[::k]
    with pytest.raises(ValueError, match="must divide"):
        DistillConfig(teacher_steps=16, student_steps=6)
    with pytest.raises(ValueError, match="CFG range"):
        DistillConfig(w_min=0.5)
