"""GPU memory each SD-scale stage needs at batch 1, 512x512, with --amp: computed from the models' sizes, with the
activations measured -- the tensors the full-size UNet (and the pruned decoder) save for the backward pass, counted by
a saved-tensors hook during one forward pass on the CPU under bfloat16 autocast, with and without
--checkpointing. A GPU adds its framework's context and allocator slack (~1 GiB); the table leaves them out.

    python bench/gpu_memory.py        # ~3 min on 2 cores, ~12 GiB of RAM (random weights: sizes, not quality)

docs/sd_scale.md holds the table this prints.
"""

from __future__ import annotations

import platform

import torch

from snapfusion_min.arch import sd15, snapfusion
from snapfusion_min.pipeline import native_bf16
from snapfusion_min.prune import prune_decoder
from snapfusion_min.text_encoder import TextConfig, TextEncoder
from snapfusion_min.unet import UNet
from snapfusion_min.vae import VAE, VAEConfig

GIB = 2**30


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def saved_bytes(step, blocks: dict[str, torch.nn.Module] | None = None) -> tuple[int, dict[str, int]]:  # noqa: ANN001
    """Bytes of the distinct storages autograd keeps for the backward pass while ``step()`` runs its forward, in all
    and saved inside each of ``blocks``."""
    storages: dict[int, int] = {}
    inside, where = {name: 0 for name in blocks or {}}, []

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in storages and where:
            inside[where[-1]] += s.nbytes()
        storages[s.data_ptr()] = s.nbytes()
        return t

    def enter(name: str):  # noqa: ANN202
        return lambda *_: where.append(name)  # a pre-hook returning None leaves the input as it is

    def leave(*_: object) -> None:  # likewise the output
        where.pop()

    hooks = [m.register_forward_pre_hook(enter(name)) for name, m in (blocks or {}).items()]
    hooks += [m.register_forward_hook(leave) for m in (blocks or {}).values()]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        step()
    for h in hooks:
        h.remove()
    return sum(storages.values()), inside


def unet_activations() -> tuple[int, int]:
    """All the UNet's saved activations, and the largest one block saves: with --checkpointing, the blocks keep only
    their inputs and the backward pass recomputes one block at a time."""
    torch.manual_seed(0)
    unet = UNet(sd15()).train()
    z, t, c = torch.randn(1, 4, 64, 64), torch.tensor([500]), torch.randn(1, 77, 768)
    blocks = {f"{s}.{n}": m for s, stage in unet.stages.items() for n, m in stage.items()}
    total, inside = saved_bytes(lambda: unet(z, t, c), blocks)
    return total, total - sum(inside.values()) + max(inside.values())


def decoder_activations() -> int:
    student = prune_decoder(VAE(VAEConfig()), 0.5).decoder.train()
    z = torch.randn(1, 4, 64, 64)
    return saved_bytes(lambda: student(z))[0]


def main() -> None:
    with torch.device("meta"):
        unet, evolved = params(UNet(sd15())), params(UNet(snapfusion()))
        text, vae = params(TextEncoder(TextConfig())), params(VAE(VAEConfig()))
    pruned = params(prune_decoder(VAE(VAEConfig()), 0.5).decoder)
    print(f"cpu: {platform.processor() or platform.machine()}, native bf16: {native_bf16()}, torch {torch.__version__}")
    print(f"parameters: UNet {unet / 1e6:.1f}M, Table 3 UNet {evolved / 1e6:.1f}M, text encoder {text / 1e6:.1f}M, "
          f"VAE {vae / 1e6:.1f}M, pruned decoder {pruned / 1e6:.1f}M")
    full, checkpointed = unet_activations()
    act, dec = {False: full, True: checkpointed}, decoder_activations()
    print(f"activations at batch 1, 64x64 latents, bf16 autocast: UNet {full / GIB:.2f} GiB; with --checkpointing "
          f"(what no block holds, plus the largest block, recomputed) {checkpointed / GIB:.2f} GiB; pruned decoder at "
          f"512x512 {dec / GIB:.2f} GiB\n")
    frozen = 4 * (text + vae)  # the training pipeline keeps its text encoder and autoencoder in float32

    def trained(n: int, ema: bool) -> float:  # float32 weights, gradients, AdamW's two moments, EMA, autocast's copy
        return (4 * 4 + (4 if ema else 0) + 2) * n

    rows = [("`train.py unet --preset sd15` (v fine-tune, robust training)", trained(unet, True) + frozen, act),
            ("`evolve.py --preset sd15` (robust training, fine-tuning; EMA)", trained(unet, True) + frozen, act),
            ("`distill.py --preset sd15` (Table 3 student, bf16 teacher)",
             trained(evolved, True) + 2 * unet + frozen, act),
            ("`distill.py --preset sd15 --no-ema`", trained(evolved, False) + 2 * unet + frozen, act),
            ("`train.py decoder --preset sd15` (fp32 UNet makes the latents)", 4 * unet + frozen + 18 * pruned,
             {False: dec, True: dec}),
            ("`sample.py` (fp16: weights only)", 2 * (evolved + text + vae), {False: 0, True: 0})]
    print("| stage, batch 1, 512x512, --amp | model states | + activations | + activations, --checkpointing |")
    print("|---|---|---|---|")
    for name, states, a in rows:
        print(f"| {name} | {states / GIB:.1f} GiB | {(states + a[False]) / GIB:.1f} GiB | "
              f"{(states + a[True]) / GIB:.1f} GiB |")


if __name__ == "__main__":
    main()
