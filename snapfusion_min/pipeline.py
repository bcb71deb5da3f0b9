"""Text -> image: tokenizer, text encoder, UNet with DDIM and classifier-free guidance, VAE decoder (Fig. 3, left).

``load_pipeline(path)`` reads an SD-v1.5 single file (.safetensors / .ckpt), a diffusers folder, or one of our own
checkpoints, and gives a ``Pipeline`` on the best device here (as the commands do; ``read_pipeline``: float32 on the
CPU) whose parts can also be called one by one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import platform
import re
import subprocess
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import diffusion as D
from .arch import ArchSpec, sd15
from .formats.checkpoint import positive_number, read_meta, read_state_dict, regular_file, save_checkpoint
from .formats.weights import CheckpointError, apply_map, load_diffusers, load_ldm, unet_stages
from .text_encoder import TextConfig, TextEncoder, Tokenizer
from .unet import UNet
from .vae import VAE, VAE_SCALE, VAEConfig
from .world import unknown_words

PREDICTIONS = ("eps", "v")


class OutOfDomainWarning(UserWarning):
    """A request the checkpoint was not trained for: words a toy model never saw, or another resolution."""


@dataclass(frozen=True)
class SamplerConfig:
    """How a pipeline samples unless told otherwise; saved in checkpoints (defaults: SD-v1.5's)."""

    steps: int = 50  # DDIM steps (Eq. 2); a distilled student: its own N
    guidance: float = 7.5  # CFG scale w (Eq. 3); 1 = no guidance
    spacing: str = "leading"  # timestep grid: 'leading' (SD-v1.5) or 'trailing' (students, App. D)
    solver: str = "ddim"  # the sampler: 'ddim' (Eq. 2), 'dpm' or 'dpm++' (DPM-Solver-2, DPM-Solver++(2M))
    resolution: int = 512  # image side the model was trained at
    distilled: bool = False  # a step-distilled student: it samples at its own steps only

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and 1 <= self.steps <= D.TRAIN_STEPS):
            raise ValueError(f"steps must be a positive integer, at most {D.TRAIN_STEPS}, got {self.steps!r}")
        if not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance) and self.guidance >= 1):
            raise ValueError(f"guidance must be a finite number >= 1 (1 = no guidance), got {self.guidance!r}")
        if self.spacing not in D.SPACINGS:
            raise ValueError(f"spacing must be one of {D.SPACINGS}, got {self.spacing!r}")
        if self.solver not in D.SOLVERS:
            raise ValueError(f"sampler must be one of {D.SOLVERS}, got {self.solver!r}")
        if not (isinstance(self.resolution, int) and self.resolution >= 8):
            raise ValueError(f"resolution must be an integer >= 8, got {self.resolution!r}")


DIFFUSERS_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}  # diffusers' call -> SamplerConfig


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if present, else mps, else cpu; a named device must exist here (ValueError otherwise)."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps") from None
        cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and (device.index or 0) >= cuda:
            raise ValueError(f"device {name!r}: {cuda} CUDA device(s) on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r}: MPS is not available on this machine")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device {name!r}: choose auto, cpu, cuda, cuda:N or mps")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    if (driver := nvidia_driver()) is not None:
        warn_unusable_gpu(driver)
    return torch.device("cpu")


@functools.cache
def warn_unusable_gpu(driver: str) -> None:
    """Once a process: a GPU is here but this torch cannot use it (a command picks its device more than once)."""
    build = "built without CUDA" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    warnings.warn(f"an NVIDIA GPU is here (driver {driver}) but this torch {torch.__version__} cannot use it "
                  f"({build}; a driver older than that CUDA needs another build: README, 'Install'); running on "
                  "the CPU", UserWarning, stacklevel=3)


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version if this (Linux) machine has one loaded ('unknown' if it cannot be read), else
    None."""
    version = Path("/proc/driver/nvidia/version")
    if not version.exists() and not Path("/dev/nvidia0").exists():
        return None
    try:
        found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9.]+)", version.read_text())
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


@functools.cache
def native_bf16() -> bool:
    """Does this CPU compute bfloat16 natively: x86 AVX512-BF16 or AMX, or ARM's BF16 extension (Linux: the flags
    of /proc/cpuinfo; macOS: sysctl)? Without it, bf16 on the CPU is emulated and slower than fp32."""
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() == "1"
        except (OSError, subprocess.SubprocessError):
            return False
    try:
        return bf16_in_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def bf16_in_cpuinfo(text: str) -> bool:
    """Linux's /proc/cpuinfo lists native bf16: x86 flags avx512_bf16 / amx_bf16, ARM feature bf16."""
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", text) is not None


