"""The browser page (web/index.html) in a real browser: headless Chromium, driven by playwright-core (web/'s npm
dev dependency) through tests/browser_driver.mjs, loads the page from a local static server with the models
``make web`` exports. It must load with no console error, draw the teacher's, the student's and the robust UNet's
images, each within PSNR 35 dB of the Python pipeline's from the same z_T (export/web.py's portable noise), and an
unticked block must change the robust image into the Python pipeline's with that block removed (Eq. 5).

Skipped, in one line with the reason, where Chromium, node or web/'s npm packages (``make web-deps``) are missing.
"""

import functools
import http.server
import json
import math
import shutil
import subprocess
import threading

import numpy as np
import pytest
import torch
from helpers import ROOT

from snapfusion_min.cli import export_command
from snapfusion_min.export.web import portable_noise
from snapfusion_min.pipeline import read_pipeline

WEB, TOY = ROOT / "web", ROOT / "models" / "toy"
PAGE_MODELS = {"teacher": (TOY / "model.safetensors", []),
               "student": (TOY / "student.safetensors", ["--parts", "unet"]),
               "robust": (TOY / "robust.safetensors", ["--parts", "unet", "--keep-input"])}  # as make web's
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
NODE = shutil.which("node")
MISSING = ("Chromium is not installed" if CHROMIUM is None else "node is not installed" if NODE is None
           else "web/'s npm packages are missing (make web-deps)"
           if not (WEB / "node_modules" / "playwright-core").is_dir() or not (WEB / "vendor").is_dir() else None)
if MISSING:  # one line in make test's summary, for the whole file
    pytest.skip(f"browser tests skipped: {MISSING}", allow_module_level=True)
pytestmark = pytest.mark.slow
UNTICK = "down2.A0"  # one of Fig. 5's blocks: it changes the image by ~23 dB (mid.A0 by ~90: robust training)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A copy of web/ with the page's models exported into it, served on a free localhost port."""
    root = tmp_path_factory.mktemp("web")
    for name in ("index.html", "sampler.js", "vendor"):
        (root / name).symlink_to(WEB / name)
    for name, (checkpoint, flags) in PAGE_MODELS.items():
        export_command.main(["--to", "onnx", "--checkpoint", str(checkpoint), "--out-dir", str(root / "models" / name),
                             *flags])
    shutil.copy(ROOT / "report" / "fig2_latency.png", root / "models" / "latency.png")
    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # the server's request lines are not the test's output
        pass


@pytest.fixture(scope="module")
def page(site):
    """What the driver saw: console errors, status, the form, pixels of each image, the robust one after UNTICK."""
    r = subprocess.run([NODE, str(ROOT / "tests" / "browser_driver.mjs")], capture_output=True, text=True,
                       input=json.dumps({"url": site, "chromium": CHROMIUM, "webDir": str(WEB), "untick": UNTICK,
                                         "timeoutMs": 600_000}))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def pixels(seen: dict) -> np.ndarray:
    rgba = np.array(seen["rgba"], dtype=np.uint8).reshape(-1, seen["width"], 4)
    return rgba[..., :3]


def python_image(name: str, form: dict, steps: int | None = None, removed: frozenset = frozenset()) -> np.ndarray:
    """The Python pipeline's image for the page's form, from the page's z_T, as 8-bit RGB."""
    pipe = read_pipeline(PAGE_MODELS[name][0])
    pipe.unet.removed = set(removed)
    z = portable_noise(int(form["seed"]), (pipe.unet.spec.in_channels, *[pipe.sampler.resolution
                                                                          // pipe.vae.cfg.factor] * 2))
    image = pipe(form["prompt"], steps=steps, guidance=float(form["guidance"]), latents=z[None], output_type="pt")
    return (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def test_page_loads_without_a_console_error_and_draws_all_three(page):
    assert page["status"] == "done", page["status"]
    assert page["console"] == [] and page["errors"] == [], (page["console"], page["errors"])
    for name in ("teacher", "student", "robust"):
        image = pixels(page[name])
        assert image.shape == (64, 64, 3) and image.std() > 10, name  # drawn, not blank
    assert page["strip"] == int(page["form"]["steps"])  # an x-hat a step
    assert UNTICK in page["blocks"]


@pytest.mark.parametrize("name", ["teacher", "student", "robust"])
def test_each_image_is_the_python_pipelines(page, name):
    steps = int(page["form"]["steps"]) if name == "teacher" else None  # the others: their checkpoints' own
    got, want = pixels(page[name]), python_image(name, page["form"], steps)
    assert psnr(got, want) >= 35, (name, psnr(got, want))
    assert f"{steps or read_pipeline(PAGE_MODELS[name][0]).sampler.steps} " in page[name]["caption"]


def test_an_unticked_block_gives_the_python_pipelines_image_without_it(page):
    assert page["toggledStatus"] == "done"
    before, after = pixels(page["robust"]), pixels(page["toggled"])
    assert psnr(before, after) < 30  # the block mattered
    want = python_image("robust", page["form"], removed=frozenset({UNTICK}))
    assert psnr(after, want) >= 35, psnr(after, want)
