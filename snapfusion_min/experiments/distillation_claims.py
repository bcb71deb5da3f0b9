"""Does CFG-aware step distillation work here? The paper's distillation claims at its step count, 8, with every
student trained with several seeds and every verdict read from a bootstrap interval over prompts *and* seeds
(``python recipe.py --bundled --students`` after the recipe -> report/distillation.md).

Every student is distilled 16 -> 8 steps by the recipe's 16-step teacher (§4.1, App. D), by Eq. 11, as the recipe's
own student8 is. As in the paper, Fig. 4 (right) and Table 2 are of the efficient (evolved) UNet, started from its
16-step counterpart, and the loss ablations of Fig. 6b-d distil SD-v1.5 itself ("our distilled 8-step SD-v1.5"):
here the teacher's own UNet, started from the 16-step teacher.

    mixed      evolved UNet, p = 0.1, w ~ U[the budget's range]: ours (seed 0 is the recipe's student8)
    e_vanilla  evolved UNet, p = 0: Eq. 7-9 alone
    o_mixed    the teacher's UNet, p = 0.1            o_cfg    p = 1: the CFG-aware loss of Eq. 10 alone
    o_vanilla  p = 0                                  o_range  p = 0.1, w ~ U[2, 14]: the paper's range
    o_half     p = 0.5                                o_wcond  Meng et al.: w an input, one UNet pass per step (p = 1)

Beside them, undistilled (one model each): the teacher by DDIM, DPM-Solver-2 and DPM-Solver++(2M) at 8 steps on the
students' trailing grid, the 50-step baseline (SD's leading grid), the evolved UNet by DDIM at 16 and 8 steps, and the
teacher's DDIM over steps at G0 (the regime, Fig. 4 right). Every curve draws the same held-out prompts with the same
noise over the same guidance grid (``Budget.judge.guidance``); seed s of a student draws its batches, timesteps and
w from s.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..eval import bootstrap
from ..formats.checkpoint import atomic_write
from ..formats.figures import fid_clip_plot, steps_plot
from ..pipeline import pick_device, read_pipeline
from ..toy import BUNDLED
from ..toy.clip import Heldout, load_toy_clip, per_prompt, toy_judge
from ..toy.tables import mean
from ..training import Dist
from .budget import G0, Budget
from .stages import distil_stage, run_stages

STUDENTS = {  # name -> (the 16-step UNet it starts from, p of Eq. 11, w range of Eq. 10 or the budget's, w input)
    "mixed": ("evolved16", 0.1, None, False), "e_vanilla": ("evolved16", 0.0, None, False),
    "o_mixed": ("teacher16", 0.1, None, False), "o_vanilla": ("teacher16", 0.0, None, False),
    "o_half": ("teacher16", 0.5, None, False), "o_cfg": ("teacher16", 1.0, None, False),
    "o_range": ("teacher16", 0.1, (2.0, 14.0), False), "o_wcond": ("teacher16", 1.0, None, True)}
UNDISTILLED = {  # name -> (checkpoint, solver, grid, steps)
    "base": ("teacher", "ddim", "leading", 50), "ddim": ("teacher", "ddim", "trailing", 8),
    "dpm": ("teacher", "dpm", "trailing", 8), "dpmpp": ("teacher", "dpm++", "trailing", 8),
    "e16": ("evolved", "ddim", "trailing", 16), "e8": ("evolved", "ddim", "trailing", 8)}
CURVES = [*UNDISTILLED, *STUDENTS]
TRAIN_ORDER = sorted(STUDENTS, key=lambda name: STUDENTS[name][0] != "teacher16")  # the teacher's UNet's first:
# they hang on the teacher alone, the evolved UNet's on evolving too
SHORT = {"base": "50-step baseline", "ddim": "8-step DDIM", "dpm": "8-step DPM-Solver-2",
         "dpmpp": "8-step DPM-Solver++(2M)", "e16": "evolved, 16-step DDIM", "e8": "evolved, 8-step DDIM",
         "mixed": "ours", "e_vanilla": "evolved, vanilla", "o_mixed": "mixed", "o_vanilla": "vanilla",
         "o_half": "p = 0.5", "o_cfg": "CFG only", "o_range": "w ~ U[2, 14]", "o_wcond": "w-conditioned"}
PAPER_TABLE2 = {"dpm": (31.7, 0.32), "dpmpp": (25.6, 0.32), "o_wcond": (26.9, 0.30),
                "mixed": (24.2, 0.30)}  # the paper's Table 2 (SD-v1.5, MS-COCO 2017 5K, 8 steps): (FID, CLIP)


@dataclass(frozen=True)
class ClaimsConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    n: int = 300  # held-out prompts per point
    draws: int = 1000  # bootstrap resamples of the prompts and seeds
    clip_margin: float = 0.01  # "keeps" another's CLIP score: the interval of the difference lies above -this
    fid_margin: float = 0.1  # ... its FID: above -this x the other's FID
    ddim_steps: tuple[int, ...] = (2, 4, 8, 16, 50)  # the teacher's DDIM over steps at G0 (Fig. 4, right)


QUICK_CLAIMS = ClaimsConfig(seeds=(0,), n=4, draws=50, ddim_steps=(2, 8))  # a smoke run (the tests)


def labels(b: Budget) -> dict[str, str]:
    """Curve -> its label on the page: the undistilled model and its sampler, or the student's UNet and loss."""
    out = {"base": "baseline: teacher, 50-step DDIM", "ddim": "teacher, 8-step DDIM",
           "dpm": "teacher, 8-step DPM-Solver-2", "dpmpp": "teacher, 8-step DPM-Solver++(2M)",
           "e16": "evolved, undistilled, 16-step DDIM", "e8": "evolved, undistilled, 8-step DDIM"}
    for name, (init, prob, w_range, w_cond) in STUDENTS.items():
        lo, hi = w_range or b.distill.cfg_range
        kind = "Meng et al., w-conditioned" if w_cond else {0.0: "vanilla", 1.0: "CFG only"}.get(prob, "mixed")
        unet = "evolved" if init == "evolved16" else "teacher"
        out[name] = ("ours: " if name == "mixed" else "") + f"{unet}, {kind} (p = {prob:g}" + (
            "" if prob == 0 else f", w ~ U[{lo:g}, {hi:g}]") + ")"
    return out


