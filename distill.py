"""CFG-aware step distillation (paper §4, App. C-D): a teacher's 2N steps -> a student's N steps.

    python distill.py --teacher models/toy/model.safetensors --out student8.safetensors      # 16 -> 8, Eq. 11
    python distill.py --teacher t.safetensors --student-init evolved.safetensors ...         # another architecture
    python distill.py --teacher t.safetensors --progressive 64,32,16,8 --out s8.safetensors  # progressive (Fig. 6a)
    python distill.py ... --cfg-prob 0   # vanilla loss only (Eq. 9);  --cfg-prob 1: CFG loss only (Eq. 10)

The student starts from --student-init (default: the teacher itself, 'self-distillation' of App. D) and is saved as a
checkpoint whose sampler defaults are its own N steps on the trailing grid, so sample.py uses it as is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from snapfusion_min.distill import DistillConfig, distill_loss
from snapfusion_min.pipeline import Pipeline, load_pipeline, pick_device
from snapfusion_min.training import (
    EMA,
    Dist,
    average_gradients,
    batch_at,
    broadcast_parameters,
    check_ranks_agree,
    ema_model,
    lr_at,
    make_dataset,
    resume,
    save_progress,
    seed_step,
    setup_distributed,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = DistillConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (v-prediction)")
    p.add_argument("--student-init", help="student's starting weights (default: the teacher; App. D)")
    p.add_argument("--out", required=True, help="student checkpoint to write")
    p.add_argument("--teacher-steps", type=int, default=d.teacher_steps, help="§4.1: 16 (default)")
    p.add_argument("--student-steps", type=int, default=d.student_steps, help="§4.1: 8 (default)")
    p.add_argument("--progressive", help="e.g. 64,32,16,8: halve the steps stage by stage (Fig. 6a)")
    p.add_argument("--w-min", type=float, default=d.w_min, help="CFG range of Eq. 10 (default: [2, 14])")
    p.add_argument("--w-max", type=float, default=d.w_max)
    p.add_argument("--cfg-prob", type=float, default=d.cfg_prob, help="p of Eq. 11 (default: 0.1)")
    p.add_argument("--gamma", type=float, default=d.gamma, help="weight of the rescaled L_ori, Eq. 11 (default 0.2)")
    p.add_argument("--guidance", type=float, help="CFG scale saved as the student's default (default: the teacher's)")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (per stage when progressive)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="toy", help="'toy' or a folder of captioned images (for x0 and L_ori)")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from <out>.state.pt exactly")
    p.add_argument("--stop-after", type=int, help="run at most N steps in this invocation, save, exit")
    return p.parse_args(argv)


def check_pair(teacher: Pipeline, student: Pipeline) -> None:
    """Refuse, before any training, a pair that cannot be distilled."""
    if teacher.prediction != "v" or student.prediction != "v":
        raise ValueError(f"teacher and student must both be v-prediction models (§4.1), got teacher "
                         f"{teacher.prediction!r} and student {student.prediction!r}; fine-tune to v with train.py")
    if teacher.unet.spec.context_dim != student.unet.spec.context_dim:
        raise ValueError(f"text-encoder widths differ: teacher {teacher.unet.spec.context_dim}, "
                         f"student {student.unet.spec.context_dim}")
    if teacher.text_encoder.cfg != student.text_encoder.cfg or teacher.latent_scale != student.latent_scale:
        raise ValueError("teacher and student must share the text encoder and the latent space")


def distill_stage(args: argparse.Namespace, d: Dist, teacher: Pipeline, student: Pipeline, cfg: DistillConfig,
                  out: str) -> Pipeline:
    """One teacher -> student distillation (Eq. 11), with EMA, exact resume and DDP like train.py."""
    unet, state_path = student.unet.train(), Path(out + ".state.pt")
    teacher.unet.eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01, fused=True)
    ema, start, losses = EMA(unet, args.ema), 0, []
    tag = unet.spec.to_json() + repr(cfg)
    if args.resume:
        start, losses = resume(state_path, unet, opt, ema, tag)
    broadcast_parameters(unet, d)
    data = make_dataset(args.data, student.sampler["resolution"], args.seed, args.skip_bad)
    with torch.no_grad():
        empty = student.encode_prompts([""])
    end = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    desc = f"distill {cfg.teacher_steps}->{cfg.student_steps}"
    for step in tqdm(range(start, end), desc=desc, disable=not d.main, initial=start, total=args.steps):
        seed_step(args.seed, step, d.rank)
        x, captions = batch_at(data, step, args.batch_size, d, args.seed)
        with torch.no_grad():
            x0 = student.vae.encode(x.to(d.device)) * student.latent_scale
            context = student.encode_prompts(captions)
        parts = distill_loss(unet, teacher.unet, x0, context, empty.expand_as(context), cfg, student.schedule)
        if not torch.isfinite(parts["loss"]):
            raise FloatingPointError(f"loss is {parts['loss'].item()} at step {step}; last good checkpoint: {out}")
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        average_gradients(unet, d)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lr, 100, args.steps)
        opt.step()
        ema.update(unet, step)
        losses.append(parts["dstl"].item())
        if d.main and ((step + 1) % args.save_every == 0 or step + 1 == end):
            save_progress(out, unet, opt, ema, step + 1, losses, tag, student, f"distillation loss {desc} (Eq. 11)")
    check_ranks_agree(unet, d)
    return Pipeline(ema_model(unet, ema), student.vae, student.text_encoder, "v", student.latent_scale,
                    sampler=student.sampler)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    chain = [int(s) for s in args.progressive.split(",")] if args.progressive else [args.teacher_steps,
                                                                                   args.student_steps]
    configs = [DistillConfig(teacher_steps=a, student_steps=b, w_min=args.w_min, w_max=args.w_max,
                             cfg_prob=args.cfg_prob, gamma=args.gamma) for a, b in zip(chain[:-1], chain[1:])]
    d = setup_distributed(pick_device(args.device))
    teacher = load_pipeline(args.teacher).to(d.device)
    student = load_pipeline(args.student_init or args.teacher).to(d.device)
    check_pair(teacher, student)
    for i, cfg in enumerate(configs):
        guidance = teacher.sampler["guidance"] if args.guidance is None else args.guidance
        student.sampler = {**student.sampler, "steps": cfg.student_steps, "spacing": "trailing",
                           "guidance": guidance, "distilled": True}
        out = args.out if i == len(configs) - 1 else f"{args.out}.stage{cfg.student_steps}.safetensors"
        result = distill_stage(args, d, teacher, student, cfg, out)
        if args.stop_after is not None:
            break
        teacher, student = result, load_pipeline(out).to(d.device)  # progressive: the student teaches next
    if d.main:
        print(f"wrote {args.out}: {configs[-1].student_steps}-step student "
              f"({', '.join(f'{c.teacher_steps}->{c.student_steps}' for c in configs)}; {configs[-1]})")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:  # a user's mistake or a diverged run: one line
        sys.exit(f"distill.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
