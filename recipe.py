"""The whole SnapFusion recipe at toy scale, in one command, and a report with the paper's tables and figures.

    python recipe.py                    # every stage from scratch (~95 min on 2 CPU cores) -> report/
    python recipe.py --bundled          # start from models/toy's CLIP, autoencoder and teacher (59 min)
    python recipe.py --quick --work-dir /tmp/r --report-dir /tmp/r/report   # every stage in minutes (the tests)

Stages (snapfusion_min/recipe.py): toy CLIP -> autoencoder -> teacher -> robust training and its plain control ->
evolving (Alg. 1) -> 32->16 and 16->8 distillation with the Fig. 6c ablations -> pruned decoder (§3.2) -> final
pipeline -> Core ML -> report. Each stage is skipped once done (<work-dir>/recipe.json); training stages resume.
"""

from __future__ import annotations

from pathlib import Path

from snapfusion_min.cli import check_writable, parser, run
from snapfusion_min.recipe import QUICK, STAGES, Budget, run_recipe


def build_parser():  # noqa: ANN201
    p = parser(__doc__)
    p.add_argument("--work-dir", default="runs/recipe", help="folder for every stage's checkpoint")
    p.add_argument("--report-dir", default="report", help="folder of the report")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: a smoke run in minutes")
    p.add_argument("--bundled", action="store_true", help="start from models/toy's CLIP, autoencoder and teacher")
    p.add_argument("--redo", action="append", default=[], help="run this stage again (and, so, the report); "
                   f"stages: {', '.join(STAGES)}")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    for folder in (args.work_dir, args.report_dir):
        check_writable(folder, folder=True)
    verdict = run_recipe(QUICK if args.quick else Budget(), Path(args.work_dir), Path(args.report_dir), args.bundled,
                         tuple(args.redo), args.quick)
    print(f"[recipe] report written to {Path(args.report_dir) / 'README.md'}: speed-up {verdict['speedup']:.1f}x, "
          f"CLIP {verdict['clip_diff']:+.4f}, FID ratio {verdict['fid_ratio']:.2f}")


if __name__ == "__main__":
    run(main, "recipe.py")
