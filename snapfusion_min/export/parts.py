"""What each exported model computes (Core ML packages, ONNX files): the text encoder, the UNet (whole, or in two
chunks cut at a block boundary of its architecture spec) and the decoder, in our conventions or in those of Apple's
Swift StableDiffusionPipeline (ml-stable-diffusion: its TextEncoder.swift, Unet.swift, Decoder.swift and
StableDiffusionPipeline.swift), with the names of their inputs and outputs and example inputs to trace them with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import diffusion as D
from ..pipeline import Pipeline
from ..unet import UNet

PARTS = ("text_encoder", "unet", "decoder")
APPLE_NAMES = {"text_encoder": "TextEncoder", "unet": "Unet", "decoder": "VAEDecoder"}
APPLE_LATENT_SCALE = 0.18215  # Apple's Decoder.swift divides every latent by it before its decoder


class TextEncoderPart(nn.Module):
    """input_ids [1, L] -> last_hidden_state [1, L, width] (after the final layer norm, as SD uses it). The ids are
    int32, or float32 in Apple's layout (its TextEncoder.swift passes them as floats)."""

    def __init__(self, pipe: Pipeline) -> None:
        super().__init__()
        self.encoder = pipe.text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids.long())


class UNetPart(nn.Module):
    """(sample [B, 4, h, w], timestep [B], encoder_hidden_states [B, L, width]) -> the network's output (eps or v).
    A w-conditioned UNet (Meng et al.) takes a fourth input, guidance [B]: its output is the guided one.

    Apple's layout: the hidden states come as [B, width, 1, L] (StableDiffusionPipeline.swift's toHiddenStates) and
    the output is always eps, which its schedulers assume: a v-prediction model's output is turned into eps inside
    the package (Eq. 6 solved for eps: eps = alpha_t v + sigma_t z_t, alpha_t and sigma_t looked up by timestep).
    """

    def __init__(self, pipe: Pipeline, apple: bool = False) -> None:
        super().__init__()
        self.unet, self.apple, self.v = pipe.unet, apple, pipe.prediction == "v"
        alpha, sigma = pipe.schedule.alpha_sigma(torch.arange(pipe.schedule.steps))
        self.register_buffer("alpha", alpha, persistent=False)
        self.register_buffer("sigma", sigma, persistent=False)

    def context(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return encoder_hidden_states.squeeze(2).transpose(1, 2) if self.apple else encoder_hidden_states

    def output(self, out: torch.Tensor, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if not (self.apple and self.v):
            return out
        i = timestep.long()
        return D.eps_from_v(z=sample, v=out, alpha=self.alpha[i], sigma=self.sigma[i])

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                guidance: torch.Tensor | None = None) -> torch.Tensor:
        out = self.unet(sample, timestep, self.context(encoder_hidden_states), w=guidance)
        return self.output(out, sample, timestep)


class GatedUNetPart(UNetPart):
    """``UNetPart`` with one more input, keep [n_blocks] (weights in [0, 1], the spec's addresses in order): block
    i is blended with its Eq. 5 drop by keep[i] (``UNet.gates``; 1 runs it, 0 drops it). Fig. 5 as an input: the
    browser page switches blocks off the robust-trained UNet live."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        *guidance, keep = rest  # (guidance,) keep for a w-conditioned UNet
        self.unet.gates = dict(zip(self.unet.spec.addresses(), keep.unbind(0)))
        try:
            return super().forward(sample, timestep, encoder_hidden_states, *guidance)
        finally:
            self.unet.gates = None


class UNetChunk1(UNetPart):
    """The UNet's steps ``plan()[:cut]``: (sample, timestep, encoder_hidden_states) -> (temb, hidden_states,
    skip_0, ..., skip_n): the timestep embedding, the hidden state and the skip stack the second chunk continues
    from (ml-stable-diffusion's chunking, cut at a block boundary of the architecture spec instead of an op)."""

    def __init__(self, pipe: Pipeline, cut: int, apple: bool = False) -> None:
        super().__init__(pipe, apple)
        self.cut = cut

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                guidance: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        u = self.unet
        temb = u.embed_time(timestep, sample, guidance)
        h = u.conv_in(sample.contiguous(memory_format=u.memory_format()))
        h, skips = u.run(u.plan()[: self.cut], h, [h], temb, self.context(encoder_hidden_states))
        return (temb, h, *skips)


class UNetChunk2(UNetChunk1):
    """The UNet's steps ``plan()[cut:]`` and its head: the original inputs (Apple's Unet.swift passes them to every
    chunk; w, if any, is in temb) and the first chunk's outputs -> the UNet's output."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                temb: torch.Tensor, hidden_states: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        u = self.unet
        h, _ = u.run(u.plan()[self.cut :], hidden_states, list(skips), temb, self.context(encoder_hidden_states))
        return self.output(u.head(h), sample, timestep)


class DecoderPart(nn.Module):
    """Latent z [1, 4, h, w] -> image [1, 3, H, W]. Ours: z is the scaled latent, the image in [0, 1]. Apple's
    layout: z arrives divided by 0.18215 (Decoder.swift) whatever the model's scale, the image in [-1, 1]."""

    def __init__(self, pipe: Pipeline, apple: bool = False) -> None:
        super().__init__()
        self.decoder, self.scale, self.apple = pipe.vae.decoder, pipe.latent_scale, apple

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.apple:
            return self.decoder(z * (APPLE_LATENT_SCALE / self.scale))
        return (self.decoder(z / self.scale) / 2 + 0.5).clamp(0, 1)


def sampling_settings(pipe: Pipeline, resolution: int, batch: int) -> dict:
    """What an app needs to sample with the exported parts without guessing: the architecture, prediction type,
    latent scale, scheduler, steps, guidance, resolution, the UNet's batch and whether it takes w itself."""
    cfg = pipe.config()
    return {"arch": cfg["arch"], "prediction": pipe.prediction, "latent_scale": pipe.latent_scale,
            "scheduler": {"name": "DDIM", "beta_start": D.BETA_START, "beta_end": D.BETA_END,
                          "beta_schedule": "scaled_linear", "train_steps": D.TRAIN_STEPS,
                          "spacing": pipe.sampler.spacing},
            "steps": pipe.sampler.steps, "guidance": pipe.sampler.guidance, "resolution": resolution,
            "unet_batch": batch, "vae": cfg["vae"], "text": cfg["text"], "source": Path(pipe.source).name,
            "w_conditioned": bool(pipe.unet.spec.guidance_embed)}  # then the UNet takes 'guidance' and needs no CFG


@dataclass
class Package:
    """One .mlpackage to write: its file name (without suffix), the part it belongs to, the module to convert, its
    named example inputs and its output names."""

    name: str
    part: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]


