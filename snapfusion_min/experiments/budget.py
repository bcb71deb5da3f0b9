"""Steps and sample counts of every stage of the toy recipe, grouped by stage; ``QUICK`` runs each for a few steps.

Where each figure came from, and what a run of each budget measured, is in report/README.md (its stage table).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Scratch:
    """Optimizer steps of the bundled models when the recipe trains them itself (no ``--bundled``)."""

    clip: int = 2500
    autoencoder: int = 4000
    teacher: int = 8000


@dataclass(frozen=True)
class Evolving:
    """Alg. 1 on the robust-trained UNet (``evolve.EvolveConfig``)."""

    target: float = 0.5  # of the start's predicted latency per step
    iterations: int = 4
    actions: int = 6
    train: int = 150  # robust-training steps before each evolving step
    finetune: int = 300
    prompts: int = 64  # held-out prompts of the dCLIP scorer
    score_steps: int = 10  # its DDIM steps (§3.1: 50 on SD-v1.5; the toy teacher's 10 are as good as its 50)


@dataclass(frozen=True)
class Distilling:
    """The 32 -> 16 and 16 -> 8 step distillations (Eq. 11)."""

    steps: int = 600
    cfg_range: tuple[float, float] = (1.5, 4.0)  # Eq. 10's w range, around the first toy world's best guidance (2)


@dataclass(frozen=True)
class FewStep:
    """Where the toy teacher's DDIM breaks, and the students distilled there (Fig. 4 right, Fig. 6c-d)."""

    steps: int = 1  # the few-step count (report/README.md, Fig. 4 right: where DDIM breaks)
    distill: int = 300  # steps of each 8 -> few-step distillation
    guidance: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 5.0)
    ddim_steps: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 16, 50)  # the teacher's DDIM over steps (Fig. 4, right)


@dataclass(frozen=True)
class Decoder:
    """The pruned decoder's data distillation (§3.2)."""

    latents: int = 1024
    steps: int = 2500


@dataclass(frozen=True)
class Judging:
    """The report's judge: held-out prompts, the guidance sweep, repeats of each timing."""

    prompts: int = 200
    guidance: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0)
    repeat: int = 7


@dataclass(frozen=True)
class Budget:
    scratch: Scratch = field(default_factory=Scratch)
    robust: int = 500  # robust training (Eq. 5) of the teacher, and its plain control, before evolving
    evolve: Evolving = field(default_factory=Evolving)
    distill: Distilling = field(default_factory=Distilling)
    few: FewStep = field(default_factory=FewStep)
    decoder: Decoder = field(default_factory=Decoder)
    judge: Judging = field(default_factory=Judging)


QUICK = Budget(scratch=Scratch(clip=4, autoencoder=4, teacher=8), robust=8,
               evolve=Evolving(iterations=1, actions=3, train=4, finetune=4, prompts=8, score_steps=2),
               distill=Distilling(steps=6),
               few=FewStep(distill=2, guidance=(2.0,), ddim_steps=(1, 2)), decoder=Decoder(latents=16, steps=4),
               judge=Judging(prompts=8, guidance=(2.0,), repeat=1))

FEW_STUDENTS = [("few_mixed", 0.1, None), ("few_vanilla", 0.0, None), ("few_half", 0.5, None),
                ("few_cfg", 1.0, None), ("few_paper_range", 0.1, (2.0, 14.0))]  # (name, p, w range or the budget's)


def few_students(b: Budget) -> list[tuple[str, float, tuple[float, float]]]:
    """The few-step students as (stage, p of Eq. 11, w range of Eq. 10), the budget's range where none is given."""
    return [(name, prob, w_range or b.distill.cfg_range) for name, prob, w_range in FEW_STUDENTS]