def key(w: float) -> str:
    return f"{w:g}"


# ---- the stages -------------------------------------------------------------------------------------------------
def student_path(p: dict[str, Path], work: Path, name: str, seed: int) -> Path:
    """Where student ``name`` of ``seed`` is: ours of seed 0 is the recipe's student8."""
    return p["student8"] if (name, seed) == ("mixed", 0) else work / f"{name}{seed}.safetensors"


def stages(b: Budget, cfg: ClaimsConfig, p: dict[str, Path], work: Path) -> list[tuple[str, Callable]]:
    """(name, run): every student and seed trained (ours of seed 0 is the recipe's), then every curve judged into
    ``<work>/<student><seed>.judged.pt`` (the undistilled ones': ``undistilled.judged.pt``)."""
    d, clip = Dist(device=pick_device("auto")), load_toy_clip(BUNDLED / "clip.safetensors")
    heldout = Heldout(clip, cfg.n)

    def train(name: str, seed: int) -> Callable:
        init, prob, w_range, w_cond = STUDENTS[name]
        return lambda: distil_stage(b, p["teacher16"], p[init], student_path(p, work, name, seed), (16, 8), d,
                                    cfg_prob=prob, cfg_range=w_range, w_conditioned=w_cond, seed=seed)

    def judged(name: str, seed: int) -> Callable:
        def run() -> None:
            pipe = read_pipeline(student_path(p, work, name, seed))
            out = {key(w): per_prompt(pipe, clip, cfg.n, 8, w, heldout, progress=True) for w in b.judge.guidance}
            atomic_write(work / f"{name}{seed}.judged.pt", lambda tmp: torch.save(out, tmp))
        return run

    def undistilled() -> None:
        pipes, out = {name: read_pipeline(p[name]) for name in ("teacher", "evolved")}, {}
        for name, solver, grid, steps, w in undistilled_points(b, cfg):
            pipe = pipes[name]
            sampled = pipe.with_parts(sampler=dataclasses.replace(pipe.sampler, solver=solver, spacing=grid))
            out[f"{name}/{solver}/{grid}/{steps}/{key(w)}"] = per_prompt(sampled, clip, cfg.n, steps, w, heldout,
                                                                         progress=True)
        atomic_write(work / "undistilled.judged.pt", lambda tmp: torch.save(out, tmp))

    todo = [(f"{name}{seed}", train(name, seed)) for name in TRAIN_ORDER for seed in cfg.seeds
            if (name, seed) != ("mixed", 0)]
    return todo + [("undistilled judged", undistilled)] + [(f"{name}{seed} judged", judged(name, seed))
                                                           for name in STUDENTS for seed in cfg.seeds]


