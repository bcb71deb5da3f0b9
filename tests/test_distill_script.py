"""distill.py end to end on a tiny model, and its refusals before any training starts."""

import pytest
from helpers import run_script, tiny_pipeline

from snapfusion_min.pipeline import read_pipeline

pytestmark = pytest.mark.slow  # see conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, pipe in (("teacher", tiny_pipeline()), ("eps", tiny_pipeline(prediction="eps")),
                       ("wide", tiny_pipeline(context=64))):
        pipe.save(root / f"{name}.safetensors")
    return root


def run(*args):
    return run_script("distill.py", *args, "--device", "cpu")


def test_distill_writes_a_student_that_samples_with_its_own_steps(tmp_path, models):
    out = tmp_path / "student.safetensors"
    r = run("--teacher", str(models / "teacher.safetensors"), "--out", str(out), "--train-steps", "3",
            "--batch-size", "4", "--teacher-steps", "8", "--student-steps", "4", "--cfg-prob", "0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    student = read_pipeline(out)
    assert student.sampler.steps == 4 and student.sampler.spacing == "trailing" and student.sampler.distilled
    assert student.prediction == "v" and student.training["loss"]["cfg_prob"] == 0.5
    assert (tmp_path / "student.safetensors.samples.png").is_file()


@pytest.mark.parametrize("args,message", [
    (["--teacher", "eps"], "must both be v-prediction"),
    (["--student-init", "wide"], "text-encoder widths differ"),
    (["--student-steps", "6"], "must divide"),
    (["--w-min", "0.5"], "CFG range"),
])
def test_bad_pairs_are_refused_before_training(tmp_path, models, args, message):
    base = {"--teacher": "teacher", "--student-init": None}
    flags = dict(zip(args[::2], args[1::2]))
    argv = ["--out", str(tmp_path / "s.safetensors"), "--train-steps", "1", "--batch-size", "2"]
    for flag in ("--teacher", "--student-init"):
        name = flags.pop(flag, base[flag])
        if name:
            argv += [flag, str(models / f"{name}.safetensors")]
    for flag, value in flags.items():
        argv += [flag, value]
    r = run(*argv)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "s.safetensors").exists()
