"""The whole SnapFusion recipe at toy scale: every stage in order (``stages.py``: toy CLIP -> ... -> Core ML), then
the report (``report.py`` -> report/README.md), or after it Alg. 1 against its baselines (``alg1_baselines.py`` ->
report/evolving.md) or the paper's distillation claims (``distillation_claims.py`` -> report/distillation.md).
``python recipe.py`` runs it (``cli/recipe_command.py``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .alg1_baselines import QUICK_ARMS, ArmsConfig, arms_table, needs_evolved, run_arms
from .budget import Budget
from .distillation_claims import QUICK_CLAIMS, ClaimsConfig, run_claims
from .report import write_report
from .stages import paths, run_stages, stages


def run_recipe(b: Budget, work: Path, report: Path, bundled: bool = False, redo: tuple[str, ...] = (),
               quick: bool = False, arms: bool = False, latency_table: Path | None = None,
               students: bool = False) -> dict:
    """Every stage not yet done, then the report; returns the report's verdict (speed-up, CLIP, FID ratio).
    With ``arms``: the stages up to evolving (up to robust training once the evolved UNet is judged), then Alg. 1
    against its baselines (``alg1_baselines``: report/evolving.md, whose lines are returned as 'page'; the run so far
    is kept in report/arms/, and goes on from there); with ``students``: the stages up to the 8-step student,
    then the claims page (``distillation_claims``: report/distillation.md, its lines as 'page').
    ``latency_table``: evolve with this measured lookup table as it is (two runs then agree bit for bit) instead of
    timing one."""
    if arms:
        latency_table = arms_table(report, latency_table)
    work.mkdir(parents=True, exist_ok=True)
    report.mkdir(parents=True, exist_ok=True)
    p = paths(work, bundled)
    todo = stages(b, p, work, bundled, latency_table)
    if arms or students:
        last = ("evolved" if needs_evolved(report) else "robust") if arms else "student8"
        todo = todo[:[name for name, _ in todo].index(last) + 1]
        run_stages(todo, work / "recipe.json", dataclasses.asdict(b), redo)
        if arms:
            return {"page": run_arms(b, QUICK_ARMS if quick else ArmsConfig(), p, work / "arms", report)}
        return {"page": run_claims(b, QUICK_CLAIMS if quick else ClaimsConfig(), p, work / "students", report)}
    record = run_stages(todo, work / "recipe.json", dataclasses.asdict(b), redo)
    return write_report(b, p, report, dict(record["done"]), quick, record.get("cpu", {}))
