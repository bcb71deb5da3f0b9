"""The latency lookup table of §2.2 / Alg. 1: every R and A block timed at its real input shapes.

Blocks are keyed by what determines their cost -- type, channels, token grid, batch -- so an evolved spec's latency is
predicted without timing it again. The rest of the UNet (conv_in, time embedding, resamplers, conv_out) is one
'skeleton' entry. Also the per-block parameters and MACs of the paper's Fig. 2.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch import LEVEL, STAGES, ArchSpec, walk
from .cost import count_macs, count_params, median_time, median_times, threads
from .formats.checkpoint import atomic_write
from .formats.figures import block_bars
from .unet import UNet


@dataclass
class LatencyTable:
    """Median milliseconds of each block configuration, plus the skeleton, on one device / batch / resolution."""

    device: str
    batch: int
    latent: int
    dtype: str
    ms: dict[str, float] = field(default_factory=dict)  # config key -> ms, timed alone
    skeleton_ms: float = 0.0
    # A block timed alone runs with nothing dispatched between blocks; inside the UNet it costs a little more (3-10%
    # on CPU for the toy UNet's blocks, timed in the same rounds). The factor (measured - skeleton) / sum of block
    # medians, taken on the spec the table was built from, carries that over to every block; tests check it on
    # *other* (evolved) specs.
    in_situ: float = 1.0
    measured_ms: dict[str, float] = field(default_factory=dict)  # spec summary -> measured whole forward

    def save(self, path: str | Path) -> None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(dataclasses.asdict(self), indent=1)))

    @staticmethod
    def load(path: str | Path) -> LatencyTable:
        return LatencyTable(**json.loads(Path(path).read_text()))

    def block_ms(self, spec: ArchSpec) -> dict[str, float]:
        """Each block's latency by its configuration key; KeyError if a configuration was never timed."""
        keys = block_keys(spec, self.latent, self.batch)
        return {address: self.in_situ * self.ms[key] for address, key in keys.items()}

    def predict(self, spec: ArchSpec) -> float:
        """A UNet's latency per step: skeleton + sum of its blocks (Alg. 1's lookup)."""
        return self.skeleton_ms + sum(self.block_ms(spec).values())


