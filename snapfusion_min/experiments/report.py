"""The recipe's report (report/README.md): the paper's Table 1 and Figs. 2, 5, 6, 8 at toy scale, judged by the
bundled toy CLIP on held-out prompts, and the goal the recipe is held to. The distillation claims (Table 2, Fig. 4,
Fig. 6b-d at 8 steps, students of several seeds) are ``distillation_claims`` (report/distillation.md).
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path

import torch
from open_clip.model import CustomTextCLIP
from torchvision.transforms.functional import to_pil_image

from ..cost import count_params, table1_times, threads
from ..formats.checkpoint import atomic_write
from ..formats.figures import caption_grid
from ..latency import LatencyTable, fig2
from ..pipeline import Pipeline, read_pipeline
from ..toy import BUNDLED
from ..toy.clip import load_toy_clip
from ..toy.tables import decoder_table, judge_on_heldout, remove_blocks, sweep
from ..world import World
from .budget import G0, Budget

ABLATE = ["none", "down2.A0", "up2.A2", "up3.R1", "up1.A0,up1.A1,up1.A2"]  # Fig. 5: blocks removed at inference
FIG5_PROMPTS = ["a large red circle at the top left on a dark background",
                "a small blue striped square in the center on a light background"]
BASE_STEPS = 50  # the baseline's steps
BASE, OURS = f"baseline {BASE_STEPS}-step", "ours, 8 steps"


def latency_table(base: Pipeline, ours: Pipeline, b: Budget, base_steps: int, our_steps: int) -> tuple[list[str],
                                                                                                     dict]:
    """Table 1: params, latency per call and in total of text encoder, UNet, decoder; baseline vs ours.

    Every part of both pipelines and both end-to-end runs are timed in the same interleaved rounds, so a slow spell
    of the machine moves baseline and ours alike and the speed-up holds. On one thread, as the evolving stage's
    lookup table: at these sizes a second thread does not speed the baseline's UNet up and slows the evolved one down.
    """
    parts = {name: {"text encoder": (pipe.text_encoder, 1), "UNet": (pipe.unet, steps),
                    "decoder": (pipe.vae.decoder, 1)}
             for name, pipe, steps in (("baseline", base, base_steps), ("ours", ours, our_steps))}
    with threads(1):
        seconds = table1_times({"baseline": (base, base_steps), "ours": (ours, our_steps)}, 64, G0, b.judge.repeat)
    ms = {key: 1e3 * s for key, s in seconds.items()}
    rows, totals = [], {}
    for name, calls in parts.items():
        for part, (module, n) in calls.items():
            rows.append(f"| {name} | {part} | {count_params(module) / 1e6:.3f}M | {ms[name, part]:.2f} | {n} | "
                        f"{ms[name, part] * n:.1f} |")
        rows.append(f"| {name} | **end to end** (measured, one image) | | | | **{ms[name, 'e2e']:.1f}** |")
        totals[name] = {"sum_ms": sum(ms[name, part] * n for part, (_, n) in calls.items()),
                        "e2e_ms": ms[name, "e2e"], "decoder_ms": ms[name, "decoder"]}
    return rows, totals


def judge_all(configs: list[tuple], clip: CustomTextCLIP, n: int, curve: Path | None,
              title: str) -> tuple[list[str], dict]:
    """``evaluation.sweep`` on held-out prompts: the markdown table, the curve PNG (if any), results by (label, steps,
    guidance)."""
    lines, results = sweep(configs, judge_on_heldout(clip, n), curve, title)
    figure = ["", f"![{title}]({curve.name})"] if curve else []
    return lines + figure, {(c[0], c[2], c[3]): r for c, r in zip(configs, results)}


def ablation_grid(plain: Pipeline, robust: Pipeline, path: Path) -> None:
    """Fig. 5: the same prompts and seeds with blocks removed at inference, plain vs robust-trained."""
    prompts, images, captions = FIG5_PROMPTS, [], []
    for name, pipe in (("plain", plain), ("robust", robust)):
        for removed in ABLATE:
            remove_blocks(pipe, [] if removed == "none" else removed.split(","))
            x = pipe(prompts, steps=20, guidance=G0, seed=7, height=64, width=64, output_type="pt")
            images += [to_pil_image(v) for v in x]
            captions += [f"{name}, removed {removed.replace('up1.A0,up1.A1,up1.A2', 'up1.A*')}"] * len(prompts)
        pipe.unet.removed = set()
    order = [i for k in range(len(prompts)) for i in range(k, len(images), len(prompts))]  # one prompt per row
    grid = caption_grid([images[i] for i in order], [captions[i] for i in order], cols=len(ABLATE), scale=2)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


def goals(f6: dict, totals: dict, g0: float, mixed: str) -> tuple[list[str], dict]:
    """The recipe's goal: >= 10x faster end to end than the baseline, CLIP within 0.01, FID <= 1.5x the baseline's.

    Judged at the baseline's default guidance and at each model's best-CLIP guidance; for the final pipeline and for
    the same UNet with the original decoder (Fig. 6c's row ``mixed``), to show what the pruned decoder costs.
    """
    ours = {"ours (pruned decoder)": {g: r for (label, _, g), r in f6.items() if label == OURS},
            "ours with the original decoder": {g: r for (label, _, g), r in f6.items() if label == mixed}}
    baseline = {g: r for (label, _, g), r in f6.items() if label == BASE}
    b_best = max(baseline, key=lambda g: baseline[g]["clip_score"])
    base_ms, ours_ms = totals["baseline"]["e2e_ms"], totals["ours"]["e2e_ms"]
    # with the original decoder: our measured end to end, the pruned decoder's latency swapped for the original's
    speedups = {"ours (pruned decoder)": base_ms / ours_ms, "ours with the original decoder":
                base_ms / (ours_ms - totals["ours"]["decoder_ms"] + totals["baseline"]["decoder_ms"])}
    lines = ["## The goal: ≥ 10× faster, CLIP score within 0.01, FID ≤ 1.5× the 50-step baseline's", "",
             "| model | guidance (ours / baseline) | speed-up | CLIP difference | FID ratio | all met |",
             "|---|---|---|---|---|---|"]
    verdict = {}
    for name, rows in ours.items():
        best = max(rows, key=lambda g: rows[g]["clip_score"])
        for g, gb in dict.fromkeys([(g0, g0), (best, b_best)]):  # one row when the best is the default
            if g not in rows or gb not in baseline:
                continue
            d_clip, ratio = rows[g]["clip_score"] - baseline[gb]["clip_score"], rows[g]["fid"] / baseline[gb]["fid"]
            met = speedups[name] >= 10 and d_clip >= -0.01 and ratio <= 1.5
            lines.append(f"| {name} | {g:g} / {gb:g} | {speedups[name]:.1f}× | {d_clip:+.4f} | {ratio:.2f} | "
                         f"{'yes' if met else 'no'} |")
            if name.startswith("ours (pruned") and g == g0:
                verdict = {"speedup": speedups[name], "clip_diff": d_clip, "fid_ratio": ratio}
    return lines + [""], verdict


SMOKE = "**Smoke run (`--quick`): numbers are not results.** Every stage ran a few steps to show the recipe works " \
        "end to end; `python recipe.py` makes the report."


def full_report(folder: Path) -> bool:
    """Does ``folder`` hold the report of a full run (a README.md without the --quick run's note)?"""
    readme = folder / "README.md"
    return readme.is_file() and SMOKE not in readme.read_text(errors="replace")


def write_report(b: Budget, p: dict[str, Path], report: Path, timings: dict, quick: bool,
                 cpu: dict | None = None) -> dict:
    """Every section in order; writes <report>/README.md and results.json (the goal's verdict), returns the verdict.

    ``timings`` / ``cpu``: wall / CPU seconds of each stage."""
    clip = load_toy_clip(BUNDLED / "clip.safetensors")  # one judge for every table, as in the README
    teacher, final = read_pipeline(p["teacher"]), read_pipeline(p["final"])
    flags = (" --quick" if quick else "") + (" --bundled" if p["teacher"] == BUNDLED / "model.safetensors" else "")
    if quick:
        print("[recipe] " + SMOKE.replace("**", ""))
    lines = ["# SnapFusion at toy scale: the report", "", *([SMOKE, ""] if quick else []),
             f"Made by `python recipe.py{flags}` on {platform.machine()}, "
             f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}. The judge is the bundled toy CLIP "
             "(scores in its own scale: real images score about 0.97, unrelated captions about 0.5). "
             f"{b.judge.prompts} held-out prompts per point. Budget: `{b}`.", ""]
    table1, totals = table1_section(teacher, final, b)
    fig6, f6, mixed = fig6_section(p, teacher, final, b, clip, report)
    goal_lines, verdict = goals(f6, totals, G0, mixed)
    lines += [*table1, *fig5_section(p, b, report), *evolve_section(p, b), *fig6, *goal_lines,
              *fig8_section(p, b, clip), *samples_section(final, report), *times_section(timings, cpu or {})]
    atomic_write(report / "README.md", lambda tmp: Path(tmp).write_text("\n".join(lines)))
    atomic_write(report / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(verdict, indent=1)))
    return verdict


