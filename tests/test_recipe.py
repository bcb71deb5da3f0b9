"""recipe.py --quick: every stage of the recipe runs, writes its output, and the report has every table and figure."""

import json
import shutil

import pytest
import torch
from helpers import run_main, run_script

from snapfusion_min import read_pipeline
from snapfusion_min.arch import ArchSpec
from snapfusion_min.experiments.budget import G0

pytestmark = pytest.mark.slow  # see conftest.py


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("recipe")
    run = run_script("recipe.py", "--quick", "--work-dir", str(work), "--report-dir", str(work / "report"))
    assert run.returncode == 0, run.stderr[-3000:]
    yield work, run.stdout
    shutil.rmtree(work)  # about 1 GB of checkpoints


def test_every_stage_produced_its_output(quick_run):
    work, out = quick_run
    done = json.loads((work / "recipe.json").read_text())["done"]
    assert list(done) == ["clip", "autoencoder", "teacher", "robust", "plain", "evolved", "teacher16", "evolved16",
                          "student8", "pruned0", "pruned", "final", "coreml"]
    for name in [n for n in done if n != "coreml"]:
        assert (work / f"{name}.safetensors").is_file(), name
    assert {p.name for p in (work / "coreml").glob("*.mlpackage")} >= {"unet.mlpackage", "decoder.mlpackage"}
    final, teacher = read_pipeline(work / "final.safetensors"), read_pipeline(work / "teacher.safetensors")
    # the final model: evolved (fewer blocks), distilled to 8 trailing steps, with the 50%-pruned decoder
    assert len(final.unet.spec.addresses()) < len(teacher.unet.spec.addresses())
    assert final.sampler.steps == 8 and final.sampler.spacing == "trailing" and final.sampler.distilled
    assert [2 * c for c in final.vae.cfg.decoder_channels] == list(teacher.vae.cfg.decoder_channels)
    assert final.sampler.guidance == G0


def test_report_has_every_table_and_figure(quick_run):
    work, _ = quick_run
    report = work / "report"
    text = (report / "README.md").read_text()
    for heading in ["## Table 1", "## Fig. 5", "## Fig. 2", "## Fig. 6: 16 → 8", "## Fig. 8", "## The goal",
                    "## Final samples", "## Stage times"]:
        assert heading in text, heading
    for png in ["fig2_latency.png", "fig5_blocks_removed.png", "fig6_distillation.png", "samples.png"]:
        assert (report / png).stat().st_size > 1000, png
        assert f"]({png})" in text, png
    for svg in ["fig2_latency.svg", "fig6_distillation.svg"]:
        assert (report / svg).stat().st_size > 1000, svg
    assert text.startswith("# SnapFusion at toy scale: the report\n\n**Smoke run (`--quick`): numbers are not results.")
    assert "| stage | wall | CPU |" in text and "| **total** | **" in text
    verdict = json.loads((report / "results.json").read_text())
    assert verdict["speedup"] > 1  # 8 evolved steps vs 50 steps of the baseline: faster even untrained
    assert "paper" in text and "End-to-end speed-up, measured" in text
    for label in ["baseline 50-step", "evolved, undistilled", "mixed (p = 0.1, w ~ U[2, 8])", "ours, 8 steps"]:
        assert f"| {label} | " in text, label  # a row of Fig. 6's table
    assert "[distillation.md](distillation.md)" in text


def test_a_run_with_another_budget_is_refused(quick_run):
    work, _ = quick_run
    said = run_main("recipe.py", "--work-dir", str(work), "--report-dir", str(work / "report2"))
    assert said.startswith("recipe.py: error: ") and "another budget" in said and "\n" not in said, said
    said = run_main("recipe.py", "--quick", "--work-dir", str(work), "--report-dir", str(work / "report2"), "--redo",
                    "nosuchstage")
    assert said.startswith("recipe.py: error: ") and "no such stage" in said, said


def test_students_run_each_loss(quick_run):
    """recipe.py --quick --students after the run: every student of the claims page, one seed (ours of seed 0 is the
    recipe's), judged over one grid, and report/distillation.md with every claim (the statistics and the seeds:
    test_distillation_claims.py)."""
    from snapfusion_min.experiments import distillation_claims as dc

    work, _ = quick_run
    assert run_main("recipe.py", "--quick", "--students", "--work-dir", str(work), "--report-dir",
                    str(work / "report")) == 0
    students = work / "students"
    done = list(json.loads((students / "students.json").read_text())["done"])
    assert done == [*[f"{name}0" for name in dc.TRAIN_ORDER if name != "mixed"], "undistilled judged",
                    *[f"{name}0 judged" for name in dc.STUDENTS]]
    mine, ours = read_pipeline(students / "e_vanilla0.safetensors"), read_pipeline(work / "student8.safetensors")
    assert mine.unet.spec == ours.unet.spec and mine.training["train"]["train_steps"] == 6  # as long as ours
    assert (mine.training["loss"]["cfg_prob"], ours.training["loss"]["cfg_prob"]) == (0.0, 0.1)  # its own loss
    teacher = read_pipeline(work / "teacher.safetensors").unet.spec  # Fig. 6's students: the teacher's own UNet
    assert read_pipeline(students / "o_mixed0.safetensors").unet.spec == teacher
    assert read_pipeline(students / "o_wcond0.safetensors").unet.spec.guidance_embed > 0
    text = (work / "report" / "distillation.md").read_text()
    for c in dc.claims():
        assert f"| {c.text} |" in text, c.text
    assert (work / "report" / "fig6d_few_step.png").is_file()


