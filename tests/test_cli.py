"""The scripts as a user runs them: sample.py's PNGs and metadata, one-line errors for a user's mistakes, and one
meaning per flag across every script."""

import argparse
import runpy
import subprocess
import sys

import pytest
from helpers import ROOT, run_main, run_script, tiny_pipeline
from PIL import Image

from snapfusion_min.cli import FLAGS
from snapfusion_min.pipeline import SamplerConfig

SCRIPTS = ["train.py", "distill.py", "evolve.py", "sample.py", "export.py", "evaluate.py", "recipe.py"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    tiny_pipeline(sampler=SamplerConfig(steps=3, guidance=4.0, spacing="trailing", resolution=32)).save(path)
    return path


def test_sample_writes_pngs_with_metadata(tmp_path, tiny_checkpoint):
    r = run_script("sample.py", "--checkpoint", str(tiny_checkpoint), "--prompt", "a red circle", "--prompt",
                   "a blue square", "--batch-size", "1", "--seed", "3", "--out-dir", str(tmp_path / "out"),
                   "--device", "cpu")
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["0003-a-red-circle.png", "0004-a-blue-square.png"]  # named by their seeds
    image = Image.open(files[1])
    assert image.size == (32, 32)  # the checkpoint's own resolution and sampler defaults
    assert image.text["prompt"] == "a blue square" and image.text["seed"] == "4" and image.text["steps"] == "3"
    assert image.text["spacing"] == "trailing" and image.text["checkpoint"] == str(tiny_checkpoint)
    again = run_script("sample.py", "--checkpoint", str(tiny_checkpoint), "--prompt", "a blue square", "--seed", "4",
                       "--output_dir", str(tmp_path / "again"), "--device", "cpu")  # diffusers' spelling
    assert again.returncode == 0, again.stderr
    assert Image.open(tmp_path / "again" / "0004-a-blue-square.png").tobytes() == image.tobytes()  # same seed


@pytest.mark.slow
def test_two_runs_into_one_folder_lose_no_image(tmp_path, tiny_checkpoint):
    """Sequential, then concurrent: every image of every run is there, none overwritten."""
    out = tmp_path / "out"
    args = ["--checkpoint", str(tiny_checkpoint), "--prompt", "a red circle", "--prompt", "a blue square",
            "--out-dir", str(out), "--device", "cpu"]
    for seed in ("0", "1"):  # seeds 0, 1 and 1, 2: the second run's first name is taken
        assert run_script("sample.py", *args, "--seed", seed).returncode == 0
    assert len(list(out.glob("*.png"))) == 4
    assert (out / "0001-a-blue-square.png").is_file() and (out / "0001-a-red-circle.png").is_file()
    runs = [subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in runs)
    names = sorted(p.name for p in out.glob("*.png"))
    assert len(names) == 8 and not list(out.glob(".*.tmp")), names
    assert {"0000-a-red-circle-2.png", "0000-a-red-circle-3.png"} <= set(names)


@pytest.mark.parametrize("args,message", [
    (["--height", "60"], "multiples of 8"),
    (["--num-inference-steps", "0"], "steps must be a positive integer"),
    (["--guidance", "0.5"], "guidance must be a finite number >= 1"),
    (["--guidance", "nan"], "guidance must be a finite number >= 1"),
    (["--prompts-file", "EMPTY"], "has no prompts"),
    (["--checkpoint", "CORRUPT"], "not a readable .safetensors file"),
    (["--checkpoint", "PICKLE"], "refused to unpickle"),
    (["--checkpoint", "missing.ckpt"], "no such checkpoint"),
])
def test_user_mistakes_get_one_line(tmp_path, tiny_checkpoint, args, message, capfd, monkeypatch):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "corrupt.safetensors").write_bytes(tiny_checkpoint.read_bytes()[:5000])
    (tmp_path / "code.ckpt").write_bytes(b"\x80\x04cos\nsystem\n(S'echo hi'\ntR.")
    subs = {"EMPTY": str(tmp_path / "empty.txt"), "CORRUPT": str(tmp_path / "corrupt.safetensors"),
            "PICKLE": str(tmp_path / "code.ckpt")}
    args = [subs.get(a, a) for a in args]
    base = ["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--out-dir", str(tmp_path / "o")]
    monkeypatch.chdir(tmp_path)
    code = run_main("sample.py", *base, *args)  # in this process: an exception other than the exit would raise
    assert isinstance(code, str) and code.startswith("sample.py: error: ") and message in code, code
    assert "\n" not in code and capfd.readouterr().err == ""
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def parsers(script: str) -> list[argparse.ArgumentParser]:
    """The script's parser and its sub-command parsers, read without running the script (runpy, not import)."""
    p = runpy.run_path(str(ROOT / script))["build_parser"]()
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return [p] + [sp for a in subs for sp in a.choices.values()]


def test_each_flag_means_one_thing_in_every_script():
    """A flag declared in cli.FLAGS keeps its type, meaning and aliases everywhere; every other flag has one type
    across scripts; the names that meant two things (--steps, --batch, --ema as a decay, --n) are gone."""
    seen = {}
    for script in SCRIPTS:
        for p in parsers(script):
            for action in p._actions:
                long = [o for o in action.option_strings if o.startswith("--")]
                if not long or long[0] == "--help":
                    continue
                name, kind = long[0], action.type if action.nargs != 0 else None
                assert name not in ("--steps", "--batch", "--n", "--out-file"), f"{script}: {name}"
                if name in FLAGS:
                    want_type, meaning, aliases = FLAGS[name]
                    assert kind == want_type, f"{script}: {name} is {kind}, not {want_type}"
                    assert action.help.startswith(meaning), f"{script}: {name} means {action.help!r}"
                    assert set(long[1:]) == set(aliases), f"{script}: {name} aliases {long[1:]}"
                seen.setdefault(name, set()).add(kind)
    assert {k for k, types in seen.items() if len(types) > 1} == set()
    assert seen["--ema"] == {None}  # the switch "use the EMA weights"; the decay is --ema-decay


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_defaults(script):
    texts = [p.format_help() for p in parsers(script)]
    assert all(text.startswith("usage:") for text in texts)
    assert "(default:" in texts[0] or script == "train.py"  # train.py's defaults are per stage
    if script == "train.py":
        unet = next(t for t in texts if "--cfg-dropout" in t)  # the unet stage
        assert "(default: 3500)" in unet and "(default: 0.999)" in unet