def undistilled_points(b: Budget, cfg: ClaimsConfig) -> list[tuple[str, str, str, int, float]]:
    """(checkpoint, solver, grid, steps, guidance) of every undistilled point: each curve over the grid, and the
    teacher's DDIM over steps at G0."""
    points = [(*spec, w) for spec in UNDISTILLED.values() for w in b.judge.guidance]
    points += [("teacher", "ddim", grid, n, G0) for grid in ("leading", "trailing") for n in cfg.ddim_steps]
    return list(dict.fromkeys(points))


def run_claims(b: Budget, cfg: ClaimsConfig, p: dict[str, Path], work: Path, report: Path) -> list[str]:
    """Every student, seed and curve not yet done (recorded in <work>/students.json), then the page
    report/distillation.md; returns its lines."""
    work.mkdir(parents=True, exist_ok=True)
    todo = stages(b, cfg, p, work)
    record = run_stages(todo, work / "students.json", {"budget": dataclasses.asdict(b),
                                                       "claims": dataclasses.asdict(cfg)})
    start = time.perf_counter()
    facts = measure(b, cfg, work)
    done = {name: record["done"][name] for name, _ in todo}
    return write_page(b, cfg, facts, done, time.perf_counter() - start, report)


# ---- the numbers ------------------------------------------------------------------------------------------------
def measure(b: Budget, cfg: ClaimsConfig, work: Path) -> dict:
    """Curve -> guidance -> {'clip', 'fid': bootstrap draws of the seed mean; 'accuracy', 'judged': both judges'
    mean accuracy over attributes, the seed mean}; the teacher's DDIM over steps as 'leading <n>' / 'trailing <n>'
    at G0. A student judged on another guidance grid than the budget's is refused."""
    clip = load_toy_clip(BUNDLED / "clip.safetensors")
    real = toy_judge(clip).image_features(Heldout(clip, cfg.n).images, normalize=False).cpu()
    d = bootstrap.draws(cfg.n, len(cfg.seeds), cfg.draws)
    judged = torch.load(work / "undistilled.judged.pt", weights_only=True)
    runs: dict[str, dict[str, list[dict]]] = {}  # curve -> guidance -> one judged result per seed
    for name, spec in UNDISTILLED.items():
        runs[name] = {key(w): [judged["/".join(map(str, spec)) + f"/{key(w)}"]] for w in b.judge.guidance}
    for grid in ("leading", "trailing"):
        for n in cfg.ddim_steps:
            runs[f"{grid} {n}"] = {key(G0): [judged[f"teacher/ddim/{grid}/{n}/{key(G0)}"]]}
    grid = [key(w) for w in b.judge.guidance]
    for name in STUDENTS:
        seeds = [torch.load(work / f"{name}{s}.judged.pt", weights_only=True) for s in cfg.seeds]
        for s, judged in zip(cfg.seeds, seeds):
            if sorted(judged, key=float) != sorted(grid, key=float):
                raise ValueError(f"{name}{s} was judged on another guidance grid ({', '.join(judged)}) than every "
                                 f"curve's ({', '.join(grid)}): judge it again (--redo '{name}{s} judged')")
        runs[name] = {w: [s[w] for s in seeds] for w in grid}
    fids = bootstrap.fid_draws_all({(curve, w): [r["features"] for r in rs] for curve, by_w in runs.items()
                                    for w, rs in by_w.items()}, real, d)
    return {curve: {w: {"clip": bootstrap.mean_draws([r["cos"] for r in rs], d), "fid": fids[curve, w],
                        "accuracy": float(np.mean([mean(r["accuracy"]) for r in rs])),
                        "judged": float(np.mean([mean(r["judged"]) for r in rs]))} for w, rs in by_w.items()}
            for curve, by_w in runs.items()}