def auto_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """--dtype auto: float16 on an accelerator; on the CPU bfloat16 where it is native, else float32; and why."""
    if device.type != "cpu":
        return torch.float16, "auto: float16 on an accelerator"
    if native_bf16():
        return torch.bfloat16, "auto: this CPU computes bfloat16 natively"
    return torch.float32, "auto: no native bfloat16 on this CPU"


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> ``auto_dtype``: float16 on accelerators; on the CPU bfloat16 where native, else float32."""
    if name == "auto":
        return auto_dtype(device)[0]
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(dtypes)}")
    return dtypes[name]


class Pipeline:
    """The four parts of SD plus the sampler settings they were trained for."""

    def __init__(self, unet: UNet, vae: VAE, text_encoder: TextEncoder, *, prediction: str = "eps",
                 latent_scale: float = VAE_SCALE, source: str = "", sampler: SamplerConfig | None = None,
                 training: dict | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder.eval()
        self.tokenizer = Tokenizer(text_encoder.cfg.context_length)
        self.prediction, self.latent_scale, self.source = prediction, latent_scale, source
        self.schedule = D.Schedule()
        self.sampler = sampler or SamplerConfig()  # what __call__ and sample.py use unless told otherwise
        self.training = training or {}  # the stage config that made the weights, saved in checkpoints

    def with_parts(self, **changes: object) -> Pipeline:
        """A new pipeline sharing this one's parts but for ``changes`` (unet, vae, sampler, training, ...)."""
        kw = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, "prediction": self.prediction,
              "latent_scale": self.latent_scale, "source": self.source, "sampler": self.sampler,
              "training": self.training}
        return Pipeline(**{**kw, **changes})  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device=device, dtype=dtype)
        self.unet.to(memory_format=torch.channels_last)  # faster convolutions; see UNet.memory_format
        return self

    def config(self) -> dict:
        """What a checkpoint stores next to the weights."""
        return {"arch": json.loads(self.unet.spec.to_json()), "prediction": self.prediction,
                "latent_scale": self.latent_scale, "vae": dataclasses.asdict(self.vae.cfg),
                "text": dataclasses.asdict(self.text_encoder.cfg), "sampler": dataclasses.asdict(self.sampler),
                **({"training": self.training} if self.training else {})}

    def save(self, path: str | Path) -> None:
        """One .safetensors file (``export.diffusers_folder.save_diffusers`` writes a diffusers folder)."""
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or a path, got {type(path).__name__}")
        if Path(path).is_dir():
            raise ValueError(f"path {path} is a folder: save writes one .safetensors file (a diffusers folder: "
                             "snapfusion_min.export.diffusers_folder.save_diffusers)")
        save_checkpoint(path, {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder},
                        self.config())

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """c = E(prompt): [B, 77, width]."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device)).to(self.dtype)

    @torch.no_grad()
    def denoise(self, z: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None, steps: int,
                guidance: float, spacing: str = "leading", progress: bool = False,
                solver: str = "ddim") -> torch.Tensor:
        """From z_T to the final latent by the solver (DDIM, Eq. 2, or DPM-Solver), CFG (Eq. 3) if guidance > 1,
        [uncond; cond] in one batch. A w-conditioned UNet (Meng et al.) gives the guided output in one conditional
        pass with w as an input: no unconditional half."""
        grid = D.timesteps(steps, spacing)
        sampler = D.Solver(solver, grid, self.schedule, self.prediction)
        w_input = bool(self.unet.spec.guidance_embed)
        use_cfg = guidance > 1.0 and uncond is not None and not w_input
        ctx, w = (torch.cat([uncond, context]) if use_cfg else context), ({"w": guidance} if w_input else {})
        for i, t in enumerate(tqdm(grid[:-1], desc="denoising", disable=not progress, leave=False)):
            out = self.unet(torch.cat([z, z]) if use_cfg else z, t, ctx, **w)
            if use_cfg:
                out_uncond, out_cond = out.chunk(2)
                out = D.cfg(out_cond, out_uncond, guidance)
            z = sampler.step(i, z, out)
        return z

    def set_decoder(self, vae: VAE, latent_scale: float) -> None:
        """Decode with another (e.g. pruned, §3.2) autoencoder; it must read this pipeline's latents."""
        mine = (self.vae.cfg.latent_channels, self.vae.cfg.factor, round(self.latent_scale, 6))
        theirs = (vae.cfg.latent_channels, vae.cfg.factor, round(latent_scale, 6))
        if mine != theirs:
            raise ValueError(f"decoder reads latents with (channels, factor, scale) = {theirs}, the pipeline makes "
                             f"{mine}")
        self.vae = vae.to(self.device, self.dtype).eval()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image in [0, 1]."""
        return (self.vae.decode(z / self.latent_scale).float() / 2 + 0.5).clamp(0, 1)

    def warn_out_of_domain(self, prompts: list[str], height: int, width: int) -> None:
        """One line (an ``OutOfDomainWarning``) when a toy-world model gets words outside its captions' grammar, any
        model a prompt longer than its text encoder reads (cut, as SD's tokenizer does), or a resolution other than the
        one it was trained at: it will draw, but nothing it learned."""
        if self.training.get("data") == "toy":
            unknown = list(dict.fromkeys(w for p in prompts for w in unknown_words(p)))
            if unknown:
                warnings.warn(f"words a toy-world model has never seen: {', '.join(unknown)} (its captions read like "
                              "'a small red striped circle at the top left and a blue square on a dark background')",
                              OutOfDomainWarning, stacklevel=3)
        room = self.tokenizer.context_length - 2  # start and end tokens
        cut = [(len(ids), p) for p in prompts if len(ids := self.tokenizer.bpe.encode(p)) > room]
        if cut:
            warnings.warn(f"{len(cut)} prompt(s) longer than the text encoder reads ({cut[0][0]} tokens, e.g. "
                          f"{cut[0][1][:40]!r}...): cut to its first {room}", OutOfDomainWarning, stacklevel=3)
        side = self.sampler.resolution
        if (height, width) != (side, side):
            warnings.warn(f"sampling at {height}x{width}, but the checkpoint was trained at {side}x{side}",
                          OutOfDomainWarning, stacklevel=3)

    def initial_latents(self, n: int, height: int, width: int, seed: int) -> torch.Tensor:
        """z_T ~ N(0, I); image i uses seed + i on a CPU generator, so images do not depend on batch or device."""
        f = self.vae.cfg.factor
        return seeded_noise(n, (self.unet.spec.in_channels, height // f, width // f), seed).to(self.device, self.dtype)

    def sampler_with(self, sampler: SamplerConfig | None = None, **overrides: object) -> SamplerConfig:
        """``sampler`` (default: ``self.sampler``, what the checkpoint was trained for) with the fields given by name
        and not None replaced: ``sampler_with(steps=4, guidance=7.5)``, or in diffusers' words (``DIFFUSERS_NAMES``,
        as the commands' flags accept them): ``num_inference_steps=4, guidance_scale=7.5``."""
        return override_sampler(self.sampler, sampler, **overrides)

    def __call__(self, prompts: str | list[str], sampler: SamplerConfig | None = None, *, seed: int = 0,
                 height: int | None = None, width: int | None = None, latents: torch.Tensor | None = None,
                 negative_prompt: str = "", num_images_per_prompt: int = 1, progress: bool = False,
                 output_type: str = "pil", **overrides: object) -> list[Image.Image] | torch.Tensor:
        """Prompts -> images (PIL, or with output_type='pt' a float tensor [B, 3, H, W] in [0, 1]).

        How: ``sampler`` (default ``self.sampler``: what the checkpoint was trained for), with any of its fields
        overridden by name -- ``pipe(prompts, steps=20, guidance=7.5, spacing="leading", solver="dpm++")``, or as
        diffusers spells them, ``num_inference_steps=20, guidance_scale=7.5`` (see ``sampler_with``); height and
        width default to its resolution. With ``num_images_per_prompt`` n, each prompt is repeated n times in place
        (p0, p0, p1, p1, ...); image i of that list starts from seed + i.
        """
        s = self.sampler_with(sampler, **overrides)
        steps, guidance, spacing = s.steps, s.guidance, s.spacing
        height, width = (s.resolution if v is None else v for v in (height, width))
        if not (isinstance(num_images_per_prompt, int) and num_images_per_prompt >= 1):
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        prompts = [p for p in check_prompts(prompts, negative_prompt) for _ in range(num_images_per_prompt)]
        check_seed(seed, len(prompts))
        f = self.vae.cfg.factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        if not prompts:
            raise ValueError("no prompts given")
        self.warn_out_of_domain([*prompts, negative_prompt], height, width)
        if negative_prompt and self.unet.spec.guidance_embed:
            warnings.warn("a w-conditioned UNet makes no unconditional pass: the negative prompt is not used",
                          UserWarning, stacklevel=2)
        z = self.initial_latents(len(prompts), height, width, seed) if latents is None else latents.to(
            self.device, self.dtype)
        context = self.encode_prompts(prompts)
        uncond = (self.encode_prompts([negative_prompt] * len(prompts))
                  if guidance > 1.0 and not self.unet.spec.guidance_embed else None)
        z = self.denoise(z, context, uncond, steps, guidance, spacing, progress, s.solver)
        if not torch.isfinite(z).all():
            raise FloatingPointError("the sampled latents are not finite: the UNet's weights hold NaN or inf, or the "
                                     "guidance scale overflows")
        images = self.decode(z)
        if output_type == "pt":
            return images
        return pil_images(images)


def check_prompts(prompts: object, negative_prompt: object = "") -> list[str]:
    """``prompts`` (a string, or any iterable of strings) as a list; a TypeError naming the argument otherwise."""
    if isinstance(prompts, str):
        listed = [prompts]
    elif isinstance(prompts, Iterable) and not isinstance(prompts, (bytes, dict)):
        listed = list(prompts)
    else:
        listed = None
    if listed is None or not all(isinstance(p, str) for p in listed):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}"
                        + ("" if listed is None else " holding other things"))
    if not isinstance(negative_prompt, str):
        raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
    return listed