def test_arms_run_each_baseline_at_the_same_budget(quick_run):
    """recipe.py --quick --arms after the run: Alg. 1 and its four baselines from the same robust UNet, one seed each,
    and report/evolving.md with every arm (the statistics themselves: test_evolve_arms.py)."""
    from snapfusion_min.experiments.alg1_baselines import ARMS

    work, _ = quick_run
    assert run_main("recipe.py", "--quick", "--arms", "--work-dir", str(work), "--report-dir", str(work / "report")) \
        == 0
    arms, raw = work / "arms", work / "report" / "arms"
    assert list(json.loads((raw / "arms.json").read_text())["done"]) == ["teacher", *[f"{a}0" for a in ARMS]]
    robust, evolved = read_pipeline(work / "robust.safetensors"), read_pipeline(work / "evolved.safetensors")
    models = {a: read_pipeline(arms / f"{a}0.safetensors") for a in ARMS if a != "alg1"}
    for name in ("random", "slim", "scratch"):  # one training of Alg. 1's whole budget: 1 x 4 robust + 4 steps
        assert models[name].training["train"]["train_steps"] == 8, name
    assert models["scratch"].unet.spec == evolved.unet.spec
    assert not torch.allclose(*(next(iter(m.unet.state_dict().values())) for m in (models["scratch"], evolved)))
    slim, full = models["slim"].unet.spec.channels, robust.unet.spec.channels  # narrower; by how much is chosen by
    assert all(s <= r for s, r in zip(slim, full)) and any(s < r for s, r in zip(slim, full))  # measured latency
    assert models["slim"].unet.spec.stages == robust.unet.spec.stages
    log = json.loads((arms / "random0.safetensors.log.json").read_text())  # its table of the time: each arm's run
    start, removed = log["rows"][0], log["rows"][1]  # times the skeleton again, so lut.json's predictions move on
    assert removed["predicted_ms"] <= log["config"]["target"] * start["predicted_ms"] and log["config"]["target"] <= .5
    assert removed["blocks"] == models["random"].unet.spec.summary() and start["blocks"] == robust.unet.spec.summary()
    assert json.loads((arms / "dclip0.safetensors.log.json").read_text())["config"]["criterion"] == "d_clip"
    text = (work / "report" / "evolving.md").read_text()
    for label in ["teacher (the original UNet)", *ARMS.values()]:
        assert f"| {label} |" in text, label
    assert "What the toy world supports." in text and (work / "report" / "fig_evolving.png").is_file()
    assert ArchSpec.from_json(json.loads((raw / "alg10.json").read_text())["spec"]) == evolved.unet.spec
    assert "UNet checksum" in text and "the same for every run" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and line.count("|") == 8]
    latency = {row[0]: row[1] for row in rows}
    assert latency[f"| {ARMS['scratch']}"] == latency[f"| {ARMS['alg1']}"]  # one architecture, one latency
    # the run goes on elsewhere from report/arms alone: a new work folder re-makes the robust UNet, not the evolved one,
    # trains no arm and redraws the page from the kept records
    record, elsewhere = (raw / "arms.json").read_text(), work / "elsewhere"
    assert run_main("recipe.py", "--quick", "--arms", "--work-dir", str(elsewhere), "--report-dir",
                    str(work / "report")) == 0
    assert (raw / "arms.json").read_text() == record and not (elsewhere / "evolved.safetensors").exists()
    assert not list((elsewhere / "arms").glob("*.safetensors"))
    verdicts = lambda page: [line for line in page.splitlines() if line.count("|") == 6]  # noqa: E731 (no latency)
    assert verdicts((work / "report" / "evolving.md").read_text()) == verdicts(text) and len(verdicts(text)) == 7


def test_a_kept_arms_run_refuses_another_table(tmp_path):
    """report/arms/ evolves on with the table it started with: --latency-table beside it is refused in one line,
    before any work."""
    from snapfusion_min.latency import LatencyTable

    (tmp_path / "report" / "arms").mkdir(parents=True)
    for path in (tmp_path / "report" / "arms" / "lut.json", tmp_path / "mine.json"):
        LatencyTable("cpu", 2, 8, "float32", ms={}).save(path)
    code = run_main("recipe.py", "--quick", "--arms", "--latency-table", str(tmp_path / "mine.json"), "--work-dir",
                    str(tmp_path / "work"), "--report-dir", str(tmp_path / "report"))
    assert isinstance(code, str) and "holds a run that evolved with its own lookup table" in code, code
    assert "\n" not in code and not (tmp_path / "work").exists()
