"""CFG-aware step distillation (paper §4, App. C): a student learns to do in one DDIM step what the teacher does in
two (Eq. 7-9, 16), with classifier-free guidance applied to both (Eq. 10), mixed with the vanilla loss and the
original v-prediction loss (Eq. 11).

Notation: the student steps t -> t'' on its N-step grid; the teacher takes the k = teacher_steps / N steps of its own
grid between the same two points (k = 2 in the paper: t -> t' -> t''). Both grids are 'trailing', so the teacher's
grid contains the student's (``diffusion.timesteps``) and the last student step lands on clean data (t'' = CLEAN).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from . import diffusion as D
from .formats.checkpoint import config_dict
from .pipeline import Pipeline, read_pipeline
from .training import LOCAL, Dist, TrainConfig, encoded_batch, fit, make_dataset, run_tag, save_with_figures
from .unet import with_guidance_input

TRAIN = TrainConfig(train_steps=1500, batch_size=32, lr=1e-4, warmup=100)


@dataclass(frozen=True)
class DistillConfig:
    teacher_steps: int = 16  # §4.1: a 16-step teacher distilled directly to an 8-step student
    student_steps: int = 8
    w_min: float = 2.0  # CFG range of Eq. 10: w ~ U[w_min, w_max]
    w_max: float = 14.0
    cfg_prob: float = 0.1  # p of Eq. 11: probability of the CFG distillation loss in an iteration
    gamma: float = 0.2  # weight of L_ori in Eq. 11, applied after rescaling L_ori to the distillation loss
    spacing: str = "trailing"
    w_conditioned: bool = False  # Meng et al.'s student: w is its input, one pass gives the guided output (Eq. 10's
    # target); else the student is guided like the teacher, two passes

    def __post_init__(self) -> None:
        if self.student_steps <= 0 or self.teacher_steps % self.student_steps:
            raise ValueError(f"the student's steps ({self.student_steps}) must divide the teacher's "
                             f"({self.teacher_steps})")
        if self.teacher_steps == self.student_steps:
            raise ValueError("the teacher needs more steps than the student")
        if self.teacher_steps > D.TRAIN_STEPS:
            raise ValueError(f"the teacher's steps must be at most {D.TRAIN_STEPS}, got {self.teacher_steps}")
        if not 1.0 <= self.w_min <= self.w_max < math.inf:
            raise ValueError(f"CFG range must satisfy 1 <= w_min <= w_max < inf, got [{self.w_min}, {self.w_max}]")
        if not 0.0 <= self.cfg_prob <= 1.0:
            raise ValueError(f"cfg_prob must be in [0, 1], got {self.cfg_prob}")
        if not 0.0 <= self.gamma < math.inf:
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma}")

    @property
    def k(self) -> int:
        """Teacher DDIM steps per student step (2 in Eq. 7)."""
        return self.teacher_steps // self.student_steps


def snr_weight(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Truncated SNR weighting varpi(lambda_t) = max(alpha_t^2 / sigma_t^2, 1) (Eq. 9, after Salimans & Ho)."""
    return torch.clamp(alpha**2 / sigma**2, min=1.0)


def x_target(*, z_t: torch.Tensor, z_t2: torch.Tensor, alpha_t: D.Scalar, sigma_t: D.Scalar, alpha_t2: D.Scalar,
             sigma_t2: D.Scalar) -> torch.Tensor:
    """Student target in x-space (Eq. 9, App. C Eq. 16).

        x_target = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

    It is the x_hat whose single DDIM step from z_t lands exactly on the teacher's z_t'' (Eq. 14 solved for x_hat).
    """
    ratio = D.expand(torch.as_tensor(sigma_t2) / torch.as_tensor(sigma_t), z_t)
    return (z_t2 - ratio * z_t) / (D.expand(alpha_t2, z_t) - ratio * D.expand(alpha_t, z_t))


def guided_v(unet: nn.Module, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None,
             w: torch.Tensor | None) -> torch.Tensor:
    """The v of Eq. 10, w v_cond - (w - 1) v_uncond (one batched call); with w=None the plain conditional v."""
    if w is None:
        return unet(z, t, context)
    v_uncond, v_cond = unet(torch.cat([z, z]), torch.cat([t, t]), torch.cat([uncond, context])).chunk(2)
    return D.cfg(v_cond, v_uncond, w)