def override_sampler(base: SamplerConfig, sampler: SamplerConfig | None = None, **overrides: object) -> SamplerConfig:
    """``Pipeline.sampler_with`` on ``base``: ``sampler`` (default ``base``) with the fields given and not None
    replaced, in our names or diffusers' (``DIFFUSERS_NAMES``)."""
    for theirs, ours in DIFFUSERS_NAMES.items():
        if theirs in overrides:
            if overrides.get(ours) is not None:
                raise TypeError(f"{theirs} and {ours} name the same setting: give one")
            overrides[ours] = overrides.pop(theirs)
    fields = [f.name for f in dataclasses.fields(SamplerConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}: a sampler override is one of {fields}")
    return dataclasses.replace(sampler or base, **{k: v for k, v in overrides.items() if v is not None})


def seeded_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """n draws of N(0, I) of ``shape``, draw i from seed + i on a CPU generator: the same whatever the batch or device
    (``Pipeline.initial_latents``, and the other runtimes' z_T)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


def pil_images(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> 8-bit PIL images (rounded)."""
    arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def check_seed(seed: object, n: int) -> None:
    """Image i starts from seed + i on a torch generator, which takes 64-bit seeds: -2**63 <= seed + i < 2**63."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # numpy's integers too
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not -(2**63) <= seed <= 2**63 - n:
        raise ValueError(f"seed must be in [-2**63, 2**63 - {n}] for {n} image{'s' if n > 1 else ''}, got {seed}")


def random_pipeline(spec: ArchSpec, vae_cfg: VAEConfig | None = None, text_cfg: TextConfig | None = None,
                    **kw: object) -> Pipeline:
    """A pipeline of the given shapes with freshly initialised weights (SD-v1.5's VAE and text encoder by default):
    for timing, conversion and tests, where shapes are what count."""
    return Pipeline(UNet(spec), VAE(vae_cfg or VAEConfig()), TextEncoder(text_cfg or TextConfig()), **kw)


# ---- loading ----------------------------------------------------------------------------------------------------
def _build(spec: ArchSpec, vae_cfg: VAEConfig, text_cfg: TextConfig) -> tuple[UNet, VAE, TextEncoder]:
    """Empty models on the meta device: loading assigns real tensors, so no time goes into random init."""
    with torch.device("meta"):
        return UNet(spec), VAE(vae_cfg), TextEncoder(text_cfg)


def _from_own(path: Path, meta: dict) -> Pipeline:
    if "arch" not in meta:
        what = "an autoencoder" if "vae" in meta else "a partial"
        raise CheckpointError(f"{path}: {what} checkpoint of snapfusion_min (no UNet), not a pipeline")
    try:
        spec = ArchSpec.from_json(meta["arch"])
        unet, vae, te = _build(spec, VAEConfig(**meta["vae"]), TextConfig(**meta["text"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad snapfusion_min config ({e})") from None
    state = read_state_dict(path)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        apply_map(module, part, lambda k: [k], f"{path.name}: {name}")
    try:
        sampler = SamplerConfig(**meta.get("sampler", {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad sampler config ({e})") from None
    scale = positive_number(path, "latent scale", meta.get("latent_scale", VAE_SCALE))
    return Pipeline(unet, vae, te, prediction=meta["prediction"], latent_scale=scale,
                    source=str(path), sampler=sampler, training=meta.get("training"))


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: missing or unreadable config ({e})") from None


def _weights_file(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                 "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file found")


def _from_diffusers(folder: Path) -> Pipeline:
    u, v, t = (_json(folder / part / "config.json") for part in ("unet", "vae", "text_encoder"))
    heads = u.get("attention_head_dim", 8)  # SD-v1's 'attention_head_dim' is really the number of heads
    stages = unet_stages(u.get("down_block_types"), u.get("up_block_types"))
    if None in stages.values():
        raise CheckpointError(f"{folder / 'unet'}: block types {u.get('down_block_types')} / "
                              f"{u.get('up_block_types')} are not SD-v1.5's stages with or without cross-attention")
    spec = dataclasses.replace(sd15(), stages=stages, channels=tuple(u["block_out_channels"]),
                               context_dim=u["cross_attention_dim"],
                               heads=heads if isinstance(heads, int) else heads[0], groups=u.get("norm_num_groups", 32),
                               in_channels=u.get("in_channels", 4), out_channels=u.get("out_channels", 4),
                               guidance_embed=u.get("time_cond_proj_dim") or 0)
    vc = list(v["block_out_channels"])
    vae_cfg = VAEConfig(channels=tuple(vc), decoder_channels=tuple(reversed(vc)), layers=v.get("layers_per_block", 2),
                        latent_channels=v.get("latent_channels", 4), groups=v.get("norm_num_groups", 32))
    text_cfg = TextConfig(width=t["hidden_size"], layers=t["num_hidden_layers"], heads=t["num_attention_heads"],
                          context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
                          quick_gelu=t.get("hidden_act", "quick_gelu") == "quick_gelu")
    unet, vae, te = _build(spec, vae_cfg, text_cfg)
    parts = (read_state_dict(_weights_file(folder / p)) for p in ("unet", "vae", "text_encoder"))
    load_diffusers(unet, vae, te, *parts)
    sched = folder / "scheduler" / "scheduler_config.json"
    sched = _json(sched) if sched.is_file() else {}
    spacing = sched.get("timestep_spacing", "leading")  # diffusers' 'linspace' grid is not one of ours
    sampler = SamplerConfig(resolution=(u.get("sample_size") or 64) * vae_cfg.factor,
                            spacing=spacing if spacing in D.SPACINGS else "leading")
    return Pipeline(unet, vae, te, prediction="v" if sched.get("prediction_type") == "v_prediction" else "eps",
                    latent_scale=v.get("scaling_factor", VAE_SCALE), source=str(folder), sampler=sampler)


def load_pipeline(path: str | Path, *, ema: bool = False, prediction: str | None = None,
                  device: str = "auto", dtype: str = "auto") -> Pipeline:
    """SD-v1.5 single file (.safetensors/.ckpt), diffusers folder, or our checkpoint -> Pipeline, on ``device`` in
    ``dtype`` -- the commands' defaults: 'auto' is CUDA, then MPS, then the CPU (``pick_device``), in float16 on an
    accelerator and on the CPU bfloat16 where it is native, else float32 (``auto_dtype``). So
    ``load_pipeline(path)(prompt)`` draws the bytes ``sample.py --checkpoint path --prompt prompt`` writes.

    ``ema`` picks the EMA UNet of an LDM file; ``prediction`` overrides the prediction type ('eps' or 'v') where the
    file does not say (the SD-v1.5 single file is eps). ``read_pipeline`` is the same without the move: float32 on
    the CPU, as training and the reports want it.
    """
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)  # a bad name is refused before the file is read
    return read_pipeline(path, ema=ema, prediction=prediction).to(dev, dt)


def read_pipeline(path: str | Path, *, ema: bool = False, prediction: str | None = None) -> Pipeline:
    """``load_pipeline``'s reading: the checkpoint as stored, in float32 on the CPU."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or a path to a checkpoint, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        own = sorted(path.glob("*.safetensors"))
        if (path / "unet").is_dir():
            pipe = _from_diffusers(path)
        elif len(own) == 1 and read_meta(own[0]) is not None:
            pipe = _from_own(own[0], read_meta(own[0]))
        else:
            raise CheckpointError(f"{path}: neither a diffusers folder (unet/, vae/, text_encoder/) "
                                  "nor a folder with one snapfusion_min checkpoint")
    elif (meta := read_meta(regular_file(path, "checkpoint"))) is not None:
        pipe = _from_own(path, meta)
    else:
        unet, vae, te = _build(sd15(), VAEConfig(), TextConfig())
        load_ldm(unet, vae, te, read_state_dict(path), ema=ema)
        pipe = Pipeline(unet, vae, te, prediction="eps", latent_scale=VAE_SCALE, source=str(path))
    if prediction is not None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        pipe.prediction = prediction
    return pipe.to("cpu", torch.float32)