def best(facts: dict, curve: str, metric: str) -> np.ndarray:
    """A curve's best CLIP score (highest) or FID (lowest) over guidance, inside each draw."""
    return bootstrap.best_over({w: f[metric] for w, f in facts[curve].items()}, metric == "clip")


def argbest(facts: dict, curve: str, metric: str) -> str:
    """The guidance of a curve's best estimate."""
    pick = max if metric == "clip" else min
    return pick(facts[curve], key=lambda w: facts[curve][w][metric][0])


# ---- the claims -------------------------------------------------------------------------------------------------
SAID = {  # what the paper says for each claim, quoted
    "4r": "Fig. 4 (right): the efficient UNet undistilled is 'competitive' at 16 steps, with 'a considerable "
          "performance drop when the denoising step is reduced to 8'",
    "drop": "Fig. 4 (right): vanilla distillation of the efficient UNet: 'observe improvements in scores'",
    "boost": "Fig. 4 (right): vanilla's CLIP 'capped at 0.30'; CFG-aware distillation 'consistently boosts the CLIP "
             "score'",
    "base": "Fig. 4: ours 'surpass[es] SD-v1.5 by 0.002 – 0.007 higher CLIP under similar FID'",
    "t2": "Table 2: FID 24.2 (ours) against 31.7 (8-step DPM-Solver), 25.6 (DPM-Solver++) and 26.9 (Meng et al.)",
    "6b": "Fig. 6b: the w-conditioned model 'struggles at achieving high CLIP scores ... while the original SD-v1.5 "
          "and our distilled 8-step SD-v1.5 can easily achieve so'",
    "6c": "Fig. 6c: 'the vanilla loss achieves the lowest FID, while the CFG loss achieves the highest CLIP score'",
    "mix": "Fig. 6c: mixing 'achieves the similar highest CLIP score as the CFG loss alone and the similar lowest FID "
           "as the vanilla loss alone'",
    "6d": "Fig. 6d: 'higher CFG probability and larger CFG range ... better CLIP score but worse FID'",
}


@dataclass(frozen=True)
class Claim:
    """``mine`` is better than ``theirs`` in ``metric``, each curve's best over guidance (CLIP: highest, FID:
    lowest); ``keeps``: the claim is only that mine is not worse than theirs by more than the margin."""

    text: str
    said: str
    mine: str
    theirs: str
    metric: str  # 'clip' or 'fid'
    keeps: bool = False