def balanced_cut(unet: UNet) -> int:
    """k such that ``plan()[:k]`` and ``plan()[k:]`` hold about equal weights (conv_in and the time embedding count
    for the first chunk, the output head for the second): the block boundary to chunk the UNet at."""
    def size(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    plan = unet.plan()
    total, cum = size(unet), size(unet.conv_in) + size(unet.time_embed)
    best, best_gap = 1, float("inf")
    for k, (stage, name, _) in enumerate(plan[:-1], start=1):
        cum += size(unet.stages[stage][name])
        if abs(2 * cum - total) < best_gap:
            best, best_gap = k, abs(2 * cum - total)
    return best


def packages(pipe: Pipeline, part: str, resolution: int, batch: int, *, layout: str = "snapfusion",
             chunk: bool = False, gated: bool = False) -> list[Package]:
    """The package(s) of one part: names and input/output conventions of the layout, the UNet in two chunks if
    asked, or with a keep input (``GatedUNetPart``). Example inputs are random (seeded); the second chunk's are the
    first chunk's outputs on them."""
    apple = layout == "apple"
    names = APPLE_NAMES if apple else {p: p for p in PARTS}
    h = resolution // pipe.vae.cfg.factor
    width, length = pipe.text_encoder.cfg.width, pipe.text_encoder.cfg.context_length
    gen = torch.Generator().manual_seed(0)
    if part == "text_encoder":
        ids = torch.zeros(1, length, dtype=torch.float32 if apple else torch.int32)
        return [Package(names[part], part, TextEncoderPart(pipe), {"input_ids": ids}, ["last_hidden_state"])]
    if part == "decoder":
        z = torch.randn(1, pipe.vae.cfg.latent_channels, h, h, generator=gen)
        return [Package(names[part], part, DecoderPart(pipe, apple), {"z": z}, ["image"])]
    context = torch.randn(batch, length, width, generator=gen)
    inputs = {"sample": torch.randn(batch, pipe.unet.spec.in_channels, h, h, generator=gen),
              "timestep": torch.full((batch,), 999.0),
              "encoder_hidden_states": context.transpose(1, 2).unsqueeze(2).contiguous() if apple else context}
    if pipe.unet.spec.guidance_embed:
        inputs["guidance"] = torch.full((batch,), pipe.sampler.guidance)
    output = ["noise_pred" if apple or pipe.prediction == "eps" else "v_pred"]
    if gated:
        inputs["keep"] = torch.ones(len(pipe.unet.spec.addresses()))
        return [Package(names[part], part, GatedUNetPart(pipe), inputs, output)]
    if not chunk:
        return [Package(names[part], part, UNetPart(pipe, apple), inputs, output)]
    cut = balanced_cut(pipe.unet)
    first = UNetChunk1(pipe, cut, apple)
    with torch.no_grad():
        middle = first.eval()(*inputs.values())
    middle = [m.contiguous() for m in middle]  # Core ML takes inputs in their default (contiguous) layout
    middle_names = ["temb", "hidden_states", *(f"skip_{i}" for i in range(len(middle) - 2))]
    chunk_names = ("UnetChunk1", "UnetChunk2") if apple else ("unet_chunk1", "unet_chunk2")
    return [Package(chunk_names[0], part, first, inputs, middle_names),
            Package(chunk_names[1], part, UNetChunk2(pipe, cut, apple),
                    {**{k: v for k, v in inputs.items() if k != "guidance"}, **dict(zip(middle_names, middle))},
                    output)]