@torch.no_grad()
def teacher_z(teacher: nn.Module, z_t: torch.Tensor, points: list[torch.Tensor], context: torch.Tensor,
              uncond: torch.Tensor | None, w: torch.Tensor | None, schedule: D.Schedule) -> torch.Tensor:
    """Eq. 7 / 12-13: the (guided) teacher's DDIM steps through ``points`` = [t, t', ..., t''] -> z_t''."""
    z = z_t
    for t, t_next in zip(points[:-1], points[1:]):
        v = guided_v(teacher, z, t, context, uncond, w)
        alpha, sigma = schedule.alpha_sigma(t)
        alpha_next, sigma_next = schedule.alpha_sigma(t_next)
        x, eps = D.x_from_v(z=z, v=v, alpha=alpha, sigma=sigma), D.eps_from_v(z=z, v=v, alpha=alpha, sigma=sigma)
        z = D.ddim_step(x=x, eps=eps, alpha_next=alpha_next, sigma_next=sigma_next)
    return z


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses in at least float32 (a half-precision run's outputs are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def dstl_loss(student: nn.Module, teacher: nn.Module, x0: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor,
              w: torch.Tensor | None, cfg: DistillConfig, schedule: D.Schedule) -> dict[str, torch.Tensor]:
    """L_dstl: Eq. 9 (w=None, vanilla) or Eq. 10 (teacher and student guided with the per-sample w), at a student
    step i ~ U{0, ..., N-1} per sample. Returns the loss and what it drew: the student timestep t and the noise.
    With ``cfg.w_conditioned`` the student is not guided but told w (Meng et al., arXiv 2210.03142: one pass learns the
    teacher's guided steps; vanilla iterations tell it w = 1)."""
    b = x0.shape[0]
    teacher_grid = torch.tensor(D.timesteps(cfg.teacher_steps, cfg.spacing), device=x0.device)
    i = torch.randint(0, cfg.student_steps, (b,), device=x0.device)  # which student step, per sample
    points = [teacher_grid[cfg.k * i + j] for j in range(cfg.k + 1)]  # t, t', ..., t'': student step i's ends
    t, t2 = points[0], points[-1]
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_t2, sigma_t2 = schedule.alpha_sigma(t2)
    eps = torch.randn_like(x0)
    z_t = D.noisy(x=x0, eps=eps, alpha=alpha_t, sigma=sigma_t)
    z_t2 = teacher_z(teacher, z_t, points, context, uncond, w, schedule)
    target = x_target(z_t=z_t, z_t2=z_t2, alpha_t=alpha_t, sigma_t=sigma_t, alpha_t2=alpha_t2, sigma_t2=sigma_t2)
    v = student(z_t, t, context, w=w) if cfg.w_conditioned else guided_v(student, z_t, t, context, uncond, w)
    x_student = D.x_from_v(z=z_t, v=v, alpha=alpha_t, sigma=sigma_t)
    per_sample = ((_fp32(x_student) - _fp32(target)) ** 2).mean(dim=(1, 2, 3))  # Eq. 8: the student's x_hat
    loss = (D.expand(snr_weight(alpha_t, sigma_t), per_sample) * per_sample).mean()
    return {"loss": loss, "t": t, "eps": eps}


