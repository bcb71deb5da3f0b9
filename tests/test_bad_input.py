"""A hostile user's inputs, every script: a one-line error naming the problem, a non-zero exit, no traceback, and no
file changed. Each row runs the script's ``__main__`` in this process (helpers.run_main): an exception other than
the script's own one-line exit would surface here as that exception, i.e. a traceback the user would have seen."""

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from helpers import CLIP, ROOT, bomb_png, run_main, tiny_pipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from snapfusion_min.vae import TOY_VAE

TOY = ROOT / "models" / "toy"
UNET = ["unet", "--arch", "tiny", "--clip", "CLIP", "--autoencoder", "AE", "--out", "OUT"]
DISTILL = ["--teacher", "TINY", "--out", "OUT"]
EVOLVE = ["--checkpoint", "TINY", "--out", "OUT"]

ROWS = [  # script, arguments, what the one line must say
    # numbers: zero, negative, out of range, not a number, NaN / inf
    ("train.py", [*UNET, "--train-steps", "0"], "train-steps must be >= 1"),
    ("train.py", [*UNET, "--train-steps", "-5"], "train-steps must be >= 0"),
    ("train.py", [*UNET, "--batch-size", "0"], "batch-size must be >= 1"),
    ("train.py", [*UNET, "--batch-size", "-2"], "batch-size must be >= 1"),
    ("train.py", [*UNET, "--lr", "0"], "lr must be a positive number"),
    ("train.py", [*UNET, "--lr", "nan"], "lr must be a positive number"),
    ("train.py", [*UNET, "--accum", "0"], "accum must be >= 1"),
    ("train.py", [*UNET, "--batch-size", "4", "--accum", "8"], "not divisible by accum"),
    ("train.py", [*UNET, "--save-every", "0"], "save-every must be >= 1"),
    ("train.py", [*UNET, "--keep-prob", "1.5"], "keep-prob must be in (0, 1]"),
    ("train.py", [*UNET, "--keep-prob", "0"], "keep-prob must be in (0, 1]"),
    ("train.py", [*UNET, "--ema-decay", "-1"], "ema-decay must be in [0, 1)"),
    ("train.py", [*UNET, "--cfg-dropout", "2"], "cfg-dropout must be in [0, 1)"),
    ("train.py", [*UNET, "--guidance", "0.5"], "guidance must be a finite number >= 1"),
    ("train.py", [*UNET, "--num-inference-steps", "0"], "steps must be a positive integer"),
    ("train.py", ["autoencoder", "--out", "OUT", "--train-steps", "0"], "train-steps must be >= 1"),
    ("train.py", ["autoencoder", "--out", "OUT", "--crop", "30"], "crop must be a multiple of the factor 4"),
    ("train.py", ["autoencoder", "--out", "OUT", "--factor", "8", "--crop", "36"], "multiple of the factor 8"),
    ("train.py", ["decoder", "--init", "TINY", "--out", "OUT", "--ratio", "1.5"], "ratio must be in (0, 1]"),
    ("train.py", ["decoder", "--init", "TINY", "--out", "OUT", "--latents", "0"], "latents and teacher-steps"),
    ("train.py", ["clip", "--out", "OUT", "--batch-size", "1"], "batch-size >= 2"),
    ("distill.py", [*DISTILL, "--train-steps", "0"], "train-steps must be >= 1"),
    ("distill.py", [*DISTILL, "--student-steps", "6"], "must divide"),
    ("distill.py", [*DISTILL, "--teacher-steps", "8", "--student-steps", "8"], "needs more steps"),
    ("distill.py", [*DISTILL, "--teacher-steps", "2000", "--student-steps", "1000"], "at most 1000"),
    ("distill.py", [*DISTILL, "--w-min", "0.5"], "CFG range"),
    ("distill.py", [*DISTILL, "--w-max", "inf"], "CFG range"),
    ("distill.py", [*DISTILL, "--cfg-prob", "2"], "cfg_prob must be in [0, 1]"),
    ("distill.py", [*DISTILL, "--gamma", "-1"], "gamma must be"),
    ("distill.py", [*DISTILL, "--guidance", "nan"], "guidance must be a finite number >= 1"),
    ("distill.py", [*DISTILL, "--progressive", "16,x,8"], "--progressive takes step counts"),
    ("evolve.py", [*EVOLVE, "--target", "1.5"], "target must be in (0, 1]"),
    ("evolve.py", [*EVOLVE, "--keep-prob", "1.5"], "keep-prob must be in (0, 1]"),
    ("evolve.py", [*EVOLVE, "--threads", "0"], "threads must be >= 1"),
    ("evolve.py", [*EVOLVE, "--iterations", "0"], "iterations, actions and threads must be >= 1"),
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "x", "--guidance", "-5"], "guidance must be a finite"),
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "x", "--guidance", "inf"], "guidance must be a finite"),
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "x", "--num-inference-steps", "-1"], "positive integer"),
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "x", "--num-inference-steps", "5000"], "at most 1000"),
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "x", "--width", "0"], "positive multiples of 8"),
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "x", "--batch-size", "0"], "--batch-size must be positive"),
    ("export.py", ["--checkpoint", "TINY", "--resolution", "0"], "positive multiple of 64"),
    ("evaluate.py", ["--checkpoint", "TINY", "--num-prompts", "0"], "must be positive"),
    ("recipe.py", ["--quick", "--work-dir", "WORK", "--report-dir", "WORK/r", "--redo", "nosuchstage"],
     "no such stage"),
    # devices that are not here, or not devices
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "x", "--device", "cuda"], "CUDA device(s) on this machine"),
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "x", "--device", "mps"], "MPS is not available"),
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "x", "--device", "foo"], "unknown device 'foo'"),
    ("train.py", [*UNET, "--device", "cuda:3"], "CUDA device(s) on this machine"),
    ("distill.py", [*DISTILL, "--device", "tpu"], "unknown device"),
    # files: missing, empty, truncated, random bytes, foreign, code-carrying, of another kind
    ("sample.py", ["--checkpoint", "MISSING", "--prompt", "x"], "no such checkpoint"),
    ("sample.py", ["--checkpoint", "EMPTY", "--prompt", "x"], "not a readable .safetensors file"),
    ("sample.py", ["--checkpoint", "TRUNCATED", "--prompt", "x"], "not a readable .safetensors file"),
    ("sample.py", ["--checkpoint", "RANDOM", "--prompt", "x"], "corrupt"),
    ("sample.py", ["--checkpoint", "PICKLE", "--prompt", "x"], "refused to unpickle"),
    ("sample.py", ["--checkpoint", "FOREIGN", "--prompt", "x"], "not a Stable Diffusion v1 checkpoint"),
    ("sample.py", ["--checkpoint", "AE", "--prompt", "x"], "an autoencoder checkpoint of snapfusion_min"),
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "x", "--decoder", "MISSING"], "no such checkpoint"),
    ("train.py", [*UNET[:3], "--clip", "AE", *UNET[5:]], "not a toy CLIP checkpoint"),
    ("train.py", [*UNET[:3], "--clip", "TRUNCATED", *UNET[5:]], "not a readable .safetensors file"),
    ("train.py", [*UNET[:3], "--clip", "PICKLE", *UNET[5:]], "refused to unpickle"),
    ("train.py", [*UNET[:5], "--autoencoder", "FOREIGN", *UNET[7:]], "not an autoencoder checkpoint"),
    ("train.py", [*UNET[:5], "--autoencoder", "MISSING", *UNET[7:]], "no such autoencoder checkpoint"),
    ("train.py", ["unet", "--arch", "NOSTAGES", *UNET[3:]], "architecture spec has no 'stages' entry"),
    ("train.py", ["unet", "--arch", "huge", *UNET[3:]], "unknown architecture preset"),
    ("train.py", ["unet", "--arch", "tiny", "--out", "OUT"], "needs --clip and --autoencoder"),
    ("train.py", [*UNET, "--data", "MISSING"], "no such data folder"),
    # data that crashed or hung (the second probe)
    ("train.py", [*UNET, "--data", "BOMBS"], "bomb.png: unreadable image (400,000,000 pixels, more than 67,108,864)"),
    ("train.py", [*UNET, "--data", "UNPAIRED"], "unusable samples in a row, 2 distinct"),
    ("train.py", [*UNET, "--data", "ZERO"], "zero.tar is not a regular file (a folder, FIFO or device)"),
    ("train.py", [*UNET, "--data", "FIFO"], "fifo.tar is not a regular file (a folder, FIFO or device)"),
    ("train.py", [*UNET, "--data", "WORK/s-{000000..999999}.tar"], "names 1,000,000 shards; at most 100,000"),
    ("train.py", [*UNET[:-1], "CODED", "--resume"], "coded.safetensors.state.pt is not a readable resumable state"),
    ("train.py", [*UNET, "--data", "NUMBERS"], "a.png: its caption is a int, not a string"),
    ("train.py", [*UNET, "--data", "PIPES"], "b.png: not a regular file (a FIFO or device)"),
    ("sample.py", ["--prompts-file", "FIFO", "--checkpoint", "TINY"], "fifo.tar is not a regular file"),
    ("evolve.py", [*EVOLVE, "--clip", "ViT-B-32", "--clip-weights", "PICKLE", "--prompts-file", "PROMPTS",
                   "--score-prompts", "1", "--num-prompts", "1"],
     "code.ckpt is not usable as ViT-B-32 weights"),
    ("evaluate.py", ["--checkpoint", "TINY", "--clip", "AE"], "not a toy CLIP checkpoint"),
    ("evaluate.py", ["--checkpoint", "TINY", "--clip", "PICKLE"], "refused to unpickle"),
    ("evaluate.py", ["--checkpoint", "TINY", "--remove", "up9.A0"], "unknown block address"),
    ("distill.py", ["--teacher", "MISSING", "--out", "OUT"], "no such checkpoint"),
    ("distill.py", ["--teacher", "EPS", "--out", "OUT"], "must both be v-prediction"),
    ("evolve.py", ["--checkpoint", "PICKLE", "--out", "OUT"], "refused to unpickle"),
    ("export.py", ["--checkpoint", "RANDOM"], "corrupt"),
    ("sample.py", ["--prompts-file", "MISSING", "--checkpoint", "TINY"], "no such prompts file"),
    ("sample.py", ["--prompts-file", "BLANK", "--checkpoint", "TINY"], "has no prompts"),
    ("sample.py", ["--prompts-file", "BINARY", "--checkpoint", "TINY"], "binary.txt is not UTF-8 text (byte 2"),
    ("sample.py", ["--checkpoint", "/dev/zero", "--prompt", "x"], "/dev/zero is not a regular file (a folder, FIFO"),
    ("sample.py", ["--prompts-file", "NULLCOCO", "--checkpoint", "TINY"], "annotation 7's caption is null, not text"),
    ("sample.py", ["--checkpoint", "NANSCALE", "--prompt", "x"], "nanscale.safetensors: its latent scale NaN is not"),
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "x", "--seed", str(2**64)], f"--seed {2**64} is out of range"),
    ("train.py", [*UNET, "--data", "MIXED"], "mixed holds both WebDataset shards (.tar) and images"),
    ("train.py", [*UNET, "--data", "GZIP"], "hold no samples (epoch 0): a.tar: gzip-compressed, not a tar"),
    ("train.py", [*UNET, "--data", "EMPTYTAR"], "hold no samples (epoch 0): a.tar: unreadable tar after 0 samples"),
    ("train.py", [*UNET[:-1], "CUTSTATE", "--resume"], "cut.safetensors.state.pt is not a readable resumable state"),
    ("evaluate.py", ["coco", "--checkpoint", "TINY", "--prompts-file", "PROMPTS", "--images-dir", "WORK/i",
                     "--fid-reference", "NANSTATS", "--inception-weights", "MISSING"],
     "nan.npz: FID statistics mu hold values that are not finite numbers"),
    ("evaluate.py", ["coco", "--checkpoint", "TINY", "--prompts-file", "PROMPTS", "--images-dir", "WORK/i",
                     "--fid-reference", "NOIMAGES", "--inception-weights", "MISSING"],
     "noimages holds 0 image(s); FID needs at least 2"),
    # outputs that cannot be written, found before any work
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "x", "--out-dir", "BLANK/sub"], "is not a folder"),
    ("train.py", [*UNET[:-1], "BLANK/sub/m.safetensors"], "is not a folder"),
    ("distill.py", [*DISTILL[:-1], "BLANK/x.safetensors"], "is not a folder"),
    ("evolve.py", [*EVOLVE, "--table", "BLANK/lut.json"], "is not a folder"),
    ("evaluate.py", ["--checkpoint", "TINY", "--grid", "BLANK/grid.png"], "is not a folder"),
    ("export.py", ["--checkpoint", "TINY", "--out-dir", "BLANK"], "is not a folder"),
    ("recipe.py", ["--quick", "--work-dir", "BLANK/w"], "is not a folder"),
    ("recipe.py", ["--quick", "--report-dir", "REPORT"], "holds the report of a full run"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    tiny_pipeline().save(root / "tiny.safetensors")
    tiny_pipeline(prediction="eps").save(root / "eps.safetensors")
    import dataclasses

    from snapfusion_min.formats.checkpoint import save_checkpoint
    from snapfusion_min.vae import VAE

    save_checkpoint(root / "ae.safetensors", {"vae": VAE(TOY_VAE)}, {"vae": dataclasses.asdict(TOY_VAE),
                                                                        "latent_scale": 1.0})
    (root / "empty.safetensors").write_bytes(b"")
    (root / "truncated.safetensors").write_bytes((root / "tiny.safetensors").read_bytes()[:3000])
    (root / "random.ckpt").write_bytes(bytes(range(256)) * 40)
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(root / "foreign.safetensors"))

    class Payload:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    with open(root / "code.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, f)
    (root / "nostages.json").write_text('{"channels": [32, 64, 64, 64]}')
    (root / "blank.txt").write_text("\n  \n")
    (root / "binary.txt").write_bytes(b"ok\xff\xfe\x00")
    (root / "bombs").mkdir()
    Image.new("RGB", (8, 8)).save(root / "bombs" / "good.png")
    (root / "bombs" / "bomb.png").write_bytes(bomb_png())
    for name in ("good", "bomb"):
        (root / "bombs" / f"{name}.txt").write_text("a caption")
    (root / "unpaired").mkdir()
    with tarfile.open(root / "unpaired" / "a.tar", "w") as tar:
        for name, payload in (("000.png", b"x"), ("001.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (root / "zero").mkdir()
    (root / "zero" / "zero.tar").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo.tar")
    (root / "numbers").mkdir()
    Image.new("RGB", (8, 8)).save(root / "numbers" / "a.png")
    (root / "numbers" / "captions.jsonl").write_text('{"file": "a.png", "caption": 5}\n')
    (root / "prompts.txt").write_text("a red circle\na blue square\n")
    (root / "pipes").mkdir()
    Image.new("RGB", (8, 8)).save(root / "pipes" / "a.png")
    os.mkfifo(root / "pipes" / "b.png")
    for name in "ab":
        (root / "pipes" / f"{name}.txt").write_text("a caption")
    with open(root / "coded.safetensors.state.pt", "wb") as f:
        pickle.dump({"model": {}, "payload": Payload()}, f)
    torch.save({"step": 3, "model": {"w": torch.zeros(1000)}}, root / "cut.safetensors.state.pt")
    (root / "cut.safetensors.state.pt").write_bytes((root / "cut.safetensors.state.pt").read_bytes()[:2000])
    for name in ("mixed", "gzip", "emptytar", "noimages", "cut"):
        (root / name).mkdir()
    shutil.copyfile(root / "unpaired" / "a.tar", root / "mixed" / "a.tar")
    Image.new("RGB", (8, 8)).save(root / "mixed" / "b.png")
    (root / "gzip" / "a.tar").write_bytes(gzip.compress((root / "unpaired" / "a.tar").read_bytes()))
    (root / "emptytar" / "a.tar").write_bytes(b"")
    with tarfile.open(root / "cut" / "a.tar", "w") as tar:  # 2 samples, cut after the last member: no end blocks
        for i in range(2):
            for name, payload in ((f"{i}.png", png_bytes()), (f"{i}.txt", b"a red circle")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        end = tar.offset
    (root / "cut" / "a.tar").write_bytes((root / "cut" / "a.tar").read_bytes()[:end])
    np.savez(root / "nan.npz", mu=np.array([np.nan, 0.0]), sigma=np.eye(2))
    with safe_open(str(root / "tiny.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = {"snapfusion_min": json.dumps(json.loads(meta["snapfusion_min"]) | {"latent_scale": float("nan")})}
    save_file(tensors, str(root / "nanscale.safetensors"), metadata=meta)
    (root / "null.json").write_text(json.dumps({"images": [{"id": 1}],
                                                "annotations": [{"image_id": 1, "id": 7, "caption": None}]}))
    return root


def png_bytes() -> bytes:
    data = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(data, format="PNG")
    return data.getvalue()


def snapshot(*folders) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for folder in folders for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("script,args,message", ROWS, ids=[f"{r[0]}:{r[2][:30]}" for r in ROWS])
def test_bad_input_is_one_line_naming_it_and_changes_nothing(script, args, message, files, tmp_path, capfd,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    subs = {"TINY": files / "tiny.safetensors", "EPS": files / "eps.safetensors", "AE": files / "ae.safetensors",
            "CLIP": CLIP, "MISSING": tmp_path / "missing.safetensors", "EMPTY": files / "empty.safetensors",
            "TRUNCATED": files / "truncated.safetensors", "RANDOM": files / "random.ckpt",
            "PICKLE": files / "code.ckpt", "FOREIGN": files / "foreign.safetensors",
            "NOSTAGES": files / "nostages.json", "BLANK": files / "blank.txt", "OUT": tmp_path / "out.safetensors",
            "BINARY": files / "binary.txt", "NULLCOCO": files / "null.json", "BOMBS": files / "bombs",
            "UNPAIRED": files / "unpaired", "ZERO": files / "zero", "FIFO": files / "fifo.tar",
            "CODED": files / "coded.safetensors", "NUMBERS": files / "numbers", "PROMPTS": files / "prompts.txt",
            "PIPES": files / "pipes", "NANSCALE": files / "nanscale.safetensors", "MIXED": files / "mixed",
            "GZIP": files / "gzip", "EMPTYTAR": files / "emptytar", "CUTSTATE": files / "cut.safetensors",
            "NANSTATS": files / "nan.npz", "NOIMAGES": files / "noimages",
            "WORK": tmp_path / "work", "REPORT": ROOT / "report"}
    argv = [str(subs[a]) if a in subs else a for a in args]
    argv = [a.replace("BLANK/", f"{files / 'blank.txt'}/").replace("WORK/", f"{tmp_path / 'work'}/") for a in argv]
    before = snapshot(files, TOY, ROOT / "report")
    code = run_main(script, *argv)
    assert isinstance(code, str), f"exit code {code!r}: not refused"
    assert code.startswith(f"{script}: error: ") and message in code and "\n" not in code, code
    assert capfd.readouterr().err == ""  # nothing else on stderr: no traceback, no warnings
    assert snapshot(files, TOY, ROOT / "report") == before
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "pwned").exists()


def test_a_quick_recipe_keeps_apart_from_a_full_one(tmp_path):
    """recipe.py --quick's default folders are its own (runs/recipe-quick and the report inside it); a folder holding
    a --quick report may be written again by one, a folder with a full run's report may not (the row above)."""
    from snapfusion_min.cli.recipe_command import folders
    from snapfusion_min.experiments.report import SMOKE, full_report

    assert folders(None, None, quick=True) == ("runs/recipe-quick", "runs/recipe-quick/report")
    assert folders(None, None, quick=False) == ("runs/recipe", "report")
    assert folders("w", None, quick=True) == ("w", "w/report") and folders("w", "r", quick=True) == ("w", "r")
    assert full_report(ROOT / "report") and not full_report(tmp_path)
    (tmp_path / "README.md").write_text(f"# SnapFusion at toy scale: the report\n\n{SMOKE}\n")
    assert not full_report(tmp_path)


WARNS = [  # cases that once passed in silence: the run goes on, and says so in one line on stderr
    ("sample.py", ["--checkpoint", "TINY", "--prompt", "a red circle " * 30, "--out-dir", "WORK/s"],
     "sample.py: warning: 1 prompt(s) longer than the text encoder reads"),
    ("train.py", [*UNET, "--train-steps", "1", "--batch-size", "2", "--data", "CUT"],
     "warning: skipped a.tar: truncated: ends after 2 samples without the tar's end-of-archive blocks"),
    ("train.py", [*UNET, "--train-steps", "1", "--batch-size", "2", "--data", "BOMBS", "--skip-bad"],
     "warning: left out 1 of 2 images of"),
]


@pytest.mark.parametrize("script,args,message", WARNS, ids=[f"{r[0]}:{r[2][:40]}" for r in WARNS])
@pytest.mark.filterwarnings("default::snapfusion_min.pipeline.OutOfDomainWarning")  # pyproject ignores them
def test_a_once_silent_case_warns_in_one_line(script, args, message, files, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(warnings, "showwarning", lambda m, c, f, n, file=None, line=None:  # as Python's default:
                        sys.stderr.write(warnings.formatwarning(m, c, f, n, line)))  # not pytest's recorder
    subs = {"TINY": files / "tiny.safetensors", "CLIP": CLIP, "AE": TOY / "autoencoder.safetensors",
            "OUT": tmp_path / "out.safetensors", "CUT": files / "cut", "BOMBS": files / "bombs"}
    argv = [str(subs.get(a, a)).replace("WORK/", f"{tmp_path}/") for a in args]
    assert run_main(script, *argv) in (0, None)
    err = capfd.readouterr().err
    warned = [line for line in err.splitlines() if "warning" in line]
    assert len(warned) == 1 and message in warned[0], err
