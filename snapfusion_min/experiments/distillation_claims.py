"""Does CFG-aware step distillation work here? The paper's distillation claims at its step count, 8, with every
student trained with several seeds and every verdict read from a bootstrap interval over prompts *and* seeds
(``python recipe.py --bundled --students`` after the recipe -> report/distillation.md).

The students, each distilled 16 -> 8 steps from the recipe's 16-step teacher into its 16-step evolved UNet (§4.1,
App. D) as the recipe's own student is, by Eq. 11 with:

    mixed    p = 0.1, w ~ U[the budget's range]: ours (seed 0 is the recipe's student8)
    vanilla  p = 0: Eq. 7-9 alone
    half     p = 0.5
    cfg      p = 1: the CFG-aware loss of Eq. 10 alone
    range    p = 0.1, w ~ U[2, 14]: the paper's range
    wcond    Meng et al.: w an input of the UNet, one pass per step (p = 1; Table 2, Fig. 6b)

Beside them the undistilled teacher (the 50-step baseline's UNet): DDIM, DPM-Solver-2 and DPM-Solver++(2M) at 8 steps
on the students' trailing grid, the 50-step baseline (SD's leading grid), and DDIM over steps at G0 (Fig. 4, right).
Every curve draws the same held-out prompts with the same noise over the same guidance grid
(``Budget.judge.guidance``); seed s of a student draws its batches, timesteps and w from s.
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

STUDENTS = {"mixed": (0.1, None, False), "vanilla": (0.0, None, False), "half": (0.5, None, False),
            "cfg": (1.0, None, False), "range": (0.1, (2.0, 14.0), False),
            "wcond": (1.0, None, True)}  # name -> (p of Eq. 11, w range of Eq. 10 or the budget's, w-conditioned)
TEACHER = {"ddim": ("ddim", "trailing", 8), "dpm": ("dpm", "trailing", 8), "dpmpp": ("dpm++", "trailing", 8),
           "base": ("ddim", "leading", 50)}  # the teacher's curves: (solver, grid, steps)
SHORT = {"ddim": "8-step DDIM", "dpm": "8-step DPM-Solver-2", "dpmpp": "8-step DPM-Solver++(2M)",
         "base": "50-step baseline", "leading 8": "8-step DDIM (leading grid)", "mixed": "ours", "vanilla": "vanilla",
         "half": "p = 0.5", "cfg": "CFG only", "range": "w ~ U[2, 14]", "wcond": "w-conditioned"}  # in the claims
PAPER_TABLE2 = {"dpm": (31.7, 0.32), "dpmpp": (25.6, 0.32), "wcond": (26.9, 0.30),
                "mixed": (24.2, 0.30)}  # the paper's Table 2 (SD-v1.5, MS-COCO 2017 5K, 8 steps): (FID, CLIP)


@dataclass(frozen=True)
class ClaimsConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    n: int = 300  # held-out prompts per point
    draws: int = 1000  # bootstrap resamples of the prompts and seeds
    clip_margin: float = 0.01  # "keeps" another's CLIP score: the interval of the difference lies above -this
    fid_margin: float = 0.1  # ... its FID: above -this x the other's FID
    ddim_steps: tuple[int, ...] = (2, 4, 8, 16, 50)  # the teacher's DDIM over steps at G0 (Fig. 4, right)


QUICK_CLAIMS = ClaimsConfig(seeds=(0,), n=8, draws=50, ddim_steps=(2, 8))  # a smoke run (the tests)


def labels(b: Budget) -> dict[str, str]:
    """Curve -> its label on the page: the teacher's sampler, or the student's loss (p, w range)."""
    out = {"ddim": "teacher, 8-step DDIM", "dpm": "teacher, 8-step DPM-Solver-2",
           "dpmpp": "teacher, 8-step DPM-Solver++(2M)", "base": "baseline: teacher, 50-step DDIM"}
    for name, (prob, w_range, w_cond) in STUDENTS.items():
        lo, hi = w_range or b.distill.cfg_range
        kind = "Meng et al., w-conditioned" if w_cond else {0.0: "vanilla", 1.0: "CFG only"}.get(prob, "mixed")
        out[name] = ("ours: " if name == "mixed" else "") + f"{kind} (p = {prob:g}" + (
            "" if prob == 0 else f", w ~ U[{lo:g}, {hi:g}]") + ")"
    return out


def key(w: float) -> str:
    return f"{w:g}"


# ---- the stages -------------------------------------------------------------------------------------------------
def student_path(p: dict[str, Path], work: Path, name: str, seed: int) -> Path:
    return p["student8"] if (name, seed) == ("mixed", 0) else work / f"{name}{seed}.safetensors"


def stages(b: Budget, cfg: ClaimsConfig, p: dict[str, Path], work: Path) -> list[tuple[str, Callable]]:
    """(name, run): every student and seed trained (ours of seed 0 is the recipe's), then every curve judged into
    ``<work>/<curve>.judged.pt`` (the teacher's: ``teacher.judged.pt``)."""
    d, clip = Dist(device=pick_device("auto")), load_toy_clip(BUNDLED / "clip.safetensors")
    heldout = Heldout(clip, cfg.n)

    def train(name: str, seed: int) -> Callable:
        prob, w_range, w_cond = STUDENTS[name]
        return lambda: distil_stage(b, p["teacher16"], p["evolved16"], student_path(p, work, name, seed), (16, 8), d,
                                    prob, w_range, w_cond, seed)

    def judged(name: str, seed: int) -> Callable:
        def run() -> None:
            pipe = read_pipeline(student_path(p, work, name, seed))
            out = {key(w): per_prompt(pipe, clip, cfg.n, 8, w, heldout, progress=True) for w in b.judge.guidance}
            atomic_write(work / f"{name}{seed}.judged.pt", lambda tmp: torch.save(out, tmp))
        return run

    def teacher() -> None:
        pipe, out = read_pipeline(p["teacher"]), {}
        for solver, grid, steps, w in teacher_points(b, cfg):
            sampled = pipe.with_parts(sampler=dataclasses.replace(pipe.sampler, solver=solver, spacing=grid))
            out[f"{solver}/{grid}/{steps}/{key(w)}"] = per_prompt(sampled, clip, cfg.n, steps, w, heldout,
                                                                  progress=True)
        atomic_write(work / "teacher.judged.pt", lambda tmp: torch.save(out, tmp))

    todo = [(f"{name}{seed}", train(name, seed)) for name in STUDENTS for seed in cfg.seeds
            if (name, seed) != ("mixed", 0)]
    return todo + [("teacher judged", teacher)] + [(f"{name}{seed} judged", judged(name, seed))
                                                    for name in STUDENTS for seed in cfg.seeds]


def teacher_points(b: Budget, cfg: ClaimsConfig) -> list[tuple[str, str, int, float]]:
    """(solver, grid, steps, guidance) of every teacher point: its curves over the grid, DDIM over steps at G0."""
    points = [(solver, grid, steps, w) for solver, grid, steps in TEACHER.values() for w in b.judge.guidance]
    points += [("ddim", grid, n, G0) for grid in ("leading", "trailing") for n in cfg.ddim_steps]
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
    at G0."""
    clip = load_toy_clip(BUNDLED / "clip.safetensors")
    real = toy_judge(clip).image_features(Heldout(clip, cfg.n).images, normalize=False).cpu()
    d = bootstrap.draws(cfg.n, len(cfg.seeds), cfg.draws)
    teacher = torch.load(work / "teacher.judged.pt", weights_only=True)
    runs: dict[str, dict[str, list[dict]]] = {}  # curve -> guidance -> one judged result per seed
    for name, (solver, grid, steps) in TEACHER.items():
        runs[name] = {key(w): [teacher[f"{solver}/{grid}/{steps}/{key(w)}"]] for w in b.judge.guidance}
    for grid in ("leading", "trailing"):
        for n in cfg.ddim_steps:
            runs[f"{grid} {n}"] = {key(G0): [teacher[f"ddim/{grid}/{n}/{key(G0)}"]]}
    grid = [key(w) for w in b.judge.guidance]
    for name in STUDENTS:
        seeds = [torch.load(work / f"{name}{s}.judged.pt", weights_only=True) for s in cfg.seeds]
        for s, judged in zip(cfg.seeds, seeds):
            if sorted(judged, key=float) != sorted(grid, key=float):
                raise ValueError(f"{name}{s} was judged on another guidance grid ({', '.join(judged)}) than every "
                                 f"curve's ({', '.join(grid)}): judge it again (--redo '{name}{s} judged')")
        runs[name] = {w: [s[w] for s in seeds] for w in grid}
    return {curve: {w: {"clip": bootstrap.mean_draws([r["cos"] for r in rs], d),
                        "fid": bootstrap.fid_draws([r["features"] for r in rs], real, d),
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
    "4r": "Fig. 4 (right): without distillation, 'a considerable performance drop' at 8 steps",
    "drop": "Fig. 4: vanilla distillation 'improves' on the undistilled 8-step UNet",
    "boost": "Fig. 4: vanilla's CLIP 'capped at 0.30'; CFG-aware distillation 'consistently boosts the CLIP score'",
    "base": "Fig. 4: 'surpass SD-v1.5 by 0.002 – 0.007 higher CLIP under similar FID'",
    "t2": "Table 2: FID 24.2 (ours) against 31.7 (8-step DPM-Solver), 25.6 (DPM-Solver++) and 26.9 (Meng et al.)",
    "6b": "Fig. 6b: the w-conditioned student 'cannot achieve a higher CLIP score' as guidance grows; ours can",
    "6c": "Fig. 6c: 'the vanilla loss achieves the lowest FID, while the CFG loss achieves the highest CLIP score'",
    "mix": "Fig. 6c: mixing 'achieves the similar highest CLIP score as the CFG loss alone and the similar lowest FID "
           "as the vanilla loss alone'",
    "6d": "Fig. 6d: 'higher CFG probability and larger CFG range ... better CLIP score but worse FID'",
}


@dataclass(frozen=True)
class Claim:
    """``mine`` is better than ``theirs`` in ``metric`` (each curve's best over guidance, or its value at ``at``);
    ``keeps``: the claim is only that mine is not worse than theirs by more than the margin."""

    text: str
    said: str
    mine: str
    theirs: str
    metric: str  # 'clip' or 'fid'
    keeps: bool = False
    at: str | None = None  # one guidance instead of the best over the grid


def claims() -> list[Claim]:
    """The paper's distillation claims at 8 steps, each as one paired comparison."""
    out = [Claim("the teacher's 8-step DDIM falls short of its 50 steps at G0 (CLIP)", "4r", "base", "leading 8",
                 "clip", at="G0"),
           Claim("the teacher's 8-step DDIM falls short of its 50 steps at G0 (FID)", "4r", "base", "leading 8",
                 "fid", at="G0"),
           Claim("vanilla distillation beats 8-step DDIM (best CLIP)", "drop", "vanilla", "ddim", "clip"),
           Claim("vanilla distillation beats 8-step DDIM (lowest FID)", "drop", "vanilla", "ddim", "fid"),
           Claim("CFG-aware distillation (ours, mixed) lifts the best CLIP above vanilla's", "boost", "mixed",
                 "vanilla", "clip"),
           Claim("ours keeps the 50-step baseline's best CLIP", "base", "mixed", "base", "clip", keeps=True),
           Claim("ours keeps the 50-step baseline's lowest FID", "base", "mixed", "base", "fid", keeps=True),
           *[Claim(f"ours reaches a lower FID than the {other}", "t2", "mixed", name, "fid")
             for name, other in (("dpm", "teacher's 8-step DPM-Solver-2"),
                                 ("dpmpp", "teacher's 8-step DPM-Solver++(2M)"),
                                 ("wcond", "w-conditioned student"))],
           Claim("ours reaches a higher best CLIP than the w-conditioned student", "6b", "mixed", "wcond", "clip"),
           Claim("CFG only reaches a higher best CLIP than vanilla", "6c", "cfg", "vanilla", "clip"),
           Claim("vanilla reaches a lower FID than CFG only", "6c", "vanilla", "cfg", "fid"),
           Claim("mixed keeps CFG only's best CLIP", "mix", "mixed", "cfg", "clip", keeps=True),
           Claim("mixed keeps vanilla's lowest FID", "mix", "mixed", "vanilla", "fid", keeps=True)]
    for lo, hi, a, b in (("vanilla", "mixed", 0, 0.1), ("mixed", "half", 0.1, 0.5), ("half", "cfg", 0.5, 1)):
        out += [Claim(f"higher p ({a:g} -> {b:g}), higher best CLIP", "6d", hi, lo, "clip"),
                Claim(f"higher p ({a:g} -> {b:g}), higher lowest FID", "6d", lo, hi, "fid")]
    return out + [Claim("the larger w range (the paper's [2, 14]), higher best CLIP", "6d", "range", "mixed", "clip"),
                  Claim("the larger w range (the paper's [2, 14]), higher lowest FID", "6d", "mixed", "range", "fid")]


def check(c: Claim, facts: dict, cfg: ClaimsConfig) -> dict:
    """One claim read from its paired interval (``eval.bootstrap``): 'holds' when the interval of mine's gain lies
    above 0 (for ``keeps``: above minus the margin), 'the other way' when it lies below 0, else 'not resolved'."""
    if c.at is None:
        a, b = best(facts, c.mine, c.metric), best(facts, c.theirs, c.metric)
    else:
        a, b = facts[c.mine][key(G0)][c.metric], facts[c.theirs][key(G0)][c.metric]
    gains = bootstrap.gain(a, b, c.metric == "clip")
    if c.keeps:
        margin = cfg.clip_margin if c.metric == "clip" else cfg.fid_margin * abs(b[0])
        found = "holds" if bootstrap.keeps(gains, margin) else "not shown"
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
             f"Every student distilled 16 → 8 steps from the recipe's 16-step teacher into its 16-step evolved UNet, "
             f"{b.distill.steps} steps, {k} training seeds each (`snapfusion_min/experiments/distillation_claims.py` "
             f"says what each is); the teacher's rows are the undistilled teacher (one model). Every point draws the "
             f"same {cfg.n} held-out prompts with the same noise, on one guidance grid for every curve (w = {grid}). "
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
    return ["## Fig. 4 (right): the undistilled teacher's DDIM over steps", "",
            f"At guidance {g} (G0: the teacher's best CLIP at 50 steps), on SD-v1.5's 'leading' grid (first t = "
            "(N - 1) * (1000 // N) + 1) and the students' 'trailing' grid (t = 999 first).", "",
            "| steps | CLIP, leading (95%) | FID, leading (95%) | CLIP, trailing (95%) | FID, trailing (95%) |",
            "|---|---|---|---|---|", *rows, "", "![DDIM over steps](fig4_ddim_steps.png)", ""]


def curves_section(facts: dict, b: Budget, name: dict[str, str], report: Path) -> list[str]:
    """Every curve over the guidance grid (seed means; both judges), and Fig. 4, 6b, 6d as FID against CLIP."""
    def curve(c: str) -> list[tuple[float, float, float]]:
        return [(f["clip"][0], f["fid"][0], float(w)) for w, f in facts[c].items()]

    axes = ("CLIP score (toy CLIP; higher is better)", "FID on toy-CLIP features (lower is better)")
    for file, title, curves in (
            ("fig4_fid_clip.png", "Fig. 4: 8 steps against the 50-step baseline",
             ("base", "ddim", "dpm", "dpmpp", "vanilla", "mixed")),
            ("fig6b_w_conditioned.png", "Fig. 6b: the w-conditioned student against ours", ("base", "wcond", "mixed")),
            ("fig6d_few_step.png", "Fig. 6c-d: the loss of Eq. 11 (p, w range)",
             ("base", "vanilla", "mixed", "half", "cfg", "range"))):
        fid_clip_plot({name[c]: curve(c) for c in curves}, report / file, title, *axes)
    rows = [f"| {name[c]} | {w} | {f['clip'][0]:.4f} | {f['fid'][0]:.2f} | {f['accuracy']:.0%} | {f['judged']:.0%} |"
            for c in [*TEACHER, *STUDENTS] for w, f in facts[c].items()]
    return ["## Table 2 / Fig. 4, Fig. 6b, Fig. 6c-d: every curve over guidance", "",
            "Seed means (the intervals are in the tables below); zero-shot (the toy CLIP) and pixel judge: the share "
            "of the attributes the captions name that each judge reads back from the images, over attributes.", "",
            "| model | guidance | CLIP | FID | zero-shot (CLIP) | pixel judge |", "|---|---|---|---|---|---|", *rows,
            "", "![Fig. 4](fig4_fid_clip.png)", "", "![Fig. 6b](fig6b_w_conditioned.png)", "",
            "![Fig. 6c-d](fig6d_few_step.png)", ""]


def extremes_section(facts: dict, b: Budget, name: dict[str, str]) -> list[str]:
    rows = [f"| {name[c]} | {ci(best(facts, c, 'clip'), 4)} at w = {argbest(facts, c, 'clip')} | "
            f"{ci(best(facts, c, 'fid'), 2)} at w = {argbest(facts, c, 'fid')} |" for c in [*TEACHER, *STUDENTS]]
    return ["Each curve's extremes over guidance (the paper reads its Figs. 4 and 6 this way; the w of the "
            "estimate):", "", "| model | best CLIP (95%) | lowest FID (95%) |", "|---|---|---|", *rows, ""]


def table2_section(facts: dict, name: dict[str, str]) -> list[str]:
    g = key(G0)
    rows = [f"| {name[c]} | {fid:.1f} | {clip:.2f} | {facts[c][g]['fid'][0]:.2f} | {facts[c][g]['clip'][0]:.4f} | "
            f"{8 if c == 'wcond' else 16} |" for c, (fid, clip) in PAPER_TABLE2.items()]
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
            "is better, FID: lower; each curve's best over guidance unless the claim names one), its 95% interval "
            "over prompts and seeds, and the verdict read from the interval alone: 'holds' when it lies above 0, "
            "'the other way' when it lies below 0, else 'not resolved'. A claim that one model *keeps* another's "
            f"quality holds only when the interval lies above minus a margin (CLIP {cfg.clip_margin:g}, FID "
            f"{cfg.fid_margin:.0%} of the other's): a tie alone shows nothing.", "",
            "| claim | the paper (SD-v1.5) | here: estimates; gain (95%) | verdict |", "|---|---|---|---|", *rows, "",
            f"{held} of {len(checked)} claims hold at 8 steps in the toy world ({len(cfg.seeds)} seeds a student).",
            ""]

