"""distill.py end to end on a tiny model, and its refusals before any training starts."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import randomize

from snapfusion_min.arch import tiny
from snapfusion_min.pipeline import Pipeline, load_pipeline
from snapfusion_min.text_encoder import TextConfig, TextEncoder
from snapfusion_min.unet import UNet
from snapfusion_min.vae import VAE, VAEConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = VAEConfig(channels=(16, 32, 32, 32), decoder_channels=(32, 32, 32, 16), layers=1, groups=8)


def tiny_pipe(prediction="v", context=32, seed=0):
    return Pipeline(randomize(UNet(tiny(context)), seed), randomize(VAE(TINY_VAE), 1),
                    randomize(TextEncoder(TextConfig(context, 2, 4, 32)), 2), prediction,
                    sampler={"steps": 4, "guidance": 3.0, "spacing": "trailing", "resolution": 64})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name, pipe in (("teacher", tiny_pipe()), ("eps", tiny_pipe("eps")), ("wide", tiny_pipe(context=64))):
        pipe.save(root / f"{name}.safetensors")
    return root


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "distill.py"), *args, "--device", "cpu"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def test_distill_writes_a_student_that_samples_with_its_own_steps(tmp_path, models):
    out = tmp_path / "student.safetensors"
    r = run("--teacher", str(models / "teacher.safetensors"), "--out", str(out), "--steps", "3", "--batch-size", "4",
            "--teacher-steps", "8", "--student-steps", "4", "--cfg-prob", "0.5")
    assert r.returncode == 0, r.stderr[-2000:]
    student = load_pipeline(out)
    assert student.sampler["steps"] == 4 and student.sampler["spacing"] == "trailing" and student.prediction == "v"
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
    argv = ["--out", str(tmp_path / "s.safetensors"), "--steps", "1", "--batch-size", "2"]
    for flag in ("--teacher", "--student-init"):
        name = flags.pop(flag, base[flag])
        if name:
            argv += [flag, str(models / f"{name}.safetensors")]
    for flag, value in flags.items():
        argv += [flag, value]
    r = run(*argv)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert not (tmp_path / "s.safetensors").exists()