def block_keys(spec: ArchSpec, latent: int, batch: int) -> dict[str, str]:
    """address -> configuration key: type, input/skip/output channels, token grid, batch (and heads for A)."""
    keys = {}
    for b in walk(spec)[0]:
        hw = max(1, -(-latent // 2 ** LEVEL[b.stage]))
        extra = f" h{spec.heads} ctx{spec.context_dim}" if b.name[0] == "A" else ""
        keys[f"{b.stage}.{b.name}"] = f"{b.name[0]} {b.c_in}+{b.c_skip}->{b.c_out} {hw}x{hw} b{batch}{extra}"
    return keys


@torch.no_grad()
def block_inputs(unet: UNet, latent: int, batch: int, context_len: int) -> dict[str, tuple]:
    """One forward pass with hooks: each block's actual input tensors (and the shared time embedding / text)."""
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    z = torch.randn(batch, unet.spec.in_channels, latent, latent, device=device, dtype=dtype)
    ctx = torch.randn(batch, context_len, unet.spec.context_dim, device=device, dtype=dtype)
    captured, hooks = {}, []
    for stage in STAGES:
        for name in unet.spec.stages[stage]:
            def hook(module, args, address=f"{stage}.{name}"):  # noqa: ANN001, ANN202
                captured[address] = tuple(a.clone() for a in args)
            hooks.append(unet.stages[stage][name].register_forward_pre_hook(hook))
    unet.eval()(z, torch.full((batch,), 500, device=device), ctx)
    for h in hooks:
        h.remove()
    return captured


def measure_table(unet: UNet, latent: int, batch: int = 2, context_len: int = 77, repeat: int = 20,
                  table: LatencyTable | None = None, log: bool = False) -> LatencyTable:
    """Time each block configuration of ``unet`` not yet in ``table``, the skeleton and the whole forward pass
    (warm-up, median of ``repeat``), all in the same interleaved rounds: the in-situ factor is a ratio of these
    timings, so a machine that slows down for a while must slow both sides of it alike."""
    device = next(unet.parameters()).device
    table = table or LatencyTable(str(device), batch, latent, str(next(unet.parameters()).dtype))
    inputs = block_inputs(unet, latent, batch, context_len)
    z, t, ctx = whole_inputs(unet, latent, batch, context_len)
    fns, new = {}, {}
    for address, key in block_keys(unet.spec, latent, batch).items():
        stage, name = address.split(".")
        block = unet.stages[stage][name]
        if key not in table.ms and key not in new.values():
            new[address] = key
            fns[address] = lambda b=block, a=inputs[address]: b(*a)
        if name[0] == "R" and block.conv_shortcut is not None:  # a dropped ResNet that changes width still runs
            fns["shortcut " + address] = lambda b=block, a=inputs[address][0]: b.shortcut(a)  # its 1x1 shortcut

    def skeleton() -> None:  # every block is the identity / its shortcut
        saved, unet.removed = unet.removed, set(unet.spec.addresses())
        try:
            unet(z, t, ctx)
        finally:
            unet.removed = saved

    fns["skeleton"], fns["whole"] = skeleton, lambda: unet.eval()(z, t, ctx)
    ms = {name: 1e3 * s for name, s in median_times(fns, 2, repeat, device).items()}
    for address, key in new.items():
        table.ms[key] = ms[address]
        if log:
            print(f"  {address:14s} {key:40s} {table.ms[key]:8.3f} ms")
    shortcut_ms = sum(v for name, v in ms.items() if name.startswith("shortcut "))
    table.skeleton_ms = max(0.0, ms["skeleton"] - shortcut_ms)
    table.measured_ms[spec_id(unet.spec)] = ms["whole"]
    alone = sum(table.ms[key] for key in block_keys(unet.spec, latent, batch).values())
    table.in_situ = (ms["whole"] - table.skeleton_ms) / alone if alone > 0 else 1.0
    return table


def whole_inputs(unet: UNet, latent: int, batch: int, context_len: int) -> tuple[torch.Tensor, ...]:
    p = next(unet.parameters())
    return (torch.randn(batch, unet.spec.in_channels, latent, latent, device=p.device, dtype=p.dtype),
            torch.full((batch,), 500, device=p.device),
            torch.randn(batch, context_len, unet.spec.context_dim, device=p.device, dtype=p.dtype))


def measure_unet(unet: UNet, latent: int, batch: int = 2, context_len: int = 77, repeat: int = 20) -> float:
    """Measured ms of one whole UNet forward pass (one sampling step with CFG when batch = 2)."""
    z, t, ctx = whole_inputs(unet, latent, batch, context_len)
    return 1e3 * median_time(lambda: unet.eval()(z, t, ctx), 2, repeat, z.device)


def spec_id(spec: ArchSpec) -> str:
    return " | ".join(f"{s}:{''.join(b[0] for b in spec.stages[s])}" for s in STAGES)


def block_costs(unet: UNet, latent: int, batch: int = 2, context_len: int = 77) -> dict[str, dict[str, float]]:
    """Parameters and MACs of every block at its real input shapes (the paper's Fig. 2, with latency from a table)."""
    inputs = block_inputs(unet, latent, batch, context_len)
    out = {}
    for address, args in inputs.items():
        stage, name = address.split(".")
        block = unet.stages[stage][name]
        out[address] = {"params": count_params(block), "macs": count_macs(lambda b=block, a=args: b(*a))}
    return out


def build_table(unet: UNet, latent: int, batch: int, context_len: int, path: str | None = None,
                n_threads: int = 1) -> LatencyTable:
    """Read the table at ``path`` if there is one (it must be of this batch and latent size), time the block
    configurations it lacks on ``n_threads`` CPU threads, and write it back. A table is of one device and dtype: one
    timed elsewhere is refused."""
    table = LatencyTable.load(path) if path and Path(path).is_file() else None
    p = next(unet.parameters())
    if table is not None and (table.batch, table.latent, table.device, table.dtype) != (batch, latent, str(p.device),
                                                                                        str(p.dtype)):
        raise ValueError(f"{path} was measured at batch {table.batch}, latent {table.latent} on {table.device} in "
                         f"{table.dtype}; this run needs batch {batch}, latent {latent} on {p.device} in {p.dtype} "
                         "(give another --table)")
    with threads(n_threads):
        table = measure_table(unet, latent, batch, context_len, table=table)
    if path:
        table.save(path)
    return table


def fig2(unet: UNet, table: LatencyTable, context_len: int, path: str | Path) -> None:
    """The paper's Fig. 2: latency (ms, from the table) and parameters (M) of every block."""
    costs = block_costs(unet, table.latent, table.batch, context_len)
    ms = table.block_ms(unet.spec)
    block_bars(list(costs), [ms[a] for a in costs], [c["params"] / 1e6 for c in costs.values()], path,
               f"Fig. 2: latency per block ({table.device}, batch {table.batch}, latent {table.latent}x"
               f"{table.latent}) and parameters")
