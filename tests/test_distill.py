"""The derivations of App. C, checked against closed forms and an independent float64 implementation of Eq. 6-11.

``reference_loss`` below is written from the paper alone: it calls none of ``distill.py``'s helpers, loops over the
samples one by one, builds the timestep grids by diffusers' trailing formula and writes guidance as Eq. 10 does
(w v_c - (w - 1) v_u). The models are small nonlinear nets, so two teacher steps differ from one.
"""

import math

import numpy as np
import pytest
import torch
from helpers import trailing
from torch import nn

from snapfusion_min import diffusion as D
from snapfusion_min.distill import DistillConfig, distill_loss, snr_weight, teacher_z, x_target

SCHEDULE = D.Schedule()
BETAS = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2  # SD-v1.5's scaled-linear schedule


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
        eps = (z_t - a * x) / s  # Eq. 14: the student's implied noise
        torch.testing.assert_close(a2 * x + s2 * eps, z_t2)


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


def test_eq9_truncated_snr_weight_against_the_schedule_in_closed_form():
    """Eq. 9's max(SNR, 1), with SNR = abar / (1 - abar) from the betas in float64 (not from ``Schedule``)."""
    abar = np.cumprod(1 - BETAS)
    for t in (0, 100, 400, 600, 999):
        want = max(abar[t] / (1 - abar[t]), 1.0)
        assert snr_weight(*SCHEDULE.alpha_sigma(t)).item() == pytest.approx(want, rel=1e-4)
        assert SCHEDULE.snr(t).item() == pytest.approx(abar[t] / (1 - abar[t]), rel=1e-4)
    assert snr_weight(*SCHEDULE.alpha_sigma(999)).item() == 1.0  # SNR 0.0047: truncated to 1
    assert snr_weight(*SCHEDULE.alpha_sigma(0)).item() > 1000  # SNR ~1176: kept


# ---- an independent float64 implementation of Eq. 6-11 ----------------------------------------------------------
class Net(nn.Module):
    """A small nonlinear v-model of (z, t, c): a per-pixel MLP over channels, conditioned on t and the mean of c."""

    def __init__(self, seed: int, channels: int = 4, width: int = 8, context: int = 6):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def p(*shape, scale=1.0):
            return nn.Parameter(scale * torch.randn(*shape, generator=g, dtype=torch.float64))

        self.w1, self.wt, self.wc = p(width, channels, scale=0.7), p(width), p(width, context, scale=0.5)
        self.w2, self.skip = p(channels, width, scale=0.5), p(channels, scale=0.3)

    def forward(self, z, t, c):
        t = torch.as_tensor(t).reshape(-1).expand(z.shape[0]).to(z.dtype) / 1000
        cond = self.wt[None] * t[:, None] + c.to(z.dtype).mean(1) @ self.wc.T  # [B, width]
        h = torch.tanh(torch.einsum("bchw,dc->bdhw", z, self.w1) + cond[:, :, None, None])
        return torch.einsum("bdhw,cd->bchw", h, self.w2) + self.skip[None, :, None, None] * z


class WNet(Net):
    """Net with a w input (Meng et al.'s student): its output moves with w; w = None is w = 1."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.ww = nn.Parameter(0.3 * torch.randn(4, generator=torch.Generator().manual_seed(seed + 7),
                                                 dtype=torch.float64))

    def forward(self, z, t, c, w=None):
        w = torch.as_tensor(1.0 if w is None else w, dtype=z.dtype).reshape(-1, 1, 1, 1)
        return super().forward(z, t, c) + (w - 1) * self.ww[None, :, None, None] * torch.tanh(z)


def alpha_sigma(t: int) -> tuple[float, float]:
    abar = 1.0 if t < 0 else SCHEDULE.alphas_cumprod[t].double().item()  # the float32 table diffusers uses
    return math.sqrt(abar), math.sqrt(1 - abar)


def guided(net, z, t, c, u, w):
    """Eq. 10's guided v, w v(z, c) - (w - 1) v(z, u); the plain conditional v when w is None."""
    return net(z, t, c) if w is None else w * net(z, t, c) - (w - 1) * net(z, t, u)


