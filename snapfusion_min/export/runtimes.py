"""Sampling from an exported ONNX folder (``export.py --to onnx``) in the CPU runtimes users pick: ONNX Runtime or
OpenVINO (fp32, or bf16 where the CPU has it). The loop is ``Pipeline``'s: our tokenizer, DDIM (Eq. 2) with CFG
(Eq. 3) from ``diffusion``; only the three networks run in the other runtime, reading the folder's
``snapfusion_min.json``. Both runtimes are optional: ``pip install 'snapfusion-min[onnx]'`` / ``'[openvino]'``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import diffusion as D
from ..pipeline import SamplerConfig, check_prompts, check_seed, override_sampler, pil_images, seeded_noise
from ..text_encoder import Tokenizer

RUNTIMES = ("onnxruntime", "openvino")
EXTRAS = {"onnxruntime": "onnx", "openvino": "openvino"}  # pyproject.toml's optional dependencies
PRECISIONS = ("fp32", "bf16")  # OpenVINO's inference precision hint; ONNX Runtime's CPU kernels are fp32
Run = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def open_file(path: str | Path, runtime: str, precision: str = "fp32", threads: int | None = None) -> Run:
    """One .onnx file in ``runtime``: feed (name -> array) -> its outputs, in order; on ``threads`` threads (default:
    torch's, so that OMP_NUM_THREADS and torch.set_num_threads hold here too). A ValueError names what is missing
    or wrong before anything runs."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if precision not in PRECISIONS or (runtime == "onnxruntime" and precision != "fp32"):
        raise ValueError(f"precision must be fp32{' or bf16' if runtime == 'openvino' else ''} with {runtime}, "
                         f"got {precision!r}")
    try:
        module = __import__(runtime)
    except ImportError:
        raise ValueError(f"{runtime} is not installed: pip install 'snapfusion-min[{EXTRAS[runtime]}]'") from None
    threads = threads or torch.get_num_threads()
    if runtime == "onnxruntime":
        options = module.SessionOptions()
        options.intra_op_num_threads = threads
        session = module.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda feed: session.run(None, feed)
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "INFERENCE_NUM_THREADS": threads}
    compiled = module.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda feed: [np.array(request.infer(feed)[out]) for out in compiled.outputs]


class RuntimePipeline:
    """The exported folder's text encoder, UNet and decoder in ``runtime``, called like ``Pipeline``:
    ``RuntimePipeline(folder)(["a red circle"], seed=0)`` -> PIL images (``output_type='pt'``: [B, 3, H, W] in
    [0, 1]); image i starts from seed + i as ``Pipeline.initial_latents`` draws it, or from ``latents``. Steps,
    guidance, spacing and solver default to the folder's JSON (the checkpoint's own) and are overridden by name."""

    def __init__(self, folder: str | Path, runtime: str = "onnxruntime", precision: str = "fp32",
                 threads: int | None = None) -> None:
        folder = Path(folder)
        sidecar = folder / "snapfusion_min.json"
        if not sidecar.is_file():
            raise FileNotFoundError(f"{folder} has no snapfusion_min.json: not a folder export.py --to onnx wrote")
        s = json.loads(sidecar.read_text())
        missing = [p for p in ("text_encoder", "unet", "decoder") if not (folder / f"{p}.onnx").is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {', '.join(f'{p}.onnx' for p in missing)}: export all three parts")
        if s["w_conditioned"] or s["keep_blocks"] or (s["shapes"] == "static" and s["unet_batch"] != 2):
            raise ValueError(f"{folder}: its UNet is not one this loop runs (CFG at batch 2, no w or keep input)")
        self.text, self.unet, self.decoder = (open_file(folder / f"{p}.onnx", runtime, precision, threads)
                                              for p in ("text_encoder", "unet", "decoder"))
        self.settings, self.source, self.prediction = s, str(folder), s["prediction"]
        self.where = f"{runtime} {precision}"
        self.sampler = SamplerConfig(steps=s["steps"], guidance=s["guidance"], spacing=s["scheduler"]["spacing"],
                                     resolution=s["resolution"])
        self.tokenizer = Tokenizer(s["tokenizer"]["context_length"])
        self.schedule = D.Schedule()

    def sampler_with(self, sampler: SamplerConfig | None = None, **overrides: object) -> SamplerConfig:
        """``sampler`` (default: the folder's) with the fields given by name replaced, as ``Pipeline.sampler_with``."""
        return override_sampler(self.sampler, sampler, **overrides)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """z_T's [C, h, w] for an image of height x width; a static export takes its own size only."""
        s, (c, _, w) = self.settings, self.settings["latent_shape"]
        f = s["resolution"] // w
        if s["shapes"] == "static" and (height, width) != (s["resolution"],) * 2:
            raise ValueError(f"{self.source} was exported with static shapes for {s['resolution']}x{s['resolution']} "
                             f"images, not {height}x{width} (export.py --shapes dynamic frees them)")
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        return c, height // f, width // f

    def __call__(self, prompts: str | list[str], sampler: SamplerConfig | None = None, *, seed: int = 0,
                 height: int | None = None, width: int | None = None, latents: torch.Tensor | None = None,
                 negative_prompt: str = "", progress: bool = False, output_type: str = "pil",
                 **overrides: object) -> list[Image.Image] | torch.Tensor:
        s = self.sampler_with(sampler, **overrides)
        prompts = check_prompts(prompts, negative_prompt)
        check_seed(seed, len(prompts))
        shape = self.latent_shape(height or s.resolution, width or s.resolution)
        z = seeded_noise(len(prompts), shape, seed) if latents is None else latents.float()
        uncond = self.encode(negative_prompt)
        images = torch.cat([self.sample(zi[None], self.encode(p), uncond, s, progress) for p, zi in zip(prompts, z)])
        return images if output_type == "pt" else pil_images(images)

    def encode(self, prompt: str) -> np.ndarray:
        return self.text({"input_ids": self.tokenizer([prompt]).numpy().astype(np.int32)})[0]

    def sample(self, z: torch.Tensor, cond: np.ndarray, uncond: np.ndarray, s: SamplerConfig,
               progress: bool) -> torch.Tensor:
        """``Pipeline.denoise`` + decode for one image, the networks in the runtime: [uncond; cond] in one batch."""
        grid = D.timesteps(s.steps, s.spacing)
        solver, states = D.Solver(s.solver, grid, self.schedule, self.prediction), np.concatenate([uncond, cond])
        for i, t in enumerate(tqdm(grid[:-1], desc="denoising", disable=not progress, leave=False)):
            out = self.unet({"sample": torch.cat([z, z]).numpy(), "timestep": np.full(2, t, np.float32),
                             "encoder_hidden_states": states})[0]
            out_uncond, out_cond = torch.from_numpy(out).float().chunk(2)
            z = solver.step(i, z, D.cfg(out_cond, out_uncond, s.guidance))
        return torch.from_numpy(self.decoder({"z": z.float().numpy()})[0]).float()
