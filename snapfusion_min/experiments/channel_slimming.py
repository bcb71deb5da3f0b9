"""Uniform channel slimming of the UNet: the "conventional pruning" §3.1 compares architecture evolving with.

Every layer keeps the same fraction r of its channels, chosen by L1 norm as ``prune.py`` chooses the decoder's
(§3.2): the UNet's channel axes are walked in execution order (``unet_axes``), each axis keeps the channels whose
writing filters have the largest summed L1 norm, the same number from each GroupNorm group (attention: from each
head), in their original order. The result is a ``UNet`` of the same blocks with narrower ``channels``
(``ArchSpec.channels``): it saves, loads, trains, evolves and exports like any other. ``choose_ratio`` picks the
largest r whose measured latency meets a target (the evolved UNet's, in ``evolve_arms.py``) or, where none does,
the r of the target's parameter count.

Two places where a slimmed layer is not exactly its original's restriction, left to the fine-tuning that follows:
an up-stage ResNet normalises [h; skip] in GroupNorm groups that may straddle the two parts, and the timestep's
sinusoidal embedding is as wide as level 0, so its frequencies change with it (each kept input of the time MLP is
the original input of the nearest frequency).
"""

from __future__ import annotations

import dataclasses

import torch

from ..arch import DOWN_STAGES, UP_STAGES, ArchSpec, walk
from ..cost import count_params, threads
from ..latency import measure_unet
from ..prune import Axis, kept_width, l1_keep, select_channels
from ..unet import UNet


def unet_axes(unet: UNet) -> tuple[list[Axis], dict[str, list[tuple[Axis, int]]], list[str]]:
    """The UNet's channel axes in execution order; the layers that read a concatenation [h; skip] (an up-stage
    ResNet's norm1, conv1 and 1x1 projection), each with its parts as (axis, offset); and the GEGLU input layers
    (value i and gate i are one channel)."""
    groups, heads = unet.spec.groups, unet.spec.heads
    width = {f"{b.stage}.{b.name}": b.c_in for b in walk(unet.spec)[0]}  # h's width before [h; skip]
    temb = Axis(1, writers=["time_embed.2"])
    axes, concat, gated = [Axis(1, writers=["time_embed.0"], readers=["time_embed.2"]), temb], {}, []
    stream = Axis(groups, writers=["conv_in"])
    skips = [stream]

    def resnet(p: str, block: torch.nn.Module, address: str, up: bool) -> Axis:
        if up:  # [h; skip]
            parts = [(stream, 0), (skips.pop(), width[address])]
            concat.update({f"{p}.{n}": parts for n in ("norm1", "conv1", "conv_shortcut")})
        else:
            stream.norms.append(f"{p}.norm1")
            stream.readers += [f"{p}.conv1"] + ([f"{p}.conv_shortcut"] if block.conv_shortcut is not None else [])
        axes.append(Axis(groups, writers=[f"{p}.conv1", f"{p}.time_emb_proj"], readers=[f"{p}.conv2"],
                         norms=[f"{p}.norm2"]))  # the hidden width
        temb.readers.append(f"{p}.time_emb_proj")
        out = stream
        if block.conv_shortcut is not None:  # shortcut(x) + h: a new stream starts here
            axes.append(stream)
            out = Axis(groups, writers=[f"{p}.conv_shortcut"])
        out.writers.append(f"{p}.conv2")
        return out

    def transformer(p: str) -> None:
        stream.norms.append(f"{p}.norm")
        stream.readers.append(f"{p}.proj_in")
        axes.append(Axis(1, writers=[f"{p}.proj_in", f"{p}.attn1.to_out", f"{p}.attn2.to_out", f"{p}.ff_out"],
                         readers=[f"{p}.attn1.to_q", f"{p}.attn1.to_k", f"{p}.attn1.to_v", f"{p}.attn2.to_q",
                                  f"{p}.ff_in", f"{p}.proj_out"],
                         norms=[f"{p}.norm1", f"{p}.norm2", f"{p}.norm3"]))  # the tokens' residual stream
        for a in ("attn1", "attn2"):  # q . k: the same channels in both, per head; v, read by the output projection
            axes.extend([Axis(heads, writers=[f"{p}.{a}.to_q", f"{p}.{a}.to_k"]),
                         Axis(heads, writers=[f"{p}.{a}.to_v"], readers=[f"{p}.{a}.to_out"])])
        gated.append(f"{p}.ff_in")
        stream.writers.append(f"{p}.proj_out")

    for stage, name, push in unet.plan():
        p, block = f"stages.{stage}.{name}", unet.stages[stage][name]
        if name in ("downsample", "upsample"):
            stream.readers.append(p)
            axes.append(stream)
            stream = Axis(groups, writers=[p])
        elif name[0] == "R":
            stream = resnet(p, block, f"{stage}.{name}", stage in UP_STAGES)
        else:
            transformer(p)
        if stage in DOWN_STAGES and push:
            skips.append(stream)
    stream.norms.append("norm_out")
    stream.readers.append("conv_out")
    axes.append(stream)
    return axes, concat, gated


