"""The denoising UNet of Stable Diffusion, built from an architecture spec (paper §2.2, Eq. 4; §3.1, Eq. 5).

Eq. 4 writes the UNet as a product of cross-attention and ResNet blocks; ``UNet.forward`` is exactly that loop over
the spec's stages. Eq. 5 (robust training) executes each block with probability p and the identity otherwise.

Identity, where a block's shapes change: a ResNet is ``shortcut(x) + residual(x)``; dropping it keeps ``shortcut(x)``.
That is x itself when input and output widths agree, and the block's own 1x1 projection where they do not (the first
ResNet of a wider stage, and up-stage ResNets, whose input is concatenated with a skip connection). This is the
stochastic-depth reading of Eq. 5: the residual branch is what gets dropped. A cross-attention block is
``x + transformer(x)``, so dropping it is always the plain identity.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .arch import DOWN_STAGES, STAGES, UP_STAGES, ArchSpec, skip_points, walk


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the integer timestep, [cos | sin] as in SD (diffusers: flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale, [sin | cos] of 1000 (w - 1) (Meng et al.'s w input, written as LCM
    and diffusers' ``get_guidance_scale_embedding`` write it, whose omega is our w - 1: w-conditioned UNets published
    in diffusers' format read it the same way)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1))
    angles = 1000.0 * (w.float()[:, None] - 1.0) * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class ResBlock(nn.Module):
    """ResNet block with the time embedding added between its two convolutions."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(t_dim, c_out) if t_dim else None
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """What remains when the block is dropped (Eq. 5): identity, or the 1x1 projection if widths differ."""
        return x if self.conv_shortcut is None else self.conv_shortcut(x)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Attention(nn.Module):
    """Multi-head attention, Softmax(Q K^T / sqrt(d)) V (§2.2); self-attention when no context is given."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.split_einsum = False  # the Neural Engine-friendly form (export.py --attention split_einsum)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, dim = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.split_einsum:
            return self.to_out(split_einsum_attention(q, k, v, self.heads))

        def split(y: torch.Tensor) -> torch.Tensor:  # [B, L, dim] -> [B, heads, L, dim / heads]
            return y.view(b, -1, self.heads, dim // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, dim))


def split_einsum_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax(Q K^T / sqrt(d)) V as Apple's ml-stable-diffusion writes it for the Neural Engine.

    Tensors go channels-first, [B, C, 1, L] (the ANE's native layout), and each head is a separate pair of einsums
    on a channel slice: no [B, heads, L, d] reshape or transpose, which the ANE handles poorly. Same numbers as the
    default attention in torch.
    """
    q, k, v = (y.transpose(1, 2).unsqueeze(2) for y in (q, k, v))  # [B, L, C] -> [B, C, 1, L]
    d = q.shape[1] // heads
    out = []
    for h in range(heads):
        qh, kh, vh = (y[:, h * d:(h + 1) * d] for y in (q, k, v))
        weights = (torch.einsum("bchq,bchk->bkhq", qh, kh) * d**-0.5).softmax(dim=1)  # [B, L_k, 1, L_q]
        out.append(torch.einsum("bkhq,bchk->bchq", weights, vh))
    return torch.cat(out, dim=1).squeeze(2).transpose(1, 2)  # [B, C, 1, L_q] -> [B, L_q, C]


class CrossAttnBlock(nn.Module):
    """SD's spatial transformer: self-attention, cross-attention to the text c, GEGLU feed-forward, on HW tokens."""

    def __init__(self, dim: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff_in = nn.Linear(dim, 8 * dim)  # GEGLU: value and gate, 4*dim each
        self.ff_out = nn.Linear(4 * dim, dim)
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]
        y = y + self.attn1(self.norm1(y))
        y = y + self.attn2(self.norm2(y), context)
        value, gate = self.ff_in(self.norm3(y)).chunk(2, dim=-1)
        y = y + self.ff_out(value * F.gelu(gate))
        y = y.transpose(1, 2).reshape(b, c, h, w)  # [B, HW, C] -> [B, C, H, W]
        return x + self.proj_out(y)


