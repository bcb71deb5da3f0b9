"""The scripts as a user runs them: sample.py's PNGs and metadata, one-line errors for a user's mistakes, and one
meaning per flag across every script."""

import argparse
import importlib
import runpy
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_main, run_script, tiny_pipeline
from PIL import Image

from snapfusion_min import load_pipeline, pipeline
from snapfusion_min.cli import COMMANDS, FLAGS
from snapfusion_min.pipeline import SamplerConfig

SCRIPTS = ["train.py", "distill.py", "evolve.py", "sample.py", "export.py", "evaluate.py", "recipe.py"]
BUNDLED = ROOT / "models" / "toy" / "model.safetensors"
PROMPT = "a large red striped circle at the top left and a blue square on a dark background"
SD_SCALE = (ROOT / "docs" / "sd_scale.md").read_text()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    tiny_pipeline(sampler=SamplerConfig(steps=3, guidance=4.0, spacing="trailing", resolution=32, solver="dpm++")
                  ).save(path)
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
    assert image.text["sampler"] == "dpm++"
    assert run_main("sample.py", "--checkpoint", str(tiny_checkpoint), "--prompt", "a blue square", "--seed", "4",
                    "--output_dir", str(tmp_path / "again"), "--device", "cpu") == 0  # diffusers' spelling
    assert Image.open(tmp_path / "again" / "0004-a-blue-square.png").tobytes() == image.tobytes()  # same seed


@pytest.mark.slow
def test_two_runs_into_one_folder_lose_no_image(tmp_path, tiny_checkpoint):
    """Sequential, then concurrent: every image of every run is there, none overwritten."""
    out = tmp_path / "out"
    args = ["--checkpoint", str(tiny_checkpoint), "--prompt", "a red circle", "--prompt", "a blue square",
            "--out-dir", str(out), "--device", "cpu"]
    for seed in ("0", "1"):  # seeds 0, 1 and 1, 2: the second run's first name is taken (in this process)
        assert run_main("sample.py", *args, "--seed", seed) == 0
    assert len(list(out.glob("*.png"))) == 4
    assert (out / "0001-a-blue-square.png").is_file() and (out / "0001-a-red-circle.png").is_file()
    runs = [subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for _ in range(2)]
    assert all(p.wait() == 0 for p in runs)
    names = sorted(p.name for p in out.glob("*.png"))
    assert len(names) == 8 and not list(out.glob(".*.tmp")), names
    assert {"0000-a-red-circle-2.png", "0000-a-red-circle-3.png"} <= set(names)


