"""Architecture evolving (§3.1, Alg. 1): a latency lookup table, evolving actions on the spec, and their values.

* ``LatencyTable``: every R and A block timed at its real input shapes (resolution, CFG batch, dtype, device), keyed
  by what determines its cost -- type, channels, token grid, batch -- so an evolved spec's latency is predicted
  without timing it again (§2.2). The rest of the UNet (conv_in, time embedding, resamplers, conv_out) is one
  'skeleton' entry.
* Actions: A- removes a block, A+ copies one (the copy starts from its source's weights, right after it). A block
  may be acted on only if every other block keeps its shapes, so weights carry over. Cross-attention blocks can be
  removed or copied anywhere; a ResNet of the skip-free ``mid`` stage likewise; a ResNet of a down stage goes
  together with the up-stage ResNet that consumes its skip connection (one action, two blocks), else the U breaks.
* Value of an action (Alg. 1): dCLIP / dLatency, with dCLIP = CLIP(with block) - CLIP(without) (the block's
  contribution) and dLatency its latency from the table. Low value: removed first; high value: copied.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arch import DOWN_STAGES, LEVEL, STAGES, UP_STAGES, ArchSpec, walk
from .cost import count_macs, count_params, median_time, median_times
from .unet import UNet

PAIRS = {"down1": "up3", "down2": "up2", "down3": "up1", "mid_down": "mid_up"}


# ---- the spec edits ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    """Remove ('-') or copy ('+') the blocks at ``addresses`` (two for a down/up ResNet pair)."""

    kind: str
    addresses: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.kind}{'+'.join(self.addresses)}"


def _shapes(spec: ArchSpec) -> dict[str, tuple[int, int, int]]:
    return {f"{b.stage}.{b.name}": (b.c_in, b.c_skip, b.c_out) for b in walk(spec)[0]}


def _next_name(blocks: tuple[str, ...], kind: str) -> str:
    return f"{kind}{1 + max([int(b[1:]) for b in blocks if b[0] == kind], default=-1)}"


def apply(spec: ArchSpec, action: Action) -> tuple[ArchSpec, dict[str, str]]:
    """The evolved spec and, for copies, {new address: source address}. Raises ValueError for an invalid action."""
    stages = {s: list(b) for s, b in spec.stages.items()}
    copies = {}
    for address in action.addresses:
        stage, _, name = address.partition(".")
        if stage not in stages or name not in stages[stage]:
            raise ValueError(f"unknown block address {address!r}; blocks are {spec.addresses()}")
        i = stages[stage].index(name)
        if action.kind == "-":
            del stages[stage][i]
        else:
            new = _next_name(tuple(stages[stage]), name[0])
            stages[stage].insert(i + 1, new)
            copies[f"{stage}.{new}"] = address
    try:
        evolved = dataclasses.replace(spec, stages={s: tuple(b) for s, b in stages.items()})
    except ValueError as e:
        raise ValueError(f"action {action} breaks the architecture: {e}") from None
    before, after = _shapes(spec), _shapes(evolved)
    for address, shape in after.items():
        if before.get(copies.get(address, address)) != shape:
            raise ValueError(f"action {action} would change the shapes of {address}; its weights would not carry over")
    return evolved, copies


def candidate_actions(spec: ArchSpec, kind: str) -> list[Action]:
    """Every valid single action of ``kind`` ('-' or '+') on ``spec``: A blocks, mid ResNets, down/up ResNet pairs."""
    found = []
    for stage in STAGES:
        for name in spec.stages[stage]:
            groups = [(f"{stage}.{name}",)]
            if name[0] == "R" and stage in DOWN_STAGES:  # pair with the up ResNet popping this R-layer's skip
                up = PAIRS[stage]
                r_down = [b for b in spec.stages[stage] if b[0] == "R"]
                r_up = [b for b in spec.stages[up] if b[0] == "R"]
                k = r_down.index(name)
                groups = [(f"{stage}.{name}", f"{up}.{r_up[len(r_down) - 1 - k]}")]
            elif name[0] == "R" and stage in UP_STAGES:
                continue  # only as part of a pair
            if kind == "+" and name[0] == "R" and stage != "mid":
                continue  # a copied down-stage R would split its R-layer from its A blocks: not offered
            for addresses in groups:
                try:
                    apply(spec, Action(kind, addresses))
                except ValueError:
                    continue
                found.append(Action(kind, addresses))
    return found


def evolve_unet(unet: UNet, action: Action) -> UNet:
    """A new UNet of the evolved spec: kept blocks keep their weights, a copy starts as its source."""
    spec, copies = apply(unet.spec, action)
    new = UNet(spec).to(next(unet.parameters()).device)
    old = unet.state_dict()
    state = {}
    for key in new.state_dict():
        parts = key.split(".")
        if parts[0] == "stages" and f"{parts[1]}.{parts[2]}" in copies:
            src_stage, src_name = copies[f"{parts[1]}.{parts[2]}"].split(".")
            parts[1:3] = [src_stage, src_name]
        state[key] = old[".".join(parts)].clone()
    new.load_state_dict(state)
    new.keep_prob = unet.keep_prob
    return new.to(memory_format=unet.memory_format())


# ---- the latency lookup table (§2.2) ----------------------------------------------------------------------------
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
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

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