def table1_section(teacher: Pipeline, final: Pipeline, b: Budget) -> tuple[list[str], dict]:
    print("report: Table 1 (latency)")
    rows, totals = latency_table(teacher, final, b, BASE_STEPS, 8)
    speedup = totals["baseline"]["e2e_ms"] / totals["ours"]["e2e_ms"]
    return ["## Table 1: latency, baseline (the teacher's UNet, 50 steps, original decoder) vs ours (evolved, 8 "
            "steps, pruned decoder)", "",
            "| model | part | params | latency per call (ms) | calls | total (ms) |", "|---|---|---|---|---|---|",
            *rows, "",
            f"End-to-end speed-up, measured: **{speedup:.1f}×** (sum of parts: "
            f"{totals['baseline']['sum_ms'] / totals['ours']['sum_ms']:.1f}×). The paper (iPhone 14 Pro): "
            "8 + 85,000 + 369 ms → 8 + 1,840 + 116 ms, 43×; UNet 860M → 848M params, 1,700 → 230 ms per step; "
            "decoder 50M → 13M, 369 → 116 ms. The text encoder reads the prompt and the empty prompt in one call, "
            "and each UNet call is one batch of two (CFG: conditional and unconditional). Timed on one thread, "
            "like the evolving stage's lookup table: at these sizes a second thread leaves the baseline's UNet as "
            "fast as it was and slows the evolved one down (threading overhead).", ""], totals