def claims() -> list[Claim]:
    """The paper's distillation claims at 8 steps, each as one paired comparison."""
    out = [Claim("the evolved UNet's 8-step DDIM falls short of its 16 steps (best CLIP)", "4r", "e16", "e8", "clip"),
           Claim("the evolved UNet's 8-step DDIM falls short of its 16 steps (lowest FID)", "4r", "e16", "e8", "fid"),
           Claim("vanilla distillation beats the evolved UNet's 8-step DDIM (best CLIP)", "drop", "e_vanilla", "e8",
                 "clip"),
           Claim("vanilla distillation beats the evolved UNet's 8-step DDIM (lowest FID)", "drop", "e_vanilla", "e8",
                 "fid"),
           Claim("CFG-aware distillation (ours, mixed) lifts the best CLIP above vanilla's", "boost", "mixed",
                 "e_vanilla", "clip"),
           Claim("ours keeps the 50-step baseline's best CLIP", "base", "mixed", "base", "clip", keeps=True),
           Claim("ours keeps the 50-step baseline's lowest FID", "base", "mixed", "base", "fid", keeps=True),
           *[Claim(f"ours reaches a lower FID than the {other}", "t2", "mixed", name, "fid")
             for name, other in (("dpm", "teacher's 8-step DPM-Solver-2"),
                                 ("dpmpp", "teacher's 8-step DPM-Solver++(2M)"),
                                 ("o_wcond", "w-conditioned student"))],
           Claim("the distilled 8-step teacher (mixed) reaches a higher best CLIP than the w-conditioned student",
                 "6b", "o_mixed", "o_wcond", "clip"),
           Claim("the 50-step baseline reaches a higher best CLIP than the w-conditioned student", "6b", "base",
                 "o_wcond", "clip"),
           Claim("CFG only reaches a higher best CLIP than vanilla", "6c", "o_cfg", "o_vanilla", "clip"),
           Claim("vanilla reaches a lower FID than CFG only", "6c", "o_vanilla", "o_cfg", "fid"),
           Claim("mixed keeps CFG only's best CLIP", "mix", "o_mixed", "o_cfg", "clip", keeps=True),
           Claim("mixed keeps vanilla's lowest FID", "mix", "o_mixed", "o_vanilla", "fid", keeps=True)]
    for lo, hi, a, b in (("o_vanilla", "o_mixed", 0, 0.1), ("o_mixed", "o_half", 0.1, 0.5),
                         ("o_half", "o_cfg", 0.5, 1)):
        out += [Claim(f"higher p ({a:g} -> {b:g}), higher best CLIP", "6d", hi, lo, "clip"),
                Claim(f"higher p ({a:g} -> {b:g}), higher lowest FID", "6d", lo, hi, "fid")]
    return out + [Claim("the larger w range (the paper's [2, 14]), higher best CLIP", "6d", "o_range", "o_mixed",
                        "clip"),
                  Claim("the larger w range (the paper's [2, 14]), higher lowest FID", "6d", "o_mixed", "o_range",
                        "fid")]


def check(c: Claim, facts: dict, cfg: ClaimsConfig) -> dict:
    """One claim read from its paired interval (``eval.bootstrap``): 'holds' when the interval of mine's gain lies
    above 0 (for ``keeps``: above minus the margin), 'the other way' when it lies below 0, else 'not resolved'."""
    a, b = best(facts, c.mine, c.metric), best(facts, c.theirs, c.metric)
    gains = bootstrap.gain(a, b, c.metric == "clip")
    if c.keeps:
        margin = cfg.clip_margin if c.metric == "clip" else cfg.fid_margin
        found = "holds" if bootstrap.keeps_quality(a, b, c.metric, margin) else "not shown"
    else:
        found = {"better": "holds", "worse": "the other way", "tie": "not resolved"}[bootstrap.verdict(gains)]
    return {"mine": float(a[0]), "theirs": float(b[0]), "gain": bootstrap.interval(gains), "verdict": found}


# ---- the page ---------------------------------------------------------------------------------------------------
def ci(values: np.ndarray, digits: int) -> str:
    est, lo, hi = bootstrap.interval(values)
    return f"{est:.{digits}f} ({lo:.{digits}f} to {hi:.{digits}f})"


