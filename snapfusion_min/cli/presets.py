"""``--preset sd15``: SD-v1.5-scale settings for each stage, every value with its source.

The paper's where it gives them (§3.1, §3.2, §4, §5, App. B-D, Fig. 7), diffusers' training example
(``examples/text_to_image/train_text_to_image.py`` and its README's SD fine-tuning command) where it does not, and
ours where neither does (said so). A flag given on the command line wins over the preset. docs/sd_scale.md lists
them with the memory each stage needs.
"""

from __future__ import annotations

import argparse

PAPER_BATCH = "§5: batch 2,048 (AdamW, weight decay 0.01)"
DIFFUSERS_LR = "diffusers' SD fine-tuning example: learning rate 1e-5 (the paper gives none)"
DIFFUSERS_STEPS = "diffusers' SD fine-tuning example: 15,000 steps (the paper gives none)"
DIFFUSERS_AMP = "diffusers' example: mixed precision (ours picks bf16 on an A100, the paper's GPU)"
DIFFUSERS_CKPT = "diffusers' example: gradient checkpointing"
ACCUM = "ours: 8 GPUs x 32 micro-batches of 8 = 2,048; with N GPUs use 256 / N"

LOOP = {  # the training loop's settings, the same for the UNet stage and distillation
    "--batch-size": (2048, PAPER_BATCH),
    "--accum": (32, ACCUM),
    "--lr": (1e-5, DIFFUSERS_LR),
    "--train-steps": (15000, DIFFUSERS_STEPS),
    "--ema-decay": (0.9999, "diffusers' EMAModel default decay"),
    "--amp": (True, DIFFUSERS_AMP),
    "--checkpointing": (True, DIFFUSERS_CKPT),
    "--save-every": (500, "diffusers' example: checkpointing_steps 500"),
}

UNET = {  # train.py unet: the v-prediction fine-tune (§4.1) and robust training (Eq. 5)
    **LOOP,
    "--warmup": (500, "diffusers' example: lr_warmup_steps default 500"),
    "--resolution": (512, "SD-v1.5's training resolution"),
    "--cfg-dropout": (0.1, "SD's caption dropout for CFG (ours, as the toy world)"),
}

DISTILL = {  # distill.py: CFG-aware step distillation (§4, App. C-D)
    "--teacher-steps": (16, "§4.1, App. D: a 16-step teacher distilled directly to 8 steps"),
    "--student-steps": (8, "§4.1, App. D"),
    "--w-min": (2.0, "§4, Eq. 10: w ~ U[2, 14] by default (Fig. 7(a))"),
    "--w-max": (14.0, "§4, Eq. 10"),
    "--cfg-prob": (0.1, "Fig. 7(a): CFG probability 0.1"),
    "--gamma": (0.2, "Fig. 7(b): dynamic scaling 0.2 of L_ori (Eq. 11)"),
    **LOOP,
    "--teacher-dtype": ("bfloat16", "ours: the frozen teacher in half the memory"),
}

EVOLVE = {  # evolve.py: Alg. 1
    "--score-prompts": (2000, "§3.1: dCLIP on 2K MS-COCO validation captions"),
    "--num-inference-steps": (50, "§3.1: fixed 50 steps when scoring"),
    "--guidance": (7.5, "§3.1: CFG scale 7.5 when scoring"),
    "--batch-size": (2048, PAPER_BATCH),
    "--accum": (32, ACCUM),
    "--lr": (1e-5, DIFFUSERS_LR),
    "--amp": (True, DIFFUSERS_AMP),
    "--checkpointing": (True, DIFFUSERS_CKPT),
}

DECODER = {  # train.py decoder: App. B.2
    "--ratio": (0.5, "§3.2: 50% uniform channel pruning"),
    "--teacher-steps": (50, "§3.2: latents after 50 DDIM steps of SD-v1.5's UNet"),
    "--guidance": (7.5, "SD-v1.5's default CFG scale (the paper does not say)"),
    "--object-weight": (0.0, "§3.2: the mean squared error between the two images"),
    "--amp": (True, DIFFUSERS_AMP),
}

PRESETS = {"sd15": {"unet": UNET, "distill": DISTILL, "evolve": EVOLVE, "decoder": DECODER}}


def add_preset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="SD-v1.5-scale settings for this stage (the paper's, "
                   "else diffusers' training example's; docs/sd_scale.md lists each with its source); flags given "
                   "on the command line win")


def apply_preset(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser, stage: str) -> None:
    """Set ``stage``'s preset values on ``args`` for every flag the command line did not give (by any spelling);
    ``parser`` is the stage's (a sub-command's own)."""
    if not getattr(args, "preset", None):
        return
    table = PRESETS[args.preset].get(stage)
    if table is None:
        raise ValueError(f"--preset {args.preset} has no settings for this stage (it has: "
                         f"{', '.join(PRESETS[args.preset])})")
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    actions = {o: a for a in parser._actions for o in a.option_strings}
    for name, (value, _source) in table.items():
        action = actions[name]
        if not given & set(action.option_strings):
            setattr(args, action.dest, value)


def subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of sub-command ``name``."""
    (subs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subs.choices[name]
