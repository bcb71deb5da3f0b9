"""sample.py as a user runs it: PNGs with metadata, and one-line errors (no traceback) for a user's mistakes."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import randomize
from PIL import Image

from snapfusion_min.arch import tiny
from snapfusion_min.pipeline import Pipeline
from snapfusion_min.text_encoder import TextConfig, TextEncoder
from snapfusion_min.unet import UNet
from snapfusion_min.vae import VAE, VAEConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    vae = VAE(VAEConfig(channels=(32, 64, 64, 64), decoder_channels=(64, 64, 64, 32), groups=8))
    pipe = Pipeline(randomize(UNet(tiny())), randomize(vae), randomize(TextEncoder(TextConfig(32, 2, 4))), "v",
                    sampler={"steps": 3, "guidance": 4.0, "spacing": "trailing", "resolution": 32})
    pipe.save(path)
    return path


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_sample_writes_pngs_with_metadata(tmp_path, tiny_checkpoint):
    r = run("--checkpoint", str(tiny_checkpoint), "--prompt", "a red circle", "--prompt", "a blue square",
            "--batch-size", "1", "--seed", "3", "--out", str(tmp_path / "out"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files] == ["0000-a-red-circle.png", "0001-a-blue-square.png"]
    image = Image.open(files[1])
    assert image.size == (32, 32)  # the checkpoint's own resolution and sampler defaults
    assert image.text["prompt"] == "a blue square" and image.text["seed"] == "4" and image.text["steps"] == "3"
    assert image.text["spacing"] == "trailing" and image.text["checkpoint"] == str(tiny_checkpoint)
    again = run("--checkpoint", str(tiny_checkpoint), "--prompt", "a blue square", "--seed", "4",
                "--out", str(tmp_path / "again"), "--device", "cpu")
    assert again.returncode == 0, again.stderr
    assert Image.open(tmp_path / "again" / "0000-a-blue-square.png").tobytes() == image.tobytes()  # same seed


@pytest.mark.parametrize("args,message", [
    (["--height", "60"], "multiples of 8"),
    (["--steps", "0"], "--steps must be positive"),
    (["--prompts-file", "EMPTY"], "has no prompts"),
    (["--checkpoint", "CORRUPT"], "not a readable .safetensors file"),
    (["--checkpoint", "PICKLE"], "refused to unpickle"),
    (["--checkpoint", "missing.ckpt"], "no such checkpoint"),
])
def test_user_mistakes_get_one_line(tmp_path, tiny_checkpoint, args, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "corrupt.safetensors").write_bytes(tiny_checkpoint.read_bytes()[:5000])
    (tmp_path / "code.ckpt").write_bytes(b"\x80\x04cos\nsystem\n(S'echo hi'\ntR.")
    subs = {"EMPTY": str(tmp_path / "empty.txt"), "CORRUPT": str(tmp_path / "corrupt.safetensors"),
            "PICKLE": str(tmp_path / "code.ckpt")}
    args = [subs.get(a, a) for a in args]
    base = ["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--out", str(tmp_path / "o")]
    r = run(*base, *args, cwd=tmp_path)
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_help():
    r = run("--help")
    assert r.returncode == 0 and "--checkpoint" in r.stdout and "--negative-prompt" in r.stdout