def write_page(b: Budget, cfg: ClaimsConfig, facts: dict, done: dict, page_s: float, report: Path) -> list[str]:
    """report/distillation.md and its figures; returns the page's lines."""
    name, k, grid = labels(b), len(cfg.seeds), ", ".join(map(key, b.judge.guidance))
    lines = ["# CFG-aware step distillation at 8 steps: the paper's claims", "",
             f"Every student is distilled 16 → 8 steps by the recipe's 16-step teacher, {b.distill.steps} steps, "
             f"{k} training seeds each: the evolved UNet from its 16-step counterpart for Fig. 4 and Table 2 (ours is "
             "the recipe's student8 and its seeds), the teacher's own UNet from the 16-step teacher for Fig. 6b-d "
             "(the paper ablates the loss on SD-v1.5 itself); `snapfusion_min/experiments/distillation_claims.py` "
             "says what each is. Undistilled rows are one model each. Every point draws the same "
             f"{cfg.n} held-out prompts with the same noise, on one guidance grid for every curve (w = {grid}). "
             f"Intervals: 95% bootstrap over the prompts *and* the training seeds ({cfg.draws} draws of both, the "
             "same for every model: `eval/bootstrap.py`) of the mean over seeds; a curve's best over guidance is taken "
             "inside each draw. FID is on the toy CLIP's 64 image features (its draws repeat images, which raises "
             "FID: its intervals lie mostly above its estimate).", "",
             *steps_section(facts, cfg, report), *curves_section(facts, b, name, report),
             *extremes_section(facts, b, name), *table2_section(facts, name),
             *claims_section(facts, cfg, name),
             f"Cost: `python recipe.py --bundled --students` after the recipe: {sum(done.values()) / 60:.1f} min for "
             f"{len(done)} runs ({', '.join(f'{n} {t / 60:.1f}' for n, t in done.items())} min) and "
             f"{page_s / 60:.1f} min for this page, on this 2-core CPU (wall time); it is not part of the recipe."]
    atomic_write(report / "distillation.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return lines


def steps_section(facts: dict, cfg: ClaimsConfig, report: Path) -> list[str]:
    """Fig. 4 (right): the teacher's DDIM over steps at G0 on both grids."""
    g = key(G0)
    steps_plot({f"{grid} grid": [(n, facts[f"{grid} {n}"][g]["clip"][0], facts[f"{grid} {n}"][g]["fid"][0])
                                 for n in cfg.ddim_steps] for grid in ("leading", "trailing")},
               report / "fig4_ddim_steps.png", f"Fig. 4 (right): the teacher's DDIM over steps, guidance {g}")
    cell = lambda f: f"{ci(f['clip'], 4)} | {ci(f['fid'], 2)}"  # noqa: E731
    rows = [f"| {n} | " + " | ".join(cell(facts[f"{grid} {n}"][g]) for grid in ("leading", "trailing")) + " |"
            for n in cfg.ddim_steps]
    most, few = max(cfg.ddim_steps), 8 if 8 in cfg.ddim_steps else min(cfg.ddim_steps)
    drop = bootstrap.interval(facts[f"leading {most}"][g]["clip"] - facts[f"leading {few}"][g]["clip"])
    ratio = bootstrap.interval(facts[f"leading {few}"][g]["fid"] / facts[f"leading {most}"][g]["fid"])
    return ["## The regime: the undistilled teacher's DDIM over steps", "",
            f"At guidance {g} (G0: the teacher's best CLIP at 50 steps), on SD-v1.5's 'leading' grid (first t = "
            "(N - 1) * (1000 // N) + 1) and the students' 'trailing' grid (t = 999 first).", "",
            "| steps | CLIP, leading (95%) | FID, leading (95%) | CLIP, trailing (95%) | FID, trailing (95%) |",
            "|---|---|---|---|---|", *rows, "", "![DDIM over steps](fig4_ddim_steps.png)", "",
            f"{most} minus {few} steps on the leading grid: CLIP {drop[0]:+.4f} ({drop[1]:+.4f} to {drop[2]:+.4f}, "
            f"paired over prompts); FID {ratio[0]:.2f}× the {most}-step FID ({ratio[1]:.2f} to {ratio[2]:.2f}). "
            + (f"{few} steps fall short of {most} beyond the noise, as SD-v1.5's do (the paper's Fig. 4, right): there "
               "is something for distillation to recover." if drop[1] > 0 else
               f"{few} steps are not measurably worse than {most} by CLIP here: distillation has little to recover."),
            ""]


def curves_section(facts: dict, b: Budget, name: dict[str, str], report: Path) -> list[str]:
    """Every curve over the guidance grid (seed means; both judges), and Fig. 4, 6b, 6d as FID against CLIP."""
    def curve(c: str) -> list[tuple[float, float, float]]:
        return [(f["clip"][0], f["fid"][0], float(w)) for w, f in facts[c].items()]

    axes = ("CLIP score (toy CLIP; higher is better)", "FID on toy-CLIP features (lower is better)")
    for file, title, curves in (
            ("fig4_fid_clip.png", "Fig. 4 / Table 2: the evolved UNet at 8 steps against the 50-step baseline",
             ("base", "e16", "e8", "e_vanilla", "mixed", "dpm", "dpmpp")),
            ("fig6b_w_conditioned.png", "Fig. 6b: the w-conditioned student against the distilled teacher",
             ("base", "o_wcond", "o_mixed")),
            ("fig6d_few_step.png", "Fig. 6c-d: the loss of Eq. 11 (p, w range), the teacher's UNet 16 -> 8",
             ("base", "o_vanilla", "o_mixed", "o_half", "o_cfg", "o_range"))):
        fid_clip_plot({name[c]: curve(c) for c in curves}, report / file, title, *axes)
    rows = [f"| {name[c]} | {w} | {f['clip'][0]:.4f} | {f['fid'][0]:.2f} | {f['accuracy']:.0%} | {f['judged']:.0%} |"
            for c in CURVES for w, f in facts[c].items()]
    return ["## Table 2 / Fig. 4, Fig. 6b, Fig. 6c-d: every curve over guidance", "",
            "Seed means (the intervals are in the tables below); zero-shot (the toy CLIP) and pixel judge: the share "
            "of the attributes the captions name that each judge reads back from the images, over attributes.", "",
            "| model | guidance | CLIP | FID | zero-shot (CLIP) | pixel judge |", "|---|---|---|---|---|---|", *rows,
            "", "![Fig. 4](fig4_fid_clip.png)", "", "![Fig. 6b](fig6b_w_conditioned.png)", "",
            "![Fig. 6c-d](fig6d_few_step.png)", ""]


def extremes_section(facts: dict, b: Budget, name: dict[str, str]) -> list[str]:
    rows = [f"| {name[c]} | {ci(best(facts, c, 'clip'), 4)} at w = {argbest(facts, c, 'clip')} | "
            f"{ci(best(facts, c, 'fid'), 2)} at w = {argbest(facts, c, 'fid')} |" for c in CURVES]
    return ["Each curve's extremes over guidance (the paper reads its Figs. 4 and 6 this way; the w of the "
            "estimate):", "", "| model | best CLIP (95%) | lowest FID (95%) |", "|---|---|---|", *rows, ""]


def table2_section(facts: dict, name: dict[str, str]) -> list[str]:
    g = key(G0)
    rows = [f"| {name[c]} | {fid:.1f} | {clip:.2f} | {facts[c][g]['fid'][0]:.2f} | {facts[c][g]['clip'][0]:.4f} | "
            f"{8 if c == 'o_wcond' else 16} |" for c, (fid, clip) in PAPER_TABLE2.items()]
    return [f"The paper's Table 2 beside the toy world's at G0 = {g} (UNet passes per image: CFG's two per step, the "
            "w-conditioned student's one):", "",
            "| method | paper FID | paper CLIP | toy FID | toy CLIP | UNet passes |", "|---|---|---|---|---|---|",
            *rows, ""]


def claims_section(facts: dict, cfg: ClaimsConfig, name: dict[str, str]) -> list[str]:
    checked = [(c, check(c, facts, cfg)) for c in claims()]
    rows, short = [], SHORT
    for c, r in checked:
        digits = 4 if c.metric == "clip" else 2
        _, lo, hi = r["gain"]
        rows.append(f"| {c.text} | {SAID[c.said]} | {short[c.mine]} {r['mine']:.{digits}f}, {short[c.theirs]} "
                    f"{r['theirs']:.{digits}f}; gain {r['gain'][0]:+.{digits}f} ({lo:+.{digits}f} to "
                    f"{hi:+.{digits}f}) | {r['verdict']} |")
    held = sum(r["verdict"] == "holds" for _, r in checked)
    return ["## The paper's claims at 8 steps", "",
            "Each claim is one paired comparison: the gain of the first model named over the second (CLIP: higher "
            "is better, FID: lower; each curve's best over guidance), its 95% interval "
            "over prompts and seeds, and the verdict read from the interval alone: 'holds' when it lies above 0, "
            "'the other way' when it lies below 0, else 'not resolved'. A claim that one model *keeps* another's "
            f"quality holds only when the interval lies above minus a margin (CLIP {cfg.clip_margin:g}, FID "
            f"{cfg.fid_margin:.0%} of the other's): a tie alone shows nothing.", "",
            "| claim | the paper (SD-v1.5) | here: estimates; gain (95%) | verdict |", "|---|---|---|---|", *rows, "",
            f"{held} of {len(checked)} claims hold at 8 steps in the toy world ({len(cfg.seeds)} seeds a student).",
            ""]

