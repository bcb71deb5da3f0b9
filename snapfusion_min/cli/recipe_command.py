"""The whole SnapFusion recipe at toy scale, in one command, and a report with the paper's tables and figures.

    python recipe.py                    # every stage from scratch -> report/
    python recipe.py --bundled          # start from models/toy's CLIP, autoencoder and teacher
    python recipe.py --quick            # a smoke run of every stage (the tests) -> runs/recipe-quick/report/
    python recipe.py --bundled --arms   # Alg. 1 against its baselines, 3 seeds each -> report/evolving.md
    python recipe.py --bundled --students  # the distillation claims, students of 3 seeds -> report/distillation.md
    python recipe.py --smoke sd15       # every stage at SD-v1.5's size on random weights: time and memory per stage

How long each takes: the report lists every stage's wall and CPU time (report/README.md; the arms' cost is in
report/evolving.md, the students' in report/distillation.md); a busy machine takes longer. A --quick report says
its numbers are not results.

Stages (snapfusion_min/experiments/stages.py): toy CLIP -> autoencoder -> teacher -> robust training and its
plain control -> evolving (Alg. 1) -> 32->16 and 16->8 distillation -> pruned decoder (§3.2) -> final pipeline ->
Core ML -> report. --students: the evolved UNet's vanilla student (Fig. 4) and, on the teacher's own UNet, the loss
ablations of Fig. 6c-d and the w-conditioned student of Fig. 6b, 16->8 like ours, 3 seeds each, and the paper's
claims at 8 steps. Each stage is skipped once done (<work-dir>/recipe.json);
training stages resume.
"""

from __future__ import annotations

from pathlib import Path

from ..experiments.budget import QUICK, Budget
from ..experiments.recipe import run_recipe
from ..experiments.report import full_report
from ..experiments.stages import STAGES
from ..formats.figures import pyplot
from ..latency import LatencyTable
from ..training import OPTIMIZERS
from . import check_writable, flag, parser, run
from .sd15_smoke import SmokeConfig, run_smoke


def build_parser():  # noqa: ANN201
    p = parser(__doc__)
    p.add_argument("--work-dir", help="folder for every stage's checkpoint (default: runs/recipe; with --quick "
                   "runs/recipe-quick)")
    p.add_argument("--report-dir", help="folder of the report (default: report; with --quick <work-dir>/report: a "
                   "smoke run never writes over a full run's report)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: a smoke run in minutes")
    p.add_argument("--bundled", action="store_true", help="start from models/toy's CLIP, autoencoder and teacher")
    p.add_argument("--arms", action="store_true", help="instead of the report: Alg. 1 against its baselines at "
                   "its latency or size, trained as long (snapfusion_min/experiments/alg1_baselines.py), 3 seeds "
                   "each, -> <report-dir>/evolving.md (its cost is on that page); the run so far is kept in "
                   "<report-dir>/arms/ and goes on from there, on any machine")
    p.add_argument("--students", action="store_true", help="instead of the report: the students the paper's "
                   "distillation claims compare (snapfusion_min/experiments/distillation_claims.py), 3 seeds each, "
                   "and the claims at 8 steps -> <report-dir>/distillation.md (its cost is on that page)")
    p.add_argument("--latency-table", help="evolve with this measured lookup table (a run's <work-dir>/lut.json) as it "
                   "is, not timed again: two runs then evolve alike, bit for bit")
    p.add_argument("--redo", action="append", default=[], help="run this stage again (and, so, the report); "
                   f"stages: {', '.join(STAGES)}")
    g = p.add_argument_group("SD-v1.5 at full size (snapfusion_min/cli/sd15_smoke.py; docs/sd_scale.md)")
    g.add_argument("--smoke", choices=["sd15"], help="instead of the toy recipe: random SD-v1.5 weights in the "
                   "single-file format through every stage, a few steps each; prints wall time and peak memory")
    s = SmokeConfig()
    g.add_argument("--resolution", type=int, default=s.resolution, help="image side of the smoke run")
    flag(g, "--optimizer", s.optimizer, "of the smoke run's training stages", choices=OPTIMIZERS)
    flag(g, "--checkpointing", more="in the smoke run's UNet trainings")
    g.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default=s.teacher_dtype,
                   help="the frozen distillation teacher's (distill.py --teacher-dtype)")
    g.add_argument("--keep", action="store_true", help="keep the smoke run's files (GBs) in <work-dir>")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.smoke:
        check_writable(args.work_dir, folder=True)
        cfg = SmokeConfig(resolution=args.resolution, optimizer=args.optimizer, checkpointing=args.checkpointing,
                          teacher_dtype=args.teacher_dtype)
        run_smoke(cfg, Path(args.work_dir) / "smoke-sd15", keep=args.keep)
        return
    args.work_dir, args.report_dir = folders(args.work_dir, args.report_dir, args.quick)
    for folder in (args.work_dir, args.report_dir):
        check_writable(folder, folder=True)
    if args.quick and full_report(Path(args.report_dir)):
        raise ValueError(f"--report-dir {args.report_dir} holds the report of a full run; a --quick run's numbers "
                         "are not results and do not go over it (default: <work-dir>/report)")
    if args.arms and args.students:
        raise ValueError("--arms and --students: one page at a time")
    pyplot()  # before any work: the report's figures need matplotlib
    table = Path(args.latency_table) if args.latency_table else None
    if table is not None:
        try:
            LatencyTable.load(table)
        except (ValueError, TypeError) as e:
            raise ValueError(f"--latency-table {table}: not a latency table (lut.json) ({e})") from None
    verdict = run_recipe(QUICK if args.quick else Budget(), Path(args.work_dir), Path(args.report_dir), args.bundled,
                         tuple(args.redo), args.quick, args.arms, table, args.students)
    if args.arms or args.students:
        print(f"[recipe] {Path(args.report_dir) / ('evolving.md' if args.arms else 'distillation.md')} written")
        return
    print(f"[recipe] report written to {Path(args.report_dir) / 'README.md'}: speed-up {verdict['speedup']:.1f}x, "
          f"CLIP {verdict['clip_diff']:+.4f}, FID ratio {verdict['fid_ratio']:.2f}")


def folders(work_dir: str | None, report_dir: str | None, quick: bool) -> tuple[str, str]:
    """--work-dir and --report-dir, or their defaults: a --quick run keeps apart from a full run's checkpoints and
    report (runs/recipe-quick, its report inside it)."""
    work = work_dir or ("runs/recipe-quick" if quick else "runs/recipe")
    return work, report_dir or (str(Path(work) / "report") if quick else "report")


def entry() -> None:
    """``python recipe.py``, ``snapfusion-recipe``, ``python -m snapfusion_min recipe``; a mistake is one line."""
    run(main)