@pytest.mark.parametrize("args,message", [
    (["--height", "60"], "multiples of 8"),
    (["--num-inference-steps", "0"], "steps must be a positive integer"),
    (["--guidance", "0.5"], "guidance must be a finite number >= 1"),
    (["--guidance", "nan"], "guidance must be a finite number >= 1"),
    (["--prompts-file", "EMPTY"], "has no prompts"),
    (["--num-images-per-prompt", "0"], "--num-images-per-prompt must be positive"),
    (["--checkpoint", "CORRUPT"], "not a readable .safetensors file"),
    (["--checkpoint", "PICKLE"], "refused to unpickle"),
    (["--checkpoint", "missing.ckpt"], "no such checkpoint"),
    (["--seed", str(2**64)], f"--seed {2**64} is out of range: image i uses seed + i, a 64-bit seed"),
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
    assert not (tmp_path / "o").exists()  # no empty output folder left behind either


def test_a_failure_while_sampling_leaves_no_empty_folder(tmp_path, tiny_checkpoint, monkeypatch):
    """An error raised after the output folder was made (here: by the sampler) removes the folders it made."""
    from snapfusion_min.pipeline import Pipeline

    def fail(*args, **kwargs):
        raise ValueError("the sampled latents are not finite")

    monkeypatch.setattr(Pipeline, "__call__", fail)
    code = run_main("sample.py", "--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--out-dir",
                    str(tmp_path / "new" / "o"))
    assert code == "sample.py: error: the sampled latents are not finite" and not (tmp_path / "new").exists()


def parsers(script: str) -> list[argparse.ArgumentParser]:
    """The script's parser and its sub-command parsers (the command's module in snapfusion_min.cli)."""
    p = importlib.import_module(f"snapfusion_min.cli.{script.removesuffix('.py')}_command").build_parser()
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
    assert "(default:" in texts[0] or script in ("train.py", "evaluate.py")  # theirs are per sub-command
    assert all("(default:" in text for text in texts[1:])
    if script == "train.py":
        unet = next(t for t in texts if "--cfg-dropout" in t)  # the unet stage
        assert "(default: 8000)" in unet and "(default: 0.999)" in unet


@pytest.mark.slow
def test_api_and_every_command_draw_the_same_image(tmp_path):
    """pipe(prompt) with no keyword arguments samples as the checkpoint says (20 steps, guidance 2, 64x64 for the
    bundled toy model), as sample.py does; the installed command and python -m, run from another folder, draw the
    same bytes and warn about nothing (both in --dtype auto: bf16 on a CPU with native bf16, else float32)."""
    image = load_pipeline(BUNDLED)(PROMPT)[0]
    assert image.size == (64, 64)
    commands = {"sample.py": [sys.executable, str(ROOT / "sample.py")],
                "installed": [str(Path(sys.executable).parent / "snapfusion-sample")],
                "module": [sys.executable, "-m", "snapfusion_min", "sample"]}
    for name, command in commands.items():
        r = subprocess.run([*command, "--prompt", PROMPT, "--out-dir", str(tmp_path / name)],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0 and "warning" not in r.stderr, (name, r.stderr)
        (png,) = (tmp_path / name).glob("*.png")
        assert Image.open(png).tobytes() == image.tobytes(), name


def test_every_command_is_installed_and_is_the_script(capsys, monkeypatch):
    """The venv has snapfusion-<command> on PATH for each command, each running the command's entry(); its --help is
    the top-level script's but for the name."""
    installed = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("snapfusion")}
    assert installed == {f"snapfusion-{c}": f"snapfusion_min.cli.{c}_command:entry" for c in COMMANDS}
    for command in COMMANDS:
        assert (Path(sys.executable).parent / f"snapfusion-{command}").is_file(), command
        monkeypatch.setattr(sys, "argv", [f"snapfusion-{command}", "--help"])
        with pytest.raises(SystemExit) as e:
            importlib.import_module(f"snapfusion_min.cli.{command}_command").entry()
        assert e.value.code == 0
        installed_help = capsys.readouterr().out
        assert run_main(f"{command}.py", "--help") == 0
        script_help = capsys.readouterr().out
        assert installed_help.startswith(f"usage: snapfusion-{command} ")
        words = lambda text: text.split()  # noqa: E731 (the usage lines wrap by the length of the name)
        assert words(installed_help.replace(f"snapfusion-{command}", f"{command}.py")) == words(script_help)


@pytest.mark.parametrize("args,code,out", [([], 2, "usage: python -m snapfusion_min {sample, train, distill, evolve, "
                                               "export, evaluate, recipe} [flags]"),
                                          (["--help"], 0, "(--help after a command shows its flags)"),
                                          (["smaple"], "python -m snapfusion_min: error: unknown command 'smaple'; "
                                                       "choose from sample, train, distill", "")])
def test_python_m_lists_the_commands(args, code, out, monkeypatch, capsys):
    """python -m snapfusion_min (run in this process: the module's __main__) lists the commands or names the typo."""
    monkeypatch.setattr(sys, "argv", ["snapfusion_min", *args])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("snapfusion_min", run_name="__main__")
    assert e.value.code == code if isinstance(code, int) else str(e.value.code).startswith(code)
    assert out in capsys.readouterr().out


def test_images_per_prompt(tmp_path, tiny_checkpoint):
    """--num-images-per-prompt n: each prompt n times in a row, image i from seed + i, the same images as
    pipe(prompts, num_images_per_prompt=n) in Python; the n images of a prompt differ."""
    prompts = ["a red circle", "a blue square"]
    assert run_main("sample.py", "--checkpoint", str(tiny_checkpoint), "--prompt", prompts[0], "--prompt", prompts[1],
                    "--num-images-per-prompt", "2", "--seed", "5", "--out-dir", str(tmp_path)) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["0005-a-red-circle.png", "0006-a-red-circle.png", "0007-a-blue-square.png",
                     "0008-a-blue-square.png"]
    images = load_pipeline(tiny_checkpoint)(prompts, num_images_per_prompt=2, seed=5)
    assert [Image.open(tmp_path / n).tobytes() for n in names] == [im.tobytes() for im in images]
    assert images[0].tobytes() != images[1].tobytes() and images[2].tobytes() != images[3].tobytes()
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer"):
        load_pipeline(tiny_checkpoint)(prompts, num_images_per_prompt=0)


@pytest.mark.parametrize("outcome", ["float32", "bfloat16", "float16"])
def test_api_and_cli_pick_the_same_device_and_dtype(outcome, tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """load_pipeline's defaults are the commands' (device and dtype 'auto'): under each outcome of the detector -- a
    CPU without native bf16 (float32), one with it (bfloat16), an accelerator (float16; faked on the CPU, as no GPU
    is here) -- pipe(prompts) draws the bytes sample.py writes, and sample.py's header names the dtype."""
    monkeypatch.setattr(pipeline, "native_bf16", lambda: outcome == "bfloat16")
    if outcome == "float16":
        monkeypatch.setattr(pipeline, "auto_dtype", lambda device: (torch.float16, "auto: float16 on an accelerator"))
    prompts = ["a red circle", "a blue square"]
    pipe = load_pipeline(tiny_checkpoint)
    assert pipe.dtype == getattr(torch, outcome) and pipe.device == pipeline.pick_device()
    images = pipe(prompts, seed=7)
    assert run_main("sample.py", "--checkpoint", str(tiny_checkpoint), "--prompt", prompts[0], "--prompt", prompts[1],
                    "--seed", "7", "--out-dir", str(tmp_path)) == 0
    assert f"cpu {outcome}" in capsys.readouterr().err
    written = [Image.open(tmp_path / n).tobytes() for n in ("0007-a-red-circle.png", "0008-a-blue-square.png")]
    assert written == [im.tobytes() for im in images]


def test_diffusers_spellings_in_the_api(tiny_checkpoint):
    """pipe(prompt, num_inference_steps=, guidance_scale=) as diffusers spells them (and the commands' flags accept
    them): the same image as steps= and guidance=; both spellings of one setting at once are refused."""
    pipe = load_pipeline(tiny_checkpoint, device="cpu", dtype="float32")
    ours = pipe("a red circle", steps=2, guidance=3.0, seed=1)[0]
    theirs = pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, seed=1)[0]
    assert ours.tobytes() == theirs.tobytes()
    assert ours.tobytes() != pipe("a red circle", num_inference_steps=3, guidance_scale=3.0, seed=1)[0].tobytes()
    with pytest.raises(TypeError, match="num_inference_steps and steps name the same setting"):
        pipe("a red circle", steps=2, num_inference_steps=3)
    assert FLAGS["--solver"][2] == ("--sampler",)  # the flag is named as the API's solver=, --sampler still works


def test_out_of_domain_requests_warn_in_one_line(tmp_path):
    """The bundled toy model given words outside its captions' grammar, or another resolution, draws but says so:
    one line each, naming the words and the sizes."""
    r = run_script("sample.py", "--prompt", "a pink star", "--prompt", "A cat, on a mat", "--height", "128",
                   "--width", "128", "--num-inference-steps", "2", "--out-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    warned = [line for line in r.stderr.splitlines() if "warning" in line]
    assert warned == ["sample.py: warning: words a toy-world model has never seen: pink, star, cat, mat (its "
                      "captions read like 'a small red striped circle at the top left and a blue square on a dark "
                      "background')",
                      "sample.py: warning: sampling at 128x128, but the checkpoint was trained at 64x64"], r.stderr


def test_the_package_never_imports_the_oracles():
    """Every module of snapfusion_min (the commands too) imports, and the bundled model samples, with diffusers and
    transformers made unimportable (open_clip would import transformers if it could: it is optional there)."""
    code = ("import importlib, pkgutil, sys\n"
            "sys.modules['diffusers'] = sys.modules['transformers'] = None\n"
            "import snapfusion_min\n"
            "names = [m.name for m in pkgutil.walk_packages(snapfusion_min.__path__, 'snapfusion_min.')]\n"
            "[importlib.import_module(n) for n in names if n != 'snapfusion_min.__main__']\n"
            f"image = snapfusion_min.load_pipeline({str(BUNDLED)!r})('a small red circle in the center')[0]\n"
            "print(len(names), image.size)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[0]) >= 30 and r.stdout.endswith("(64, 64)\n"), r.stdout


@pytest.mark.parametrize("script,stage", [("train.py", "unet"), ("train.py", "decoder"), ("distill.py", "distill"),
                                          ("evolve.py", "evolve")])
def test_preset_fills_what_the_command_line_leaves(script, stage):
    """--preset sd15 sets each of the stage's values (docs/sd_scale.md lists them with their sources) unless the flag
    is given, in any of its spellings; the stage's config accepts them all."""
    from snapfusion_min.cli.presets import PRESETS, apply_preset, subcommand

    module = importlib.import_module(f"snapfusion_min.cli.{script.removesuffix('.py')}_command")
    p = module.build_parser()
    head = [stage] if script == "train.py" else []
    argv = [*head, "--preset", "sd15", "--learning_rate", "3e-5", "--out", "x", *(
        ["--init", "m"] if stage == "decoder" else ["--teacher", "t"] if stage == "distill" else
        ["--checkpoint", "c"] if stage == "evolve" else [])]
    args = p.parse_args(argv)
    apply_preset(args, argv, subcommand(p, stage) if head else p, stage)
    table = PRESETS["sd15"][stage]
    assert args.lr == 3e-5  # given (as --learning_rate): the command line wins
    for name, (value, source) in table.items():
        if name != "--lr":
            assert getattr(args, name.removeprefix("--").replace("-", "_")) == value, name
        cell = f"`{name}`" if value is True else f"`{name} {value}`"
        assert f"| {cell} | {source} |" in SD_SCALE, name


def test_a_gpu_torch_cannot_use_is_named_in_one_warning(monkeypatch):
    """--device auto on a machine with an NVIDIA driver but a torch that cannot use it (a CPU build, or CUDA newer
    than the driver) runs on the CPU and says why, once; with no GPU, nothing is said."""
    import warnings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(pipeline, "nvidia_driver", lambda: "470.57.02")
    pipeline.warn_unusable_gpu.cache_clear()
    with pytest.warns(UserWarning) as caught:
        assert pipeline.pick_device("auto") == torch.device("cpu")
        assert pipeline.pick_device("auto") == torch.device("cpu")  # a command asks more than once: one warning
    (w,) = caught
    assert str(w.message).startswith("an NVIDIA GPU is here (driver 470.57.02) but this torch")
    assert "README, 'Install'" in str(w.message) and "\n" not in str(w.message)
    monkeypatch.setattr(pipeline, "nvidia_driver", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pipeline.pick_device("auto") == torch.device("cpu")