def reference_loss(student, teacher, x0, c, u, draws, teacher_steps, student_steps, gamma, w_input=False):
    """Eq. 11, sample by sample, from the paper: L_dstl (Eq. 9 / 10 with Eq. 7, 8, 16) + gamma_dyn L_ori (Eq. 6).
    ``w_input``: Meng et al.'s student, one pass told w (1 when vanilla), in place of the guided student."""
    k, big, small = teacher_steps // student_steps, trailing(teacher_steps), trailing(student_steps)
    dstl, ori = [], []
    for b in range(x0.shape[0]):
        x, cb, ub = x0[b:b + 1], c[b:b + 1], u[b:b + 1]
        w = None if draws["w"] is None else draws["w"][b].item()
        t = int(draws["t"][b])
        i = small.index(t)
        a, s = alpha_sigma(t)
        z_t = a * x + s * draws["eps"][b:b + 1]
        z = z_t
        for j in range(k):  # Eq. 7 / 12: the teacher's k DDIM steps t -> t' -> ... -> t''
            tj, tn = big[k * i + j], big[k * i + j + 1]
            (aj, sj), (an, sn) = alpha_sigma(tj), alpha_sigma(tn)
            vj = guided(teacher, z, tj, cb, ub, w)
            z = an * (aj * z - sj * vj) + sn * (sj * z + aj * vj)
        assert tn == small[i + 1]
        a2, s2 = alpha_sigma(tn)
        target = (z - s2 / s * z_t) / (a2 - s2 / s * a)  # Eq. 16
        v_student = student(z_t, t, cb, 1.0 if w is None else w) if w_input else guided(student, z_t, t, cb, ub, w)
        x_student = a * z_t - s * v_student  # Eq. 8
        dstl.append(max(a * a / (s * s), 1.0) * ((x_student - target) ** 2).mean())  # Eq. 9
        t_o = int(draws["t_ori"][b])
        a_o, s_o = alpha_sigma(t_o)
        e_o = draws["eps_ori"][b:b + 1]
        v_o = student(a_o * x + s_o * e_o, t_o, cb)
        ori.append(((v_o - (a_o * e_o - s_o * x)) ** 2).mean())  # Eq. 6
    l_dstl, l_ori = torch.stack(dstl).mean(), torch.stack(ori).mean()
    return l_dstl + gamma * (l_dstl / l_ori).detach() * l_ori, l_dstl, l_ori


def data(b: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 4, 3, 3, generator=g, dtype=torch.float64)
    return x0, torch.randn(b, 5, 6, generator=g, dtype=torch.float64), torch.randn(b, 5, 6, generator=g,
                                                                                    dtype=torch.float64)


@pytest.mark.parametrize("teacher_steps", [16, 32])  # k = 2 and k = 4 for an 8-step student
@pytest.mark.parametrize("use_cfg", [False, True])
def test_eq10_11_distill_loss_equals_independent_reference(teacher_steps, use_cfg):
    student, teacher = Net(1), Net(2)
    x0, c, u = data()
    cfg = DistillConfig(teacher_steps=teacher_steps, student_steps=8, w_min=2.0, w_max=14.0, gamma=0.3)
    torch.manual_seed(4)
    out = distill_loss(student, teacher, x0, c, u, cfg, SCHEDULE, use_cfg=use_cfg)
    assert (out["w"] is not None) == use_cfg and out["cfg"].item() == float(use_cfg)
    assert -1 in [trailing(8)[trailing(8).index(int(t)) + 1] for t in out["t"]]  # a step lands on clean data
    assert any(SCHEDULE.snr(int(t)) > 2 for t in out["t"]) and any(SCHEDULE.snr(int(t)) < 1 for t in out["t"])
    want, want_dstl, want_ori = reference_loss(student, teacher, x0, c, u, out, teacher_steps, 8, 0.3)
    for got, ref in ((out["dstl"], want_dstl), (out["ori"], want_ori), (out["loss"], want)):
        assert got.dtype == torch.float64
        assert abs(got.item() / ref.item() - 1) < 1e-6, (got.item(), ref.item())
    # and the gradients: the total's gradient is dL_dstl + gamma_dyn dL_ori, gamma_dyn held constant
    grads = torch.autograd.grad(out["loss"], list(student.parameters()))
    refs = torch.autograd.grad(want, list(student.parameters()))
    for g, r in zip(grads, refs):  # relative to the gradient's scale: 1e-6
        assert (g - r).abs().max() <= 1e-6 * r.abs().max()


@pytest.mark.parametrize("use_cfg", [False, True])
def test_w_conditioned_student_loss_equals_independent_reference(use_cfg):
    """Meng et al.'s student in Eq. 11: one pass told the same per-sample w as the guided teacher; the vanilla
    iterations and L_ori tell it w = 1. Value and gradient (the w weights included) against the reference."""
    student, teacher = WNet(1), Net(2)
    x0, c, u = data()
    cfg = DistillConfig(teacher_steps=16, student_steps=8, w_min=2.0, w_max=14.0, gamma=0.3, w_conditioned=True)
    torch.manual_seed(5)
    out = distill_loss(student, teacher, x0, c, u, cfg, SCHEDULE, use_cfg=use_cfg)
    want = reference_loss(student, teacher, x0, c, u, out, 16, 8, 0.3, w_input=True)[0]
    assert abs(out["loss"].item() / want.item() - 1) < 1e-6
    for g, r in zip(torch.autograd.grad(out["loss"], list(student.parameters())),
                    torch.autograd.grad(want, list(student.parameters()))):
        assert (g - r).abs().max() <= 1e-6 * r.abs().max()
    guided = reference_loss(student, teacher, x0, c, u, out, 16, 8, 0.3)[0]  # the CFG-aware student instead
    assert (abs(guided.item() / want.item() - 1) > 1e-3) == use_cfg  # the same loss only without guidance