def slimmed_spec(spec: ArchSpec, ratio: float) -> ArchSpec:
    """The same blocks, each level keeping ``round(ratio * width / groups)`` channels per GroupNorm group."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"slimming ratio must be in (0, 1], got {ratio}")
    if spec.guidance_embed:
        raise ValueError("slimming a w-conditioned UNet is not supported")
    c = spec.channels
    widths = tuple(kept_width(w, spec.groups, ratio) for w in c)
    for i in range(1, len(c)):  # a ResNet keeps its 1x1 projection only if the widths still differ
        if (c[i - 1] == c[i]) != (widths[i - 1] == widths[i]):
            raise ValueError(f"ratio {ratio} maps the UNet's widths {c} to {widths}, which changes its layers")
    return dataclasses.replace(spec, channels=widths)  # ArchSpec checks divisibility by groups and heads


def frequency_map(old: int, new: int) -> torch.Tensor:
    """Indices into a sinusoidal embedding of width ``old`` ([cos | sin], frequencies 10000^(-k / half)) of the
    nearest frequency to each of width ``new``."""
    k = torch.arange(new // 2)
    nearest = torch.round(k * (old // 2) / (new // 2)).long()
    return torch.cat([nearest, old // 2 + nearest])


def kept_channels(unet: UNet, ratio: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """For each layer, the kept output channels (writers and norms) and input channels (readers) at ``ratio``."""
    spec = slimmed_spec(unet.spec, ratio)
    with torch.device("meta"):
        shape = {k: v.shape for k, v in UNet(spec).state_dict().items()}
    old = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    axes, concat, gated = unet_axes(unet)
    out_index, in_index, kept = {}, {}, {}
    for axis in axes:
        kept[id(axis)] = index = l1_keep(old, axis, shape[f"{axis.writers[0]}.weight"][0])
        out_index.update(dict.fromkeys(axis.writers + axis.norms, index))
        in_index.update(dict.fromkeys(axis.readers, index))
    for name in gated:  # GEGLU: channel i is value row i and gate row 4d + i
        half = old[f"{name}.weight"].shape[0] // 2
        score = old[f"{name}.weight"].abs().sum(1).view(2, half).sum(0)
        index = score.topk(shape[f"{name}.weight"][0] // 2).indices.sort().values
        out_index[name] = torch.cat([index, half + index])
        in_index[name.replace("ff_in", "ff_out")] = index
    for name, parts in concat.items():
        index = torch.cat([kept[id(axis)] + offset for axis, offset in parts])
        (out_index if name.endswith("norm1") else in_index)[name] = index
    in_index["time_embed.0"] = frequency_map(unet.spec.channels[0], spec.channels[0])
    return out_index, in_index


@torch.no_grad()
def slim_unet(unet: UNet, ratio: float) -> UNet:
    """A new UNet keeping ``ratio`` of every layer's channels by L1 norm (``ratio=1``: an exact copy)."""
    state = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    new = UNet(slimmed_spec(unet.spec, ratio))
    new.load_state_dict(select_channels(state, *kept_channels(unet, ratio)))
    new.keep_prob = unet.keep_prob
    p = next(unet.parameters())
    return new.to(p.device, p.dtype).to(memory_format=unet.memory_format()).train(unet.training)


def slim_sweep(unet: UNet, latent: int, batch: int, context_len: int,
               ratios: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3), n_threads: int = 1) -> list[dict]:
    """Each ratio's widths, parameters and measured latency per step (ratios that give the same widths once)."""
    rows, seen = [], set()
    for ratio in sorted(ratios, reverse=True):
        try:
            widths = slimmed_spec(unet.spec, ratio).channels
        except ValueError:
            continue
        if widths not in seen:
            seen.add(widths)
            small = slim_unet(unet, ratio)
            with threads(n_threads):
                ms = measure_unet(small, latent, batch, context_len)
            rows.append({"ratio": ratio, "channels": widths, "params": count_params(small), "measured_ms": ms})
    return rows


def choose_ratio(sweep: list[dict], target_ms: float, target_params: int) -> dict:
    """The largest ratio whose measured latency meets ``target_ms``; if none does (at toy size a step's latency is
    mostly per-layer overhead, which slimming does not remove), the one with the parameter count nearest
    ``target_params``."""
    fast = [r for r in sweep if r["measured_ms"] <= target_ms]
    if fast:
        return max(fast, key=lambda r: r["ratio"])
    return min(sweep, key=lambda r: abs(r["params"] - target_params))
