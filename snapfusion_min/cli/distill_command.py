"""CFG-aware step distillation (paper §4, App. C-D): a teacher's 2N steps -> a student's N steps.

    python distill.py --teacher models/toy/model.safetensors --out student8.safetensors      # 16 -> 8, Eq. 11
    python distill.py --teacher t.safetensors --student-init evolved.safetensors ...         # another architecture
    python distill.py --teacher t.safetensors --progressive 64,32,16,8 --out s8.safetensors  # progressive (Fig. 6a)
    python distill.py ... --cfg-prob 0   # vanilla loss only (Eq. 9);  --cfg-prob 1: CFG loss only (Eq. 10)
    python distill.py ... --w-conditioned --cfg-prob 1   # Meng et al.'s student: w an input, one pass per step

The student starts from --student-init (default: the teacher itself, 'self-distillation' of App. D) and is saved as a
checkpoint whose sampler defaults are its own N steps on the trailing grid, so sample.py uses it as is.
"""

from __future__ import annotations

import sys

from ..distill import TRAIN, DistillConfig, DistillRun, distill
from ..pipeline import pick_device
from ..training import OPTIMIZERS, TrainConfig, setup_distributed
from . import check_writable, defaults, flag, from_args, parser, run
from .presets import add_preset_flag, apply_preset


def build_parser():  # noqa: ANN201
    d, t = defaults(DistillConfig), TRAIN
    p = parser(__doc__)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (v-prediction)")
    p.add_argument("--student-init", help="student's starting weights (default: the teacher; App. D)")
    flag(p, "--out", required=True)
    p.add_argument("--teacher-steps", type=int, default=d.teacher_steps, help="the teacher's steps (§4.1)")
    p.add_argument("--student-steps", type=int, default=d.student_steps, help="the student's steps (§4.1)")
    p.add_argument("--progressive", help="e.g. 64,32,16,8: halve the steps stage by stage (Fig. 6a)")
    p.add_argument("--w-min", type=float, default=d.w_min, help="CFG range of Eq. 10: w ~ U[w-min, w-max]")
    p.add_argument("--w-max", type=float, default=d.w_max, help="see --w-min")
    p.add_argument("--cfg-prob", type=float, default=d.cfg_prob, help="p of Eq. 11: probability of the CFG loss")
    p.add_argument("--w-conditioned", action="store_true",
                   help="the student takes w as an input (Meng et al.; a zero-initialised w embedding is added) and "
                        "gives the guided output in one pass, without CFG's unconditional one")
    p.add_argument("--gamma", type=float, default=d.gamma, help="weight of the rescaled L_ori, Eq. 11")
    flag(p, "--guidance", None, "saved as the student's default (default: the teacher's)")
    for name, default in (("--train-steps", t.train_steps), ("--batch-size", t.batch_size), ("--lr", t.lr),
                          ("--ema-decay", t.ema_decay), ("--seed", t.seed), ("--data", "toy"), ("--skip-bad", None),
                          ("--workers", 0), ("--device", "auto"), ("--save-every", t.save_every), ("--resume", None),
                          ("--overwrite", None), ("--stop-after", None)):
        flag(p, name, default, "per stage when progressive" if name == "--train-steps" else "")
    flag(p, "--optimizer", t.optimizer, choices=OPTIMIZERS)
    flag(p, "--checkpointing")
    flag(p, "--amp")
    flag(p, "--accum", t.accum)
    add_preset_flag(p)
    flag(p, "--no-ema")
    flag(p, "--no-state")
    p.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default="float32", help="the frozen teacher's "
                   "(bfloat16: half its memory; fast on GPUs, emulated and ~20x slower on a CPU without native bf16)")
    return p

def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    apply_preset(args, sys.argv[1:] if argv is None else argv, p, "distill")
    try:
        chain = tuple(int(s) for s in args.progressive.split(",")) if args.progressive else (args.teacher_steps,
                                                                                            args.student_steps)
    except ValueError:
        raise ValueError(f"--progressive takes step counts like 64,32,16,8, got {args.progressive!r}") from None
    loss = from_args(DistillConfig, args, teacher_steps=chain[0], student_steps=chain[1])
    train = from_args(TrainConfig, args, warmup=TRAIN.warmup, save_state=not args.no_state,
                      ema_decay=None if args.no_ema else args.ema_decay)
    cfg = DistillRun(chain=chain, loss=loss, guidance=args.guidance, data=args.data, skip_bad=args.skip_bad,
                     teacher_dtype=args.teacher_dtype, train=train)
    cfg.stages()  # every stage's checks, before any model is loaded
    check_writable(args.out)
    d = setup_distributed(pick_device(args.device))
    distill(args.teacher, args.student_init or args.teacher, cfg, args.out, d)
    if d.main:
        print(f"wrote {args.out}: {chain[-1]}-step student ({' -> '.join(map(str, chain))}; {cfg.stages()[-1]})")


def entry() -> None:
    """``python distill.py``, ``snapfusion-distill``, ``python -m snapfusion_min distill``; a mistake is one line."""
    run(main)