def test_eq11_gradient_is_dstl_plus_constant_gamma_times_ori():
    """Eq. 11 with the dynamic gamma: grad L = grad L_dstl + gamma_dyn grad L_ori (gamma_dyn carries no gradient)."""
    student, teacher = Net(3), Net(4)
    x0, c, u = data(8, 1)
    torch.manual_seed(0)
    out = distill_loss(student, teacher, x0, c, u, DistillConfig(gamma=0.5), SCHEDULE, use_cfg=True)
    params = list(student.parameters())
    total = torch.autograd.grad(out["loss"], params, retain_graph=True)
    d_dstl = torch.autograd.grad(out["dstl"], params, retain_graph=True)
    d_ori = torch.autograd.grad(out["ori"], params)
    assert out["gamma"].item() == pytest.approx(0.5 * out["dstl"].item() / out["ori"].item(), rel=1e-12)
    for g, a, b in zip(total, d_dstl, d_ori):
        torch.testing.assert_close(g, a + out["gamma"] * b, rtol=1e-9, atol=1e-12)
    assert max((a - b).abs().max().item() for a, b in zip(d_dstl, d_ori)) > 1e-3  # two really different gradients


class Spy(nn.Module):
    """Records the timesteps (and batch sizes) it is called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, z, t, c):
        self.calls.append(torch.as_tensor(t).reshape(-1).expand(z.shape[0]).tolist())
        return self.net(z, t, c)


@pytest.mark.parametrize("teacher_steps,use_cfg", [(16, False), (32, True)])
def test_teacher_and_student_are_called_at_the_grid_points(teacher_steps, use_cfg):
    """The teacher runs at t, t', ... of its own grid (2B rows when guided), the student at t and at t_ori."""
    student, teacher = Spy(Net(1)), Spy(Net(2))
    x0, c, u = data(6)
    torch.manual_seed(1)
    out = distill_loss(student, teacher, x0, c, u, DistillConfig(teacher_steps=teacher_steps), SCHEDULE,
                       use_cfg=use_cfg)
    k, big, small = teacher_steps // 8, trailing(teacher_steps), trailing(8)
    rows = 2 if use_cfg else 1
    t = out["t"].tolist()
    want = [[big[k * small.index(s) + j] for s in t] * rows for j in range(k)]
    assert teacher.calls == want
    assert student.calls == [t * rows, out["t_ori"].tolist()]


def test_l_ori_draws_its_own_timestep_and_noise_over_the_whole_range():
    """Eq. 6's t ~ U{0, ..., 999} with fresh noise, not the 8 student timesteps or the distillation's noise."""
    student, teacher = Net(1), Net(2)
    x0, c, u = data(4)
    ts, same_noise = [], []
    torch.manual_seed(2)
    for _ in range(100):
        out = distill_loss(student, teacher, x0, c, u, DistillConfig(), SCHEDULE, use_cfg=False)
        ts += out["t_ori"].tolist()
        same_noise.append(torch.equal(out["eps"], out["eps_ori"]))
    assert not any(same_noise)
    assert len(set(ts) - set(trailing(8))) > 300  # 400 draws, mostly off the student grid
    assert min(ts) < 50 and max(ts) > 950 and abs(np.mean(ts) - 499.5) < 4.5 * 288.7 / 20  # uniform: sd 288.7


def test_eq11_cfg_branch_frequency_and_eq10_w_range():
    """Eq. 11's coin: the CFG loss with probability p; Eq. 10's w ~ U[w_min, w_max], drawn per sample."""
    student, teacher = Net(1), Net(2)
    x0, c, u = data(8)
    cfg = DistillConfig(cfg_prob=0.1, w_min=2.0, w_max=14.0)
    torch.manual_seed(0)
    n, ws, hits = 600, [], 0
    for _ in range(n):
        out = distill_loss(student, teacher, x0[:1], c[:1], u[:1], cfg, SCHEDULE)
        hits += int(out["cfg"].item())
        assert (out["w"] is None) == (out["cfg"].item() == 0)
    sd = math.sqrt(n * 0.1 * 0.9)
    assert abs(hits - 0.1 * n) < 4.5 * sd, hits  # binomial(600, 0.1): 60 +- 33
    for _ in range(40):
        w = distill_loss(student, teacher, x0, c, u, cfg, SCHEDULE, use_cfg=True)["w"]
        assert w.shape == (8,) and len(set(w.tolist())) == 8  # one w per sample
        ws += w.tolist()
    ws = np.array(ws)
    assert ws.min() >= 2.0 and ws.max() <= 14.0
    assert ws.min() < 2.5 and ws.max() > 13.5 and abs(ws.mean() - 8.0) < 4.5 * (12 / math.sqrt(12)) / math.sqrt(320)


