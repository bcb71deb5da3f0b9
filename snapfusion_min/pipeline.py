"""Text -> image: tokenizer, text encoder, UNet with DDIM and classifier-free guidance, VAE decoder (Fig. 3, left).

``load_pipeline(path)`` reads an SD-v1.5 single file (.safetensors / .ckpt), a diffusers folder, or one of our own
checkpoints, and gives a ``Pipeline`` whose parts can also be called one by one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import diffusion as D
from .arch import ArchSpec, sd15
from .checkpoint import read_meta, read_state_dict, save_checkpoint
from .text_encoder import TextConfig, TextEncoder, Tokenizer
from .unet import UNet
from .vae import VAE, VAE_SCALE, VAEConfig
from .weights import CheckpointError, apply_map, load_diffusers, load_ldm

PREDICTIONS = ("eps", "v")
SD15_SAMPLER = {"steps": 50, "guidance": 7.5, "spacing": "leading", "resolution": 512}  # SD-v1.5's defaults


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if present, else mps, else cpu."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> float16 on accelerators, float32 on the CPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
              "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(dtypes)}")
    return dtypes[name]


class Pipeline:
    """The four parts of SD plus the sampler settings they were trained for."""

    def __init__(self, unet: UNet, vae: VAE, text_encoder: TextEncoder, prediction: str = "eps",
                 latent_scale: float = VAE_SCALE, source: str = "", sampler: dict | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder.eval()
        self.tokenizer = Tokenizer(text_encoder.cfg.context_length)
        self.prediction, self.latent_scale, self.source = prediction, latent_scale, source
        self.schedule = D.Schedule()
        self.sampler = {**SD15_SAMPLER, **(sampler or {})}  # the defaults sample.py uses, saved in checkpoints

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
                "text": dataclasses.asdict(self.text_encoder.cfg), "sampler": self.sampler}

    def save(self, path: str | Path) -> None:
        save_checkpoint(path, {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder},
                        self.config())

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """c = E(prompt): [B, 77, width]."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device)).to(self.dtype)

    @torch.no_grad()
    def denoise(self, z: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor | None, steps: int,
                guidance: float, spacing: str = "leading", progress: bool = False) -> torch.Tensor:
        """DDIM (Eq. 2) from z_T to the final latent, CFG (Eq. 3) if guidance > 1, [uncond; cond] in one batch."""
        grid = D.timesteps(steps, spacing)
        use_cfg = guidance > 1.0 and uncond is not None
        ctx = torch.cat([uncond, context]) if use_cfg else context
        for t, t_next in tqdm(list(zip(grid[:-1], grid[1:])), desc="denoising", disable=not progress, leave=False):
            out = self.unet(torch.cat([z, z]) if use_cfg else z, t, ctx)
            if use_cfg:
                out_uncond, out_cond = out.chunk(2)
                out = D.cfg(out_cond, out_uncond, guidance)
            alpha, sigma = self.schedule.alpha_sigma(t)
            alpha_next, sigma_next = self.schedule.alpha_sigma(t_next)
            x, eps = D.predict_x_eps(out, z=z, alpha=alpha, sigma=sigma, prediction=self.prediction)
            z = D.ddim_step(x=x, eps=eps, alpha_next=alpha_next, sigma_next=sigma_next)
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

    def initial_latents(self, n: int, height: int, width: int, seed: int) -> torch.Tensor:
        """z_T ~ N(0, I); image i uses seed + i on a CPU generator, so images do not depend on batch or device."""
        f = self.vae.cfg.factor
        shape = (self.unet.spec.in_channels, height // f, width // f)
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])
        return z.to(self.device, self.dtype)

    def __call__(self, prompts: str | list[str], steps: int = 50, guidance: float = 7.5, seed: int = 0,
                 height: int = 512, width: int = 512, latents: torch.Tensor | None = None, spacing: str = "leading",
                 negative_prompt: str = "", progress: bool = False,
                 output_type: str = "pil") -> list[Image.Image] | torch.Tensor:
        """Prompts -> images (PIL, or with output_type='pt' a float tensor [B, 3, H, W] in [0, 1])."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        f = self.vae.cfg.factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height}x{width}")
        if not prompts:
            raise ValueError("no prompts given")
        z = self.initial_latents(len(prompts), height, width, seed) if latents is None else latents.to(
            self.device, self.dtype)
        context = self.encode_prompts(prompts)
        uncond = self.encode_prompts([negative_prompt] * len(prompts)) if guidance > 1.0 else None
        images = self.decode(self.denoise(z, context, uncond, steps, guidance, spacing, progress))
        if output_type == "pt":
            return images
        arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        return [Image.fromarray(a) for a in arrays]


# ---- loading ----------------------------------------------------------------------------------------------------
def _build(spec: ArchSpec, vae_cfg: VAEConfig, text_cfg: TextConfig) -> tuple[UNet, VAE, TextEncoder]:
    """Empty models on the meta device: loading assigns real tensors, so no time goes into random init."""
    with torch.device("meta"):
        return UNet(spec), VAE(vae_cfg), TextEncoder(text_cfg)


def _from_own(path: Path, meta: dict) -> Pipeline:
    try:
        spec = ArchSpec.from_json(meta["arch"])
        unet, vae, te = _build(spec, VAEConfig(**meta["vae"]), TextConfig(**meta["text"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad snapfusion_min config ({e})") from None
    state = read_state_dict(path)
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        apply_map(module, part, lambda k: [k], f"{path.name}: {name}")
    return Pipeline(unet, vae, te, meta["prediction"], meta.get("latent_scale", VAE_SCALE), str(path),
                    meta.get("sampler"))


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
    spec = dataclasses.replace(sd15(), channels=tuple(u["block_out_channels"]), context_dim=u["cross_attention_dim"],
                               heads=heads if isinstance(heads, int) else heads[0], groups=u.get("norm_num_groups", 32),
                               in_channels=u.get("in_channels", 4), out_channels=u.get("out_channels", 4))
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
    prediction = _json(sched).get("prediction_type", "epsilon") if sched.is_file() else "epsilon"
    return Pipeline(unet, vae, te, "v" if prediction == "v_prediction" else "eps",
                    v.get("scaling_factor", VAE_SCALE), str(folder),
                    {"resolution": (u.get("sample_size") or 64) * vae_cfg.factor})


def load_pipeline(path: str | Path, ema: bool = False, prediction: str | None = None,
                  device: str = "cpu", dtype: str = "float32") -> Pipeline:
    """SD-v1.5 single file (.safetensors/.ckpt), diffusers folder, or our checkpoint -> Pipeline.

    ``ema`` picks the EMA UNet of an LDM file; ``prediction`` overrides the prediction type ('eps' or 'v') where the
    file does not say (the SD-v1.5 single file is eps).
    """
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
    elif not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    elif (meta := read_meta(path)) is not None:
        pipe = _from_own(path, meta)
    else:
        unet, vae, te = _build(sd15(), VAEConfig(), TextConfig())
        load_ldm(unet, vae, te, read_state_dict(path), ema=ema)
        pipe = Pipeline(unet, vae, te, "eps", VAE_SCALE, str(path))
    if prediction is not None:
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        pipe.prediction = prediction
    dev = pick_device(device)
    return pipe.to(dev, pick_dtype(dtype, dev))
