"""The browser page's side in Python: the one seeded Gaussian generator that web/sampler.js writes too, so that the
page and ``sample.py`` start from the same z_T.

torch's generator (Mersenne Twister, its own normal transform) is not worth porting to JavaScript; this one is 10
lines in both: mulberry32 (a 32-bit state) for uniforms in (0, 1), Box-Muller for pairs of normals.
"""

from __future__ import annotations

import math

import torch

MASK = 0xFFFFFFFF


def _imul(a: int, b: int) -> int:
    """JavaScript's Math.imul on unsigned 32-bit values: the low 32 bits of the product."""
    return (a * b) & MASK


def mulberry32(seed: int):  # noqa: ANN201
    """Uniforms in (0, 1) from a 32-bit state, bit for bit web/sampler.js's ``mulberry32``."""
    a = seed & MASK

    def uniform() -> float:
        nonlocal a
        a = (a + 0x6D2B79F5) & MASK
        t = _imul(a ^ (a >> 15), 1 | a)
        t = ((t + _imul(t ^ (t >> 7), 61 | t)) & MASK) ^ t
        return (((t ^ (t >> 14)) & MASK) + 0.5) / 4294967296

    return uniform


def portable_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """z_T of ``shape`` (one image's [C, h, w]) from ``seed``: web/sampler.js's ``portableNoise``, float32."""
    if not (isinstance(seed, int) and 0 <= seed <= MASK):
        raise ValueError(f"seed must be an integer in [0, 2^32), got {seed!r}")
    n, uniform = math.prod(shape), mulberry32(seed)
    out = []
    while len(out) < n:
        r, theta = math.sqrt(-2 * math.log(uniform())), 2 * math.pi * uniform()
        out += [r * math.cos(theta), r * math.sin(theta)]
    return torch.tensor(out[:n], dtype=torch.float32).reshape(shape)
