"""Which attention kernel at SD-v1.5's self-attention shapes? SDPA's default (flash on the CPU), SDPA's math kernel,
and softmax(Q K^T / sqrt(d)) V in chunks of rows, timed side by side (batch 2 = CFG, 8 heads).

    python bench/attention_kernels.py

The UNet uses the default (``unet.Attention``); this shows why it stays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from snapfusion_min.cost import median_times

SHAPES = ((4096, 40), (1024, 80), (256, 160))  # (tokens, head dim) of the 64x64, 32x32 and 16x16 latents' stages


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    out = torch.empty_like(q)
    for i in range(0, q.shape[2], rows):
        weights = torch.softmax(q[:, :, i:i + rows] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        out[:, :, i:i + rows] = weights @ v
    return out


def math_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def main() -> None:
    torch.manual_seed(0)
    print(f"self-attention, batch 2, 8 heads, fp32, {torch.get_num_threads()} threads; median of 3, ms")
    print(f"{'tokens x head dim':20s}{'SDPA default':>14s}{'SDPA math':>12s}{'chunked':>10s}{'max diff':>11s}")
    for tokens, dim in SHAPES:
        qkv = tuple(torch.randn(2, 8, tokens, dim) for _ in range(3))
        fns = {"default": lambda qkv=qkv: F.scaled_dot_product_attention(*qkv),
               "math": lambda qkv=qkv: math_kernel(*qkv), "chunked": lambda qkv=qkv: chunked(*qkv)}
        with torch.inference_mode():
            ref = fns["default"]()
            diff = max((fns[name]() - ref).abs().max().item() for name in ("math", "chunked"))
            ms = {name: 1e3 * s for name, s in median_times(fns, warmup=1, repeat=3).items()}
        print(f"{f'{tokens} x {dim}':20s}{ms['default']:14.1f}{ms['math']:12.1f}{ms['chunked']:10.1f}{diff:11.1e}")


if __name__ == "__main__":
    main()
