"""train.py: exact resume and clear errors that leave the last good checkpoint intact (DDP through torchrun:
test_shards.py, whose two ranks must agree)."""

import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLIP, ROOT, run_main
from torchvision.transforms.functional import to_pil_image

from snapfusion_min import world
from snapfusion_min.arch import tiny
from snapfusion_min.evolve import Action, apply
from snapfusion_min.formats.checkpoint import save_checkpoint
from snapfusion_min.formats.images import to_tensor
from snapfusion_min.pipeline import read_pipeline
from snapfusion_min.toy.autoencoder import crop_objects, load_autoencoder, object_mask
from snapfusion_min.training import load_state
from snapfusion_min.vae import TOY_VAE, VAE, toy_vae


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_checkpoint(path, {"vae": VAE(TOY_VAE)}, {"vae": dataclasses.asdict(TOY_VAE), "latent_scale": 1.0})
    return path


def unet_args(out, autoencoder, steps=6, *extra):
    return ["unet", "--arch", "tiny", "--clip", str(CLIP), "--autoencoder", str(autoencoder), "--out", str(out),
            "--train-steps", str(steps), "--batch-size", "4", "--save-every", "100", "--device", "cpu",
            "--num-inference-steps", "2", "--keep-prob", "0.8", *extra]


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(tmp_path, autoencoder):
    assert run_main("train.py", *unet_args(tmp_path / "a.safetensors", autoencoder)) == 0  # in this process
    assert run_main("train.py", *unet_args(tmp_path / "b.safetensors", autoencoder, 6, "--stop-after", "3")) == 0
    assert load_state(str(tmp_path / "b.safetensors") + ".state.pt")["step"] == 3
    assert run_main("train.py", *unet_args(tmp_path / "b.safetensors", autoencoder, 6, "--resume")) == 0
    a, b = (load_state(str(tmp_path / f"{n}.safetensors") + ".state.pt") for n in "ab")
    assert a["step"] == b["step"] == 6 and a["losses"] == b["losses"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key  # bitwise, Eq. 5 block dropping included
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    pipe = read_pipeline(tmp_path / "b.safetensors")  # the checkpoint sample.py reads
    assert pipe.prediction == "v" and pipe.sampler.steps == 2 and pipe.training["keep_prob"] == 0.8
    assert (tmp_path / "b.safetensors.loss.png").is_file() and (tmp_path / "b.safetensors.samples.png").is_file()


@pytest.mark.slow
def test_bad_input_is_one_line_and_keeps_the_last_checkpoint(tmp_path, autoencoder, capfd):
    """In this process (``run_main``: the one-line error ``cli.run`` exits with, any traceback propagates)."""
    def refused(*args) -> str:
        code = run_main("train.py", *args)
        assert isinstance(code, str) and code.startswith("train.py: error: ") and "\n" not in code, code
        return code

    assert "no such data folder" in refused(*unet_args(tmp_path / "x.safetensors", autoencoder, 2, "--data",
                                                       str(tmp_path / "no-such-folder")))
    assert run_main("train.py", *unet_args(tmp_path / "m.safetensors", autoencoder, 2)) == 0
    other = tmp_path / "other.json"  # the tiny UNet without one block: another architecture, as cheap to build
    other.write_text(apply(tiny(32), Action("-", ("up3.A2",)))[0].to_json())
    assert "the architecture)" in refused("unet", "--arch", str(other), "--clip", str(CLIP), "--autoencoder",
                                             str(autoencoder), "--out", str(tmp_path / "m.safetensors"),
                                             "--train-steps", "4", "--resume", "--device", "cpu")
    before = (tmp_path / "m.safetensors").read_bytes()
    nan = refused(*unet_args(tmp_path / "m.safetensors", autoencoder, 50, "--lr", "1e30", "--overwrite"))
    assert "loss is nan" in nan or "loss is inf" in nan
    assert (tmp_path / "m.safetensors").read_bytes() == before  # the last good checkpoint is intact
    read_pipeline(tmp_path / "m.safetensors")
    # finite weights that diverged (lr 1e6) do not overwrite the last good checkpoint either
    diverged = refused(*unet_args(tmp_path / "m.safetensors", autoencoder, 4, "--lr", "1e6", "--save-every", "1",
                                  "--overwrite"))
    assert "the run diverged: the weights' norm grew" in diverged and "since the start (more than 3x) by step 0" \
        in diverged and f"the last good checkpoint is {tmp_path / 'm.safetensors'}" in diverged
    assert (tmp_path / "m.safetensors").read_bytes() == before
    # weights that become NaN at a save step (the loss before the update was finite) never reach disk either
    (tmp_path / ".m.safetensors.abc.tmp").write_bytes(b"half a checkpoint")  # a killed save's leftover
    nan = refused(*unet_args(tmp_path / "m.safetensors", autoencoder, 4, "--lr", "1e39", "--save-every", "1",
                             "--overwrite"))
    assert "weights are not finite after step" in nan and f"the last good checkpoint is {tmp_path / 'm.safetensors'}" \
        in nan
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert not (tmp_path / ".m.safetensors.abc.tmp").exists()  # cleaned up on the next start
    assert "Traceback" not in capfd.readouterr().err


CHANGES = [("--lr", "0.002", "lr 0.001 -> 0.002"), ("--prediction", "eps", "prediction v -> eps"),
           ("--batch-size", "2", "batch_size 4 -> 2"), ("--seed", "1", "seed 0 -> 1"),
           ("--keep-prob", "0.9", "keep_prob 0.8 -> 0.9"), ("--train-steps", "3", "train_steps 2 -> 3"),
           ("--autoencoder", "other.safetensors", "autoencoder "), ("--data", "folder", "data toy -> "),
           ("--cfg-dropout", "0.2", "cfg_dropout 0.1 -> 0.2"), ("--num-inference-steps", "3", "sampler.steps 2 -> 3")]


def test_resume_refuses_a_changed_run_naming_the_setting(tmp_path, autoencoder):
    """``--resume`` compares every setting that changes the result with the state's, one flag changed at a time;
    the run-control ones (--stop-after, --save-every) may change."""
    out = tmp_path / "m.safetensors"
    args = unet_args(out, autoencoder, 2, "--stop-after", "1")
    assert run_main("train.py", *args) == 0
    (tmp_path / "folder").mkdir()
    image, caption = world.World("train", length=1, seed=0)[0]
    to_pil_image(image.add(1).div(2)).save(tmp_path / "folder" / "a.png")
    (tmp_path / "folder" / "a.txt").write_text(caption)
    shutil.copyfile(autoencoder, tmp_path / "other.safetensors")
    state = (tmp_path / "m.safetensors.state.pt").read_bytes()
    for flag, value, named in CHANGES:
        value = str(tmp_path / value) if flag in ("--autoencoder", "--data") else value
        changed = [value if i and args[i - 1] == flag else a for i, a in enumerate(args)]
        code = run_main("train.py", *changed, *([] if flag in args else [flag, value]), "--resume")
        assert isinstance(code, str) and "is of another run (" in code and named in code and "\n" not in code, code
        assert (tmp_path / "m.safetensors.state.pt").read_bytes() == state
    for bad in (state[:len(state) // 2], b"not a torch file"):  # truncated, or anything else: one line, no traceback
        (tmp_path / "m.safetensors.state.pt").write_bytes(bad)
        code = run_main("train.py", *args, "--resume")
        assert isinstance(code, str) and "is not a readable resumable state" in code and "\n" not in code, code
    (tmp_path / "m.safetensors.state.pt").write_bytes(state)
    assert run_main("train.py", *unet_args(out, autoencoder, 2, "--save-every", "7", "--resume")) == 0


def test_one_writer_per_output(tmp_path, autoencoder):
    """A second run on an --out being written stops in one line; a fresh run over a resumable state needs --resume
    or --overwrite; a lock left by a killed run is taken over."""
    out = tmp_path / "m.safetensors"
    args = unet_args(out, autoencoder, 10**6, "--no-state")
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        while not Path(f"{out}.lock").is_file():
            assert first.poll() is None, "the first run ended before it took its lock"
            time.sleep(0.2)
        code = run_main("train.py", *unet_args(out, autoencoder, 2, "--overwrite"))
        assert isinstance(code, str) and f"is being written by another run (pid {first.pid} on " in code, code
    finally:
        first.kill()
        first.wait()
    assert Path(f"{out}.lock").is_file()  # a killed run leaves its lock: the next run takes it over
    assert run_main("train.py", *unet_args(out, autoencoder, 2)) == 0 and not Path(f"{out}.lock").exists()
    code = run_main("train.py", *unet_args(out, autoencoder, 2, "--seed", "1"))
    assert isinstance(code, str) and "holds a resumable run: --resume continues it, --overwrite starts" in code
    assert run_main("train.py", *unet_args(out, autoencoder, 2, "--seed", "1", "--overwrite")) == 0


def test_autoencoder_crops_are_grid_aligned_windows_around_each_object():
    """A crop is a window of its image on the 8-pixel latent grid holding object pixels; over many draws, both
    objects of a scene with one in each far corner are seen (a crop centred on the objects' centroid saw neither)."""
    rng = np.random.default_rng(0)
    things = (world.Thing("red", "circle", "large", "solid", (0, 0)),
              world.Thing("blue", "square", "large", "striped", (2, 2)))
    image = to_tensor(world.render(world.Scene(things, "dark"), rng))
    x = image[None].repeat(64, 1, 1, 1)
    torch.manual_seed(0)
    crops = crop_objects(x, 40, 8)
    assert crops.shape == (64, 3, 40, 40)
    mask = object_mask(image[None])[0, 0]
    ys, xs = mask.nonzero(as_tuple=True)
    objects = {"top left": (ys < 32) & (xs < 32), "bottom right": (ys >= 32) & (xs >= 32)}
    seen = set()
    for crop in crops:
        windows = [(top, left) for top in range(0, 25, 8) for left in range(0, 25, 8)
                   if torch.equal(image[:, top:top + 40, left:left + 40], crop)]
        assert windows, "a crop is not a window of its image on the 8-pixel latent grid"
        assert object_mask(crop[None]).any()
        seen |= {name for name, pixels in objects.items() for top, left in windows
                 if ((ys[pixels] >= top) & (ys[pixels] < top + 40) & (xs[pixels] >= left) & (xs[pixels] < left + 40))
                 .all()}
    assert seen == {"top left", "bottom right"}  # each whole object, in some crop


def test_the_toy_autoencoder_at_factor_4_writes_16x16_latents(tmp_path):
    """``train.py autoencoder --factor 4``: the encoder's last level left out, so a 64x64 image is a 16x16x4 latent
    and the checkpoint says so (the UNet and sampler read the factor from it)."""
    assert toy_vae(8) == TOY_VAE
    out = tmp_path / "ae4.safetensors"
    assert run_main("train.py", "autoencoder", "--factor", "4", "--train-steps", "2", "--batch-size", "4",
                    "--device", "cpu", "--out", str(out)) == 0
    vae, _ = load_autoencoder(str(out))
    assert vae.cfg.factor == 4 and vae.cfg.channels == TOY_VAE.channels[:3]
    z = vae.encode(torch.zeros(1, 3, 64, 64))
    assert z.shape == (1, 4, 16, 16) and vae.decode(z).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="factor"):
        toy_vae(2)


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_eq6_v_loss_written_out(prediction):
    """unet_training.v_loss is Eq. 6 (Eq. 1 for eps): || net(z_t, t, c) - target ||^2 with z_t = alpha_t x + sigma_t eps
    and v = alpha_t eps - sigma_t x, alpha_t^2 = prod(1 - beta) of SD's scaled-linear betas -- written here in float64
    from the paper's symbols, with the same draws of t ~ U{0..999} and eps ~ N(0, I)."""
    from types import SimpleNamespace

    from snapfusion_min.diffusion import Schedule
    from snapfusion_min.unet_training import v_loss

    def net(z, t, c):  # any function of all three inputs: the loss must feed it exactly z_t, t and c
        return torch.tanh(0.7 * z + t[:, None, None, None] / 1000.0 + c.mean(dim=(1, 2))[:, None, None, None])

    x0, context = torch.randn(6, 4, 8, 8), torch.randn(6, 5, 16)
    torch.manual_seed(3)
    loss = v_loss(SimpleNamespace(schedule=Schedule(), prediction=prediction, unet=net), x0, context)
    torch.manual_seed(3)  # the same draws, in the order v_loss makes them: t, then eps
    t = torch.randint(0, 1000, (6,))
    eps = torch.randn_like(x0)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t][:, None, None, None]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x, e = x0.double(), eps.double()
    z = alpha * x + sigma * e
    target = alpha * e - sigma * x if prediction == "v" else e
    expected = ((net(z.float(), t, context).double() - target) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0.05 < expected.item() < 5  # a loss of ordinary size: the comparison above is not between two zeros


@pytest.mark.parametrize("native", [True, False], ids=["bf16", "fp16"])
def test_amp_loss_equals_the_float32_loss_to_its_precision(native, tmp_path, autoencoder, monkeypatch):
    """--amp: the forward pass under autocast -- bfloat16 on a CPU with native bf16, else float16 with a gradient
    scaler (whose state the resumable state keeps) -- gives step 0's loss (same batch, same noise) within its
    precision of the float32 loss, but not bit for bit (autocast ran); the weights stay float32."""
    from snapfusion_min import pipeline

    monkeypatch.setattr(pipeline, "native_bf16", lambda: native)
    for name, extra in (("fp32", ()), ("amp", ("--amp",))):
        assert run_main("train.py", *unet_args(tmp_path / f"{name}.safetensors", autoencoder, 1, *extra)) == 0
    ref, amp = (load_state(str(tmp_path / f"{n}.safetensors") + ".state.pt") for n in ("fp32", "amp"))
    assert ref["losses"][0] != amp["losses"][0]
    assert amp["losses"][0] == pytest.approx(ref["losses"][0], rel=2e-2 if native else 2e-3)
    assert all(v.dtype == torch.float32 for v in amp["model"].values() if v.is_floating_point())
    assert bool(amp["scaler"]) == (not native) and not ref["scaler"]  # float16's loss scale, kept for --resume
