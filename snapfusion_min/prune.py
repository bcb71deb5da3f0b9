"""Efficient image decoder (§3.2, App. B.2): uniform L1-norm channel pruning of the VAE decoder.

SnapFusion keeps 50% of the channels of every decoder layer (about 1/4 of the parameters and MACs), then recovers
quality by distilling from the original decoder on synthetic latents (``train.py decoder``).

Channels are pruned per *channel axis*, not per layer: every tensor axis that must index the same channels forms one
axis group here, e.g. the residual stream of a level (written by ``conv_in`` / an up-sampling conv / a 1x1 shortcut
and by every block's last conv, read by every block's first GroupNorm and conv), a ResNet's hidden width, the
attention's query/key width and its value width. An axis keeps the channels with the largest summed L1 norm of the
filters that write them, the same number from each GroupNorm group, in their original order -- so each group of the
pruned GroupNorm holds the kept channels of one original group. The result is the same ``Decoder`` class with smaller
widths (``VAEConfig.decoder_channels``): it saves, loads and exports like any decoder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .vae import VAE, VAEConfig


@dataclass
class Axis:
    """One channel axis: the layers that write its channels (dim 0), read them (dim 1), or normalise them."""

    groups: int
    writers: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)


def decoder_axes(cfg: VAEConfig) -> list[Axis]:
    """Walk the decoder in execution order (as ``Decoder.forward``) and collect its channel axes."""
    axes: list[Axis] = []
    stream = Axis(cfg.decoder_groups, writers=["conv_in"])

    def resnet(prefix: str, has_shortcut: bool) -> None:
        nonlocal stream
        stream.norms.append(f"{prefix}.norm1")
        stream.readers.append(f"{prefix}.conv1")
        axes.append(Axis(cfg.decoder_groups, writers=[f"{prefix}.conv1"], readers=[f"{prefix}.conv2"],
                         norms=[f"{prefix}.norm2"]))  # the hidden width
        if has_shortcut:  # out = shortcut(x) + h: a new stream starts here
            stream.readers.append(f"{prefix}.conv_shortcut")
            axes.append(stream)
            stream = Axis(cfg.decoder_groups, writers=[f"{prefix}.conv_shortcut"])
        stream.writers.append(f"{prefix}.conv2")

    resnet("mid.res1", False)
    stream.norms.append("mid.attn.norm")
    stream.readers += ["mid.attn.to_q", "mid.attn.to_k", "mid.attn.to_v"]
    axes.append(Axis(1, writers=["mid.attn.to_q", "mid.attn.to_k"]))  # q . k: the same channels in both
    axes.append(Axis(1, writers=["mid.attn.to_v"], readers=["mid.attn.to_out"]))
    stream.writers.append("mid.attn.to_out")
    resnet("mid.res2", False)
    c = cfg.decoder_channels
    for i, width in enumerate(c):
        for j in range(cfg.layers + 1):
            resnet(f"levels.{i}.res.{j}", j == 0 and c[max(i - 1, 0)] != width)
        if i < len(c) - 1:
            stream.readers.append(f"levels.{i}.upsample")
            axes.append(stream)
            stream = Axis(cfg.decoder_groups, writers=[f"levels.{i}.upsample"])
    stream.norms.append("norm_out")
    stream.readers.append("conv_out")
    axes.append(stream)
    return axes


def kept_width(width: int, groups: int, ratio: float) -> int:
    """Channels a width of ``groups`` GroupNorm groups keeps: ``round(ratio * width / groups)`` per group, >= 1."""
    return max(1, round(ratio * width / groups)) * groups


def pruned_config(cfg: VAEConfig, ratio: float) -> VAEConfig:
    """Each decoder width keeps ``round(ratio * width / groups)`` channels per GroupNorm group (at least one).

    A group left with one channel would make its GroupNorm an instance norm, which erases every channel's mean -- in
    the last layers, the image's colours. Where that would happen, pairs of neighbouring groups merge (fewer
    ``decoder_groups``) until each group holds at least two channels. SD-v1.5's decoder at r = 0.5 keeps 2-8
    channels per group and is unchanged; the toy decoder's last level (16 channels in 8 groups) needs the merge.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"pruning ratio r must be in (0, 1], got {ratio}")
    widths = tuple(kept_width(w, cfg.decoder_groups, ratio) for w in cfg.decoder_channels)
    groups = cfg.decoder_groups
    while min(widths) // groups < 2 and groups % 2 == 0:
        groups //= 2
    c = cfg.decoder_channels
    for i in range(1, len(c)):  # a level keeps its 1x1 shortcut only if widths still differ
        if (c[i - 1] == c[i]) != (widths[i - 1] == widths[i]):
            raise ValueError(f"r={ratio} maps decoder widths {c} to {widths}, which changes the layer structure")
    return dataclasses.replace(cfg, decoder_channels=widths, decoder_groups=groups)


def l1_keep(state: dict[str, torch.Tensor], axis: Axis, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` channels of ``axis`` with the largest summed filter L1 norm, ``keep / groups`` per
    GroupNorm group, ascending."""
    score = sum(state[f"{w}.weight"].abs().flatten(1).sum(1) for w in axis.writers)
    size = score.numel() // axis.groups
    per_group = keep // axis.groups
    best = score.view(axis.groups, size).topk(per_group, dim=1).indices.sort(dim=1).values
    return (best + torch.arange(axis.groups)[:, None] * size).flatten()


def kept_channels(vae: VAE, ratio: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """For each decoder layer, the kept output channels (writers and GroupNorms) and input channels (readers)."""
    pruned_config(vae.cfg, ratio)  # checks r and the layer structure
    state, groups = vae.decoder.state_dict(), vae.cfg.decoder_groups
    out_index: dict[str, torch.Tensor] = {}
    in_index: dict[str, torch.Tensor] = {}
    for axis in decoder_axes(vae.cfg):
        width = state[f"{axis.writers[0]}.weight"].shape[0]  # attention widths equal the stream's: same rule
        keep = l1_keep(state, axis, kept_width(width, groups, ratio))
        for name in axis.writers + axis.norms:
            out_index[name] = keep
        for name in axis.readers:
            in_index[name] = keep
    return out_index, in_index


def select_channels(state: dict[str, torch.Tensor], out_index: dict[str, torch.Tensor],
                    in_index: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor of ``state`` at its layer's kept output channels (dim 0: weights, biases, norms) and kept input
    channels (dim 1 of weights); layers in neither index are copied whole."""
    out = {}
    for key, value in state.items():
        module = key.rsplit(".", 1)[0]
        if module in out_index:
            value = value.index_select(0, out_index[module])
        if module in in_index and value.dim() > 1:
            value = value.index_select(1, in_index[module])
        out[key] = value.clone()
    return out


def prune_decoder(vae: VAE, ratio: float = 0.5) -> VAE:
    """A new VAE: the same encoder, a decoder keeping ``ratio`` of every layer's channels by L1 norm (§3.2).

    With ``ratio=1`` the copy is exact. Attention keeps its 1/sqrt(d) scale with the pruned d (the distillation
    that follows absorbs the difference).
    """
    cfg = pruned_config(vae.cfg, ratio)
    small = VAE(cfg)
    small.encoder.load_state_dict(vae.encoder.state_dict())
    small.decoder.load_state_dict(select_channels(vae.decoder.state_dict(), *kept_channels(vae, ratio)))
    return small.to(next(vae.parameters()).device)