def ori_loss(student: nn.Module, x0: torch.Tensor, context: torch.Tensor,
             schedule: D.Schedule) -> dict[str, torch.Tensor]:
    """L_ori, Eq. 6: the v-prediction loss at t ~ U{0, ..., 999} with fresh noise, on the conditional output.
    Returns the loss and what it drew (t_ori, eps_ori)."""
    t = torch.randint(0, schedule.steps, (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    alpha, sigma = schedule.alpha_sigma(t)
    v = student(D.noisy(x=x0, eps=eps, alpha=alpha, sigma=sigma), t, context)
    loss = ((_fp32(v) - _fp32(D.v_target(x=x0, eps=eps, alpha=alpha, sigma=sigma))) ** 2).mean()
    return {"loss": loss, "t_ori": t, "eps_ori": eps}


def distill_loss(student: nn.Module, teacher: nn.Module, x0: torch.Tensor, context: torch.Tensor,
                 uncond: torch.Tensor, cfg: DistillConfig, schedule: D.Schedule, *, use_cfg: bool | None = None,
                 w: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
    """One iteration's loss, Eq. 11: L = L_dstl + gamma_dyn * L_ori.

    L_dstl is the CFG distillation loss (Eq. 10, w ~ U[w_min, w_max] per sample) with probability cfg.cfg_prob,
    else the vanilla one (Eq. 9); ``use_cfg`` / ``w`` fix these choices. L_ori is Eq. 6 at its own t and noise
    (``ori_loss``). gamma_dyn = gamma * L_dstl / L_ori, detached: the 'dynamic gamma' that rescales L_ori to the
    distillation loss's magnitude while L_ori keeps its own gradient direction.
    Returns the total, its parts, gamma_dyn, and every draw: 'cfg' (1. or 0.), 'w' (None when vanilla), the
    distillation's 't' and 'eps', L_ori's 't_ori' and 'eps_ori'.
    """
    if use_cfg is None:
        use_cfg = bool(torch.rand(()) < cfg.cfg_prob)  # Eq. 11's P ~ U[0, 1] < p
    if use_cfg and w is None:
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(x0.shape[0], device=x0.device)
    w = w if use_cfg else None
    dstl = dstl_loss(student, teacher, x0, context, uncond, w, cfg, schedule)
    ori = ori_loss(student, x0, context, schedule)
    gamma = cfg.gamma * dstl["loss"].detach() / ori["loss"].detach().clamp(min=1e-12)
    return {"loss": dstl["loss"] + gamma * ori["loss"], "dstl": dstl["loss"], "ori": ori["loss"], "gamma": gamma,
            "cfg": torch.tensor(float(use_cfg), device=x0.device), "w": w, "t": dstl["t"], "eps": dstl["eps"],
            "t_ori": ori["t_ori"], "eps_ori": ori["eps_ori"]}


# ---- the distillation stage -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistillRun:
    """One distillation run: the loss settings of each stage (progressive: several), and what the student keeps."""

    chain: tuple[int, ...] = (16, 8)  # teacher steps -> ... -> student steps: (16, 8) direct, (64, 32, 16, 8) Fig. 6a
    loss: DistillConfig = DistillConfig()  # Eq. 10-11's settings (its step counts are taken from ``chain``)
    guidance: float | None = None  # CFG scale saved as the student's default; None: the teacher's
    data: str = "toy"  # x0 for z_t and L_ori: 'toy' or a folder of captioned images
    skip_bad: bool = False
    teacher_dtype: str = "float32"  # 'bfloat16': the frozen teacher in half the memory (fast on GPUs, slow on CPUs
    # without native bf16)
    train: TrainConfig = dataclasses.field(default=TRAIN)  # per stage when progressive

    def stages(self) -> list[DistillConfig]:
        """The DistillConfig of each teacher -> student stage (its checks run here)."""
        if self.train.train_steps < 1:
            raise ValueError(f"train-steps must be >= 1, got {self.train.train_steps}")
        if self.guidance is not None and not (math.isfinite(self.guidance) and self.guidance >= 1):
            raise ValueError(f"guidance must be a finite number >= 1, got {self.guidance}")
        if len(self.chain) < 2:
            raise ValueError(f"a distillation chain needs at least two step counts, got {self.chain}")
        if self.loss.w_conditioned and len(self.chain) > 2:
            raise ValueError("a w-conditioned student is distilled in one stage: its teacher must be guided by CFG")
        if self.teacher_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"teacher-dtype must be float32 or bfloat16, got {self.teacher_dtype!r}")
        return [dataclasses.replace(self.loss, teacher_steps=a, student_steps=b)
                for a, b in zip(self.chain[:-1], self.chain[1:])]


def check_pair(teacher: Pipeline, student: Pipeline, w_conditioned: bool = False) -> None:
    """Refuse, before any training, a pair that cannot be distilled."""
    if teacher.unet.spec.guidance_embed:
        raise ValueError("the teacher takes w as an input (w-conditioned); distil from a teacher guided by CFG (Eq. 3)")
    if student.unet.spec.guidance_embed and not w_conditioned:
        raise ValueError("the student takes w as an input (w-conditioned): distil it with --w-conditioned")
    if teacher.prediction != "v" or student.prediction != "v":
        raise ValueError(f"teacher and student must both be v-prediction models (§4.1), got teacher "
                         f"{teacher.prediction!r} and student {student.prediction!r}; fine-tune to v with train.py")
    if teacher.unet.spec.context_dim != student.unet.spec.context_dim:
        raise ValueError(f"text-encoder widths differ: teacher {teacher.unet.spec.context_dim}, "
                         f"student {student.unet.spec.context_dim}")
    if teacher.text_encoder.cfg != student.text_encoder.cfg or teacher.latent_scale != student.latent_scale:
        raise ValueError("teacher and student must share the text encoder and the latent space")


class Frozen(nn.Module):
    """The frozen teacher UNet in ``dtype`` (bf16: half its memory); inputs cast to it, outputs back to float32."""

    def __init__(self, unet: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.unet, self.dtype = unet.to(dtype), dtype

    def forward(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(z.to(self.dtype), t, context.to(self.dtype)).float()


def distill_stage(teacher: Pipeline, student: Pipeline, run: DistillRun, out: str, d: Dist) -> Pipeline:
    """One teacher -> student distillation (Eq. 11) with ``training.fit``: ``run.loss`` is this stage's (one of
    ``run.stages()``); returns the student with its EMA UNet."""
    cfg = run.loss
    unet = student.unet.train()
    teacher.unet.eval().requires_grad_(False)
    frozen = Frozen(teacher.unet, getattr(torch, run.teacher_dtype))
    t = run.train
    data = make_dataset(run.data, student.sampler.resolution, t.seed, run.skip_bad, t.workers)
    with torch.no_grad():
        empty = student.encode_prompts([""])

    def loss_at(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0, context = encoded_batch(student, data, step, micro, t, d)
        parts = distill_loss(unet, frozen, x0, context, empty.expand_as(context), cfg, student.schedule)
        return parts["loss"], parts["dstl"]

    desc = f"distill {cfg.teacher_steps}->{cfg.student_steps}"
    stored, _ = fit(unet, loss_at, t, d, out=out, tag=run_tag(run, arch=unet.spec.to_json(), teacher=teacher.source),
                    save=save_with_figures(out, student, f"distillation loss {desc} (Eq. 11)"), desc=desc)
    return student.with_parts(unet=stored)


def distill(teacher_path: str, student_path: str, run: DistillRun, out: str, d: Dist = LOCAL) -> Pipeline:
    """Distil the teacher into the student along ``run.chain`` (§4.1: 16 -> 8 directly; App. D: the student starts
    from ``student_path``, e.g. the teacher itself). A progressive chain's intermediate students are saved as
    <out>.stage<N>.safetensors and each teaches the next stage. The student saved carries its own sampler: N steps
    on the trailing grid, the guidance it was distilled for."""
    stages = run.stages()
    teacher = read_pipeline(teacher_path).to(d.device)
    teacher.unet.to(getattr(torch, run.teacher_dtype))  # before the student loads: the peak holds one fp32 copy less
    student = read_pipeline(student_path).to(d.device)
    check_pair(teacher, student, run.loss.w_conditioned)
    if run.loss.w_conditioned:  # Meng et al.: the student gets a w input, zero at first (it starts as it was)
        student = student.with_parts(unet=with_guidance_input(student.unet))
    teacher = teacher.with_parts(vae=student.vae, text_encoder=student.text_encoder)  # the teacher's own are unused
    for i, cfg in enumerate(stages):
        guidance = teacher.sampler.guidance if run.guidance is None else run.guidance
        student.sampler = dataclasses.replace(student.sampler, steps=cfg.student_steps, spacing="trailing",
                                              guidance=guidance, distilled=True)
        student.training = config_dict(run)
        stage_out = out if i == len(stages) - 1 else f"{out}.stage{cfg.student_steps}.safetensors"
        result = distill_stage(teacher, student, dataclasses.replace(run, loss=cfg), stage_out, d)
        if run.train.stop_after is not None:
            return result
        teacher, student = result, read_pipeline(stage_out).to(d.device)  # progressive: the student teaches next
    return student