def fig5_section(p: dict[str, Path], b: Budget, report: Path) -> list[str]:
    print("report: Fig. 5, Fig. 2")
    robust = read_pipeline(p["robust"])
    ablation_grid(read_pipeline(p["plain"]), robust, report / "fig5_blocks_removed.png")
    fig2(robust.unet, LatencyTable.load(p["lut"]), robust.text_encoder.cfg.context_length, report / "fig2_latency.png")
    return ["## Fig. 5: blocks removed at inference, plain vs robust-trained (Eq. 5)", "",
            f"The teacher trained {b.robust} more steps with every block kept (plain) or kept with p = 0.8 "
            "(robust); columns: blocks run as the identity; rows: " + ", then ".join(f'"{q}" (plain, robust)'
                                                                            for q in FIG5_PROMPTS) + ".", "",
            "![Fig. 5](fig5_blocks_removed.png)", "",
            "## Fig. 2: latency and parameters per block (the lookup table of the evolving stage)", "",
            "![Fig. 2](fig2_latency.png)", ""]


def evolve_section(p: dict[str, Path], b: Budget) -> list[str]:
    log = json.loads(Path(f"{p['evolved']}.log.json").read_text())
    lines = [f"Evolving (Alg. 1) to {b.evolve.target:.0%} of the start's predicted latency, then fine-tuned:", "",
             "| model | latency / step, measured (predicted) | params | CLIP | FID | zero-shot (CLIP) | pixel judge |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['measured_ms']:.2f} ms ({r['predicted_ms']:.2f}) | {r['params'] / 1e6:.2f}M | "
              f"{r['clip']:.4f} | {r['fid']:.2f} | {r['zero_shot']:.0%} | {r['judged']:.0%} |" for r in log["rows"]]
    return lines + ["", "Actions: " + ", ".join(f"`{a['action']}`" for a in log["actions"]), "",
                    "Each row's latency was measured as the stage made it (one thread; a machine busy with other work "
                    "at that moment inflates it); Table 1 times the final UNets side by side.", ""]


