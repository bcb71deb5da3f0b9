"""ONNX export: the text encoder, the UNet of any architecture spec (blocks removed as in Fig. 5, a w-conditioned
student) and the (pruned) decoder as ``.onnx`` files, the door to ONNX Runtime, OpenVINO and a browser tab.

Each part is the module ``parts`` traces for Core ML (our layout), written through torch's TorchScript-based
exporter, opset 17: fp32, shapes fixed to the example inputs or, with ``dynamic``, batch and latent size left free.
Beside the files, ``snapfusion_min.json`` says what a runtime must know to sample: the prediction type, the
scheduler and its timestep grid, guidance, latent scale, the blocks removed and the tokenizer's files
(``vocab.json``, ``merges.txt``: CLIP's BPE). ``check`` runs each file in ONNX Runtime against torch on the same
inputs. ``onnx`` and ``onnxruntime`` are an optional extra (``pip install '.[onnx]'``); sampling never needs them.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import diffusion as D
from ..formats.checkpoint import atomic_write, full_disk_said
from ..pipeline import Pipeline
from ..text_encoder import EOT, SOT, write_bpe_files
from .parts import Package, packages, sampling_settings

SHAPES = ("static", "dynamic")  # dynamic: batch and latent height / width are inputs' free dimensions
OPSET = 17
MAX_RELATIVE_ERROR = 1e-4  # fp32: ONNX Runtime's outputs vs torch's, max |difference| / max |torch|
FREE_AXES = {"input_ids": {0: "batch"}, "sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
             "encoder_hidden_states": {0: "batch"}, "guidance": {0: "batch"}, "keep": {},
             "z": {0: "batch", 2: "height", 3: "width"}}
OUT_AXES = {"last_hidden_state": {0: "batch"}, "v_pred": FREE_AXES["sample"], "noise_pred": FREE_AXES["sample"],
            "image": {0: "batch", 2: "image_height", 3: "image_width"}}


def load_onnxruntime():  # noqa: ANN201
    """onnxruntime; ValueError naming the extra if onnx or onnxruntime is not installed."""
    try:
        import onnx  # noqa: F401  # torch's exporter writes through it
        import onnxruntime
    except ImportError:
        raise ValueError("ONNX export needs onnx and onnxruntime: pip install 'snapfusion-min[onnx]'") from None
    return onnxruntime


def runtime_settings(pipe: Pipeline, resolution: int, batch: int, shapes: str, gated: bool = False) -> dict:
    """What a runtime needs to sample: ``parts.sampling_settings`` plus the sampler's timestep grid, SD's
    abar_t for every training timestep (so that DDIM needs no schedule code), the removed blocks, the blocks a
    keep input weighs, in order, and the tokenizer's files."""
    return {**sampling_settings(pipe, resolution, batch), "format": "onnx", "opset": OPSET, "shapes": shapes,
            "keep_blocks": pipe.unet.spec.addresses() if gated else None,
            "latent_shape": [pipe.unet.spec.in_channels, *[resolution // pipe.vae.cfg.factor] * 2],
            "timesteps": D.timesteps(pipe.sampler.steps, pipe.sampler.spacing),
            "alphas_cumprod": [round(a, 8) for a in pipe.schedule.alphas_cumprod.tolist()],
            "removed_blocks": sorted(pipe.unet.removed),
            "tokenizer": {"vocab": "vocab.json", "merges": "merges.txt", "sot": SOT, "eot": EOT, "pad": EOT,
                          "context_length": pipe.text_encoder.cfg.context_length}}


def write_onnx(pkg: Package, path: Path, dynamic: bool) -> float:
    """Trace one package beside ``path``, run it in ONNX Runtime against torch on its example inputs, then rename it
    into place (no half-written file). Returns the largest relative error of its outputs."""
    tmp = path.with_name(f".{path.name}.partial")
    axes = {n: FREE_AXES[n] for n in pkg.inputs} | {n: OUT_AXES[n] for n in pkg.outputs} if dynamic else None
    try:
        with torch.no_grad(), warnings.catch_warnings(), full_disk_said(path.parent, path.name):
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter's (docs/export.md)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(pkg.module.eval(), tuple(pkg.inputs.values()), str(tmp), input_names=list(pkg.inputs),
                              output_names=pkg.outputs, dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        error = run_error(pkg, tmp, pkg.inputs)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return error


def export_onnx(pipe: Pipeline, out: Path, parts: list[str], *, resolution: int, batch: int = 2,
                shapes: str = "static", gated: bool = False, log: bool = True) -> dict[str, dict]:
    """One ``<part>.onnx`` per part, the tokenizer's files and ``snapfusion_min.json`` (the settings, and per file
    its size, time, shapes and relative error against torch). With ``gated`` the UNet takes a keep input, one
    weight per block (``parts.GatedUNetPart``). Returns those rows by part."""
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {', '.join(SHAPES)}, got {shapes!r}")
    load_onnxruntime()
    pipe.unet.to(memory_format=torch.contiguous_format)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for part in parts:
        (pkg,) = packages(pipe, part, resolution, batch, gated=gated)
        start, path = time.perf_counter(), out / f"{pkg.name}.onnx"
        replaced = path.exists()
        error = write_onnx(pkg, path, shapes == "dynamic")
        rows[part] = {"file": path.name, "bytes": path.stat().st_size, "seconds": round(time.perf_counter() - start, 1),
                      "inputs": {n: list(x.shape) for n, x in pkg.inputs.items()}, "outputs": pkg.outputs,
                      "max_relative_error": error, **({"replaced": True} if replaced else {})}
        if log:
            print(f"{path.name}: {rows[part]['bytes'] / 1e6:.1f} MB, {rows[part]['seconds']:.1f} s, ONNX Runtime vs "
                  f"torch: {error:.1e} relative" + (" (replaced the earlier one)" if replaced else ""), file=sys.stderr)
    write_bpe_files(out)
    sidecar = out / "snapfusion_min.json"  # a second export into the folder (e.g. a pruned decoder) adds its rows
    earlier = json.loads(sidecar.read_text()).get("files", {}) if sidecar.exists() else {}
    files = {**{k: v for k, v in earlier.items() if (out / v["file"]).exists()}, **rows}
    meta = {**runtime_settings(pipe, resolution, batch, shapes, gated), "files": files}
    atomic_write(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    return rows


def relative_error(got: np.ndarray, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (want's scale; 1e-12 floors an all-zero reference)."""
    w = want.double().numpy()
    return float(np.abs(got.astype(np.float64) - w).max() / max(np.abs(w).max(), 1e-12))


def run_error(pkg: Package, path: Path, inputs: dict[str, torch.Tensor]) -> float:
    """``path`` in ONNX Runtime (CPU) vs ``pkg``'s torch module on the same inputs: the largest relative error of
    its outputs."""
    ort = load_onnxruntime()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: x.numpy() for n, x in inputs.items()})
    with torch.no_grad():
        want = pkg.module.eval()(*inputs.values())
    want = want if isinstance(want, tuple) else (want,)
    return max(relative_error(g, w) for g, w in zip(got, want))


def check(pipe: Pipeline, out: Path, part: str, inputs: dict[str, torch.Tensor], resolution: int,
          batch: int = 2, gated: bool = False) -> float:
    """An exported part (``<out>/<part>.onnx``) on other inputs than it was traced with (a dynamic file's other
    batch or size, a gated UNet's other keep): its largest relative error against torch."""
    (pkg,) = packages(pipe, part, resolution, batch, gated=gated)
    return run_error(pkg, out / f"{pkg.name}.onnx", inputs)