class UNet(nn.Module):
    """v- or epsilon-prediction UNet: (z_t, t, c) -> network output, for any ``ArchSpec``.

    ``keep_prob`` is p of Eq. 5: while training, each block runs with probability p and is the identity otherwise.
    ``removed`` holds block addresses ('stage.name') that are always the identity, to measure a block's value at
    inference without rebuilding the model (Fig. 5, Alg. 1's A-minus evaluation). ``gates`` (address -> a weight
    in [0, 1], a tensor) blends each running block with its Eq. 5 drop, shortcut + g (block - shortcut): 1 runs it,
    0 drops it; as tensors they can be a traced model's input (the browser page's block toggles).
    """

    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        c0, t_dim = spec.channels[0], 4 * spec.channels[0]
        self.keep_prob = 1.0
        self.removed: set[str] = set()
        self.gates: dict[str, torch.Tensor] | None = None
        self.checkpointing = False  # gradient checkpointing: recompute each block's activations in the backward pass
        self.conv_in = nn.Conv2d(spec.in_channels, c0, 3, padding=1)
        self.time_embed = nn.Sequential(nn.Linear(c0, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        # w-conditioned: the guidance scale's embedding, projected, joins the timestep's (diffusers' cond_proj); zero at
        # first, so that a student made from a teacher starts as the teacher's conditional output
        self.w_proj = nn.Linear(spec.guidance_embed, c0, bias=False) if spec.guidance_embed else None
        if self.w_proj is not None:
            nn.init.zeros_(self.w_proj.weight)
        self.stages = nn.ModuleDict({s: nn.ModuleDict() for s in STAGES})
        shapes, stage_out = walk(spec)
        for b in shapes:
            self.stages[b.stage][b.name] = (
                ResBlock(b.c_in + b.c_skip, b.c_out, t_dim, spec.groups) if b.name[0] == "R"
                else CrossAttnBlock(b.c_in, spec.context_dim, spec.heads, spec.groups)
            )
        for s in DOWN_STAGES[:3]:
            self.stages[s]["downsample"] = nn.Conv2d(stage_out[s], stage_out[s], 3, stride=2, padding=1)
        for s in UP_STAGES[:3]:
            self.stages[s]["upsample"] = nn.Conv2d(stage_out[s], stage_out[s], 3, padding=1)
        self.norm_out = nn.GroupNorm(spec.groups, stage_out["up3"], eps=1e-5)
        self.conv_out = nn.Conv2d(stage_out["up3"], spec.out_channels, 3, padding=1)

    def runs(self, address: str) -> bool:
        """Whether a block executes in this forward pass (Eq. 5: with probability p while training)."""
        if address in self.removed:
            return False
        return not (self.training and self.keep_prob < 1.0 and torch.rand(()).item() >= self.keep_prob)

    def forward(self, z: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor,
                w: torch.Tensor | float | None = None) -> torch.Tensor:
        """The network output at (z_t, t, c); a w-conditioned UNet also takes the guidance scale w (default 1: the
        conditional output), per sample [B] or one number."""
        temb = self.embed_time(t, z, w)
        h = self.conv_in(z.contiguous(memory_format=self.memory_format()))
        h, _ = self.run(self.plan(), h, [h], temb, context)
        return self.head(h)

    def embed_time(self, t: torch.Tensor | float, z: torch.Tensor,
                   w: torch.Tensor | float | None = None) -> torch.Tensor:
        """The timestep embedding every ResNet block adds (sinusoidal, plus the projected w embedding of a
        w-conditioned UNet, then the two-layer MLP)."""
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(z.shape[0])
        emb = timestep_embedding(t, self.spec.channels[0]).to(z.dtype)
        if self.w_proj is not None:
            w = torch.as_tensor(1.0 if w is None else w, device=z.device).reshape(-1).expand(z.shape[0])
            emb = emb + self.w_proj(guidance_embedding(w, self.spec.guidance_embed).to(z.dtype))
        return self.time_embed(emb)

    def plan(self) -> list[tuple[str, str, bool]]:
        """The forward pass as a list of steps in order: (stage, block name or 'downsample' / 'upsample', whether
        a down stage pushes a skip after it). Any slice of it can run on its own (``run``): Core ML chunks cut it."""
        steps = []
        for stage in STAGES:
            blocks = self.spec.stages[stage]
            steps += [(stage, name, push) for name, push in zip(blocks, skip_points(blocks))]
            steps += [(stage, op, op == "downsample") for op in ("downsample", "upsample") if op in self.stages[stage]]
        return steps

    def run(self, steps: list[tuple[str, str, bool]], h: torch.Tensor, skips: list[torch.Tensor],
            temb: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Steps of ``plan`` from hidden state h and the skip stack: up stages pop skips, down stages push them."""
        for stage, name, push in steps:
            module = self.stages[stage][name]
            if name == "downsample":
                h = module(h)
            elif name == "upsample":  # nearest 2x, to the next skip's size so odd latent sizes work
                h = module(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
            elif name[0] == "R":
                live = self.runs(f"{stage}.{name}")
                x = torch.cat([h, skips.pop()], dim=1) if stage in UP_STAGES else h
                h = self.gate(f"{stage}.{name}", self.call(module, x, temb), module, x) if live else module.shortcut(x)
            elif self.runs(f"{stage}.{name}"):
                h = self.gate(f"{stage}.{name}", self.call(module, h, context), module, h)
            if stage in DOWN_STAGES and push:
                skips.append(h)
        return h, skips

    def gate(self, address: str, ran: torch.Tensor, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``block``'s output ``ran`` on x, or with ``gates`` its blend with what dropping it leaves (Eq. 5: a
        ResNet's shortcut(x), a cross-attention block's x), worked out only then."""
        if self.gates is None or address not in self.gates:
            return ran
        dropped = block.shortcut(x) if isinstance(block, ResBlock) else x
        return dropped + self.gates[address] * (ran - dropped)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()

    def call(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        """``block(*args)``; with ``checkpointing`` while training, its activations are not kept but recomputed in
        the backward pass (less memory for about one more forward pass; Eq. 5's draws are made outside, once)."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def memory_format(self) -> torch.memory_format:
        """The layout of the conv weights; inputs follow it. ``unet.to(memory_format=torch.channels_last)`` makes
        convolutions ~6% faster on CPU (oneDNN) and the [B, C, H, W] <-> [B, HW, C] token views free."""
        cl = self.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        return torch.channels_last if cl else torch.contiguous_format


def with_guidance_input(unet: UNet, dim: int = 256) -> UNet:
    """The same UNet with a w input (Meng et al.'s w-conditioned student): every weight kept, the w projection zero,
    so that it computes exactly what ``unet`` computes, at every w, until it is trained."""
    if unet.spec.guidance_embed:
        return unet
    new = UNet(dataclasses.replace(unet.spec, guidance_embed=dim))
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    assert missing == ["w_proj.weight"] and not unexpected, (missing, unexpected)
    p = next(unet.parameters())
    return new.to(p.device, p.dtype)