def fig6_section(p: dict[str, Path], teacher: Pipeline, final: Pipeline, b: Budget, clip: CustomTextCLIP,
                 report: Path) -> tuple[list[str], dict, str]:
    """The 8-step student (the mixed loss) against the evolved UNet it came from, undistilled, at 8 steps; the final
    pipeline (its pruned decoder) and the 50-step baseline beside, over the guidance grid. The loss ablations and the
    paper's claims are ``distillation_claims``' page."""
    print("report: Fig. 6 (8 steps)")
    lo, hi = b.distill.cfg_range
    mixed = f"mixed (p = 0.1, w ~ U[{lo:g}, {hi:g}])"
    evolved = read_pipeline(p["evolved"])
    evolved.sampler = dataclasses.replace(evolved.sampler, spacing="trailing")
    table, f6 = judge_all([(BASE, teacher, BASE_STEPS, g) for g in b.judge.guidance]
                          + [("evolved, undistilled", evolved, 8, g) for g in b.judge.guidance]
                          + [(mixed, read_pipeline(p["student8"]), 8, g) for g in b.judge.guidance]
                          + [(OURS, final, 8, g) for g in b.judge.guidance],
                          clip, b.judge.prompts, report / "fig6_distillation.png",
                          "Fig. 6: the 8-step student, FID vs CLIP")
    return ["## Fig. 6: 16 → 8 steps (teacher: the 16-step distilled baseline; student initialised from the "
            "16-step evolved UNet, App. D)", "", *table, "",
            f"The evolved UNet undistilled samples on the students' trailing grid (t = 999 first); 'ours, 8 steps' is "
            f"the final pipeline (this student with the pruned decoder). Eq. 10's guidance range: the paper draws w "
            f"from [2, 14] around SD-v1.5's working scale (7.5); the toy world's is {G0:g} (its teacher's best CLIP "
            f"at 50 steps), so the distillations here draw it from [{lo:g}, {hi:g}]. Table 2, Fig. 4 and Fig. 6b-d "
            "with the loss ablations, several training seeds and the paper's claims checked: "
            "[distillation.md](distillation.md) (`python recipe.py --bundled --students`).", ""], f6, mixed


def fig8_section(p: dict[str, Path], b: Budget, clip: CustomTextCLIP) -> list[str]:
    print("report: Fig. 8")
    dec = decoder_table(read_pipeline(p["student8"]), clip, [str(p["pruned0"]), str(p["pruned"])], b.judge.prompts,
                        steps=8, guidance=G0)
    lines = ["## Fig. 8: original vs 50%-pruned decoder (same 8-step latents)", "",
             "| decoder | params | PSNR to original (dB) | CLIP | FID | zero-shot (CLIP) | pixel judge |",
             "|---|---|---|---|---|---|---|"]
    for name, label in (("original", "original"), (str(p["pruned0"]), "pruned, not distilled"),
                        (str(p["pruned"]), f"pruned + data distillation ({b.decoder.steps} steps)")):
        r = dec[name]
        psnr = "-" if name == "original" else f"{r['psnr']:.2f}"
        lines.append(f"| {label} | {r['params'] / 1e6:.3f}M | {psnr} | "
                     f"{r['clip']:.4f} | {r['fid']:.2f} | {r['zero_shot']:.0%} | {r['judged']:.0%} |")
    return lines


def samples_section(final: Pipeline, report: Path) -> list[str]:
    prompts = [World("heldout", length=16, seed=1234).sample(i)[1].caption for i in range(16)]
    x = final(prompts, steps=8, guidance=G0, seed=1234, height=64, width=64, spacing="trailing", output_type="pt")
    grid = caption_grid([to_pil_image(v) for v in x], prompts, cols=8)
    atomic_write(report / "samples.png", lambda tmp: grid.save(tmp, format="PNG"))
    return ["", "## Final samples (8 steps, pruned decoder, held-out prompts)", "", "![samples](samples.png)", ""]


def times_section(timings: dict, cpu: dict) -> list[str]:
    """Wall and CPU time (all threads; '-' where a run older than the CPU record made the stage) of every stage."""
    minutes = lambda v: "-" if v is None else f"{v / 60:.1f} min"  # noqa: E731
    total_cpu = sum(cpu.values()) if set(cpu) >= set(timings) else None
    return [f"## Stage times ({torch.get_num_threads()} CPU threads; the report itself is not included)", "",
            "| stage | wall | CPU |", "|---|---|---|",
            *[f"| {k} | {minutes(v)} | {minutes(cpu.get(k))} |" for k, v in timings.items()],
            f"| **total** | **{minutes(sum(timings.values()))}** | **{minutes(total_cpu)}** |", "",
            *(["CPU time '-': the stage was run before the recipe recorded CPU time (`--redo <stage>` records it).",
               ""] if total_cpu is None else [])]