def test_draws_cover_their_whole_ranges():
    """One large batch: the student steps are exactly the N grid points (t = 999 included), L_ori's t every one of
    0..999 (t = 0 included)."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(20000, 4, 1, 1, generator=g, dtype=torch.float64)
    c = torch.randn(20000, 1, 6, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    out = distill_loss(Net(1), Net(2), x0, c, c, DistillConfig(), SCHEDULE, use_cfg=False)
    assert set(out["t"].tolist()) == set(trailing(8)[:-1])
    assert set(out["t_ori"].tolist()) == set(range(1000))


@pytest.mark.parametrize("use_cfg", [False, True])
def test_every_draw_lives_on_the_inputs_device(use_cfg):
    """The meta device stands in for a GPU: a tensor made on the CPU would not mix with the rest."""
    x0, c, u = (a.to("meta") for a in data(4))
    out = distill_loss(Net(1).to("meta"), Net(2).to("meta"), x0, c, u, DistillConfig(), SCHEDULE, use_cfg=use_cfg)
    assert all(v.device.type == "meta" for v in out.values() if v is not None)


def test_vanilla_loss_ignores_a_given_w_and_half_precision_losses_are_float32():
    student, teacher = Net(1), Net(2)
    x0, c, u = data(4)
    torch.manual_seed(0)
    plain = distill_loss(student, teacher, x0, c, u, DistillConfig(), SCHEDULE, use_cfg=False)
    torch.manual_seed(0)
    given = distill_loss(student, teacher, x0, c, u, DistillConfig(), SCHEDULE, use_cfg=False, w=torch.full((4,), 9.0))
    assert given["w"] is None and given["loss"].item() == plain["loss"].item()
    low = distill_loss(student.to(torch.bfloat16), teacher.to(torch.bfloat16), *(a.to(torch.bfloat16) for a in
                       (x0, c, u)), DistillConfig(), SCHEDULE, use_cfg=True)
    assert low["dstl"].dtype == low["ori"].dtype == low["loss"].dtype == torch.float32


def test_eq11_dynamic_gamma_when_l_ori_is_small():
    """gamma_dyn = gamma L_dstl / L_ori also when L_ori < 1 (its floor only guards against division by zero)."""
    g = torch.Generator().manual_seed(0)
    x0, uncond = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    torch.manual_seed(0)
    out = distill_loss(PointMass(1.05), PointMass(), x0, x0, uncond, DistillConfig(gamma=0.2), SCHEDULE,
                       use_cfg=False)
    assert 1e-6 < out["ori"].item() < 1
    assert out["gamma"].item() == pytest.approx(0.2 * out["dstl"].item() / out["ori"].item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(1.2 * out["dstl"].item(), rel=1e-5)


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


@pytest.mark.parametrize("use_cfg", [False, True])
def test_eq16_loss_is_zero_when_two_teacher_steps_equal_one(use_cfg):
    """CFG of two point-mass models is the point-mass model at x_u + w (x_c - x_u): still exact, so L_dstl = 0."""
    g = torch.Generator().manual_seed(0)
    x0, uncond = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    torch.manual_seed(0)
    out = distill_loss(PointMass(), PointMass(), x0, x0, uncond, DistillConfig(), SCHEDULE, use_cfg=use_cfg)
    assert out["dstl"].item() < 1e-8, out
    assert out["ori"].item() < 1e-8  # the point-mass model at x* = x0 also predicts the true v
    torch.manual_seed(0)
    out = distill_loss(PointMass(1.1), PointMass(), x0, x0, uncond, DistillConfig(), SCHEDULE, use_cfg=use_cfg)
    assert out["dstl"].item() > 1e-4  # an inexact student is not


def test_student_grid_nests_in_teacher_grid_and_bad_configs_fail():
    for n, k in ((8, 2), (8, 4), (4, 2), (1, 2)):
        student, teacher = D.timesteps(n, "trailing"), D.timesteps(n * k, "trailing")
        assert student == teacher[::k] == trailing(n)
    with pytest.raises(ValueError, match="must divide"):
        DistillConfig(teacher_steps=16, student_steps=6)
    with pytest.raises(ValueError, match="CFG range"):
        DistillConfig(w_min=0.5)
