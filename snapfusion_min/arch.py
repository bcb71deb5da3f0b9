"""The UNet architecture spec: which ResNet (R) and cross-attention (A) blocks each stage has (paper §3.1, Table 3).

This is the project's central data structure. The UNet is built from it, robust training drops its blocks (Eq. 5),
architecture evolving edits it (Alg. 1), export reads it and every checkpoint carries it as JSON.

Stages follow the paper's Table 3. Its "Mid" row (resolution H/64, 7 ResNets and 1 cross-attention in SD-v1.5)
covers three parts of SD's UNet, kept apart here because they differ in how they use skip connections:

    stage      level  SD-v1.5 (diffusers)   SD-v1.5 blocks   snapfusion (our reading of Table 3)
    down1      0      down_blocks.0         R A R A          R R
    down2      1      down_blocks.1         R A R A          R A R A
    down3      2      down_blocks.2         R A R A          R A A
    mid_down   3      down_blocks.3         R R              R
    mid        3      mid_block             R A R            R A
    mid_up     3      up_blocks.0           R R R            R R
    up1        2      up_blocks.1           R A R A R A      R A A A R A A A
    up2        1      up_blocks.2           R A R A R A      R A R A R A
    up3        0      up_blocks.3           R A R A R A      R R R

Blocks have stable names ("R0", "A1", ...) rather than positions, so removing one block renames nothing else:
parameter keys are ``stages.<stage>.<name>.*`` and an evolving action is a small diff such as ``-A0@down2``.

Skip connections (the U of the UNet), for any spec:
  * pushed: the ``conv_in`` output, every downsampler output, and the output of each R in a down stage together with
    the A blocks that directly follow it ("R-layer");
  * popped: by every R of an up stage (concatenated to its input), last in first out.
Hence each level needs ``#R(up) == #R(down) + 1``; SD-v1.5 and Table 3 both satisfy it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

STAGES = ("down1", "down2", "down3", "mid_down", "mid", "mid_up", "up1", "up2", "up3")
LEVEL = {"down1": 0, "down2": 1, "down3": 2, "mid_down": 3, "mid": 3, "mid_up": 3, "up1": 2, "up2": 1, "up3": 0}
DOWN_STAGES = ("down1", "down2", "down3", "mid_down")  # push skips; the first three end in a downsampler
UP_STAGES = ("mid_up", "up1", "up2", "up3")  # pop skips; the first three end in an upsampler
PAPER_STAGE = {  # Table 3's row for each stage
    "down1": "Down-1", "down2": "Down-2", "down3": "Down-3", "mid_down": "Mid", "mid": "Mid", "mid_up": "Mid",
    "up1": "Up-1", "up2": "Up-2", "up3": "Up-3",
}
_BLOCK_NAME = re.compile(r"^[RA]\d+$")


def _blocks(pattern: str) -> tuple[str, ...]:
    """'RARA' -> ('R0', 'A0', 'R1', 'A1'): each type numbered in order."""
    count = {"R": 0, "A": 0}
    names = []
    for kind in pattern:
        names.append(f"{kind}{count[kind]}")
        count[kind] += 1
    return tuple(names)


@dataclass(frozen=True)
class ArchSpec:
    """A UNet: channel widths per level, text-conditioning width, and the ordered blocks of every stage."""

    stages: dict[str, tuple[str, ...]]  # stage -> ordered block names, e.g. {"down1": ("R0", "A0", "R1", "A1"), ...}
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width of levels 0..3 (resolution H/8 .. H/64)
    context_dim: int = 768  # width of the text embedding c (CLIP ViT-L/14: 768)
    heads: int = 8  # attention heads (diffusers calls this `attention_head_dim=8` for SD-v1.5)
    groups: int = 32  # GroupNorm groups
    in_channels: int = 4  # latent channels
    out_channels: int = 4
    guidance_embed: int = 0  # w-conditioned (Meng et al.): width of the guidance scale's embedding (LCM: 256); 0: none

    def __post_init__(self) -> None:
        if set(self.stages) != set(STAGES):
            _fail(f"stages must be exactly {STAGES}, got {sorted(self.stages)}")
        object.__setattr__(self, "stages", {s: tuple(self.stages[s]) for s in STAGES})
        object.__setattr__(self, "channels", tuple(self.channels))
        if len(self.channels) != 4:
            _fail(f"channels needs 4 levels, got {self.channels}")
        if not (isinstance(self.guidance_embed, int) and self.guidance_embed >= 0 and self.guidance_embed % 2 == 0):
            _fail(f"guidance_embed must be an even integer >= 0 (0: no w input), got {self.guidance_embed!r}")
        for c in self.channels:
            if c % self.groups or c % self.heads:
                _fail(f"channel width {c} must be divisible by groups={self.groups} and heads={self.heads}")
        for stage, blocks in self.stages.items():
            for name in blocks:
                if not _BLOCK_NAME.match(name):
                    _fail(f"bad block name {name!r} in stage {stage} (expected R<k> or A<k>)")
            if len(set(blocks)) != len(blocks):
                _fail(f"duplicate block names in stage {stage}: {blocks}")
        pairs = [("down1", "up3"), ("down2", "up2"), ("down3", "up1"), ("mid_down", "mid_up")]
        for down, up in pairs:
            n_down, n_up = self.count(down, "R"), self.count(up, "R")
            if n_up != n_down + 1:
                _fail(f"{up} has {n_up} ResNets but must have #R({down}) + 1 = {n_down + 1}: "
                      "each up-stage ResNet consumes one skip connection")
        for stage in ("down2", "down3"):  # channel width changes at the stage's first ResNet
            if self.channels[LEVEL[stage]] != self.channels[LEVEL[stage] - 1] and self.count(stage, "R") == 0:
                _fail(f"{stage} changes width and needs at least one ResNet")

    def count(self, stage: str, kind: str) -> int:
        return sum(name[0] == kind for name in self.stages[stage])

    def addresses(self) -> list[str]:
        """Every block as 'stage.name', in execution order."""
        return [f"{stage}.{name}" for stage in STAGES for name in self.stages[stage]]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @staticmethod
    def from_json(text: str | dict) -> ArchSpec:
        """A spec from its JSON (``to_json``); ValueError naming what is missing or wrong."""
        try:
            d = json.loads(text) if isinstance(text, str) else dict(text)
            d["stages"] = {k: tuple(v) for k, v in d["stages"].items()}
            d["channels"] = tuple(d["channels"])
            return ArchSpec(**d)
        except json.JSONDecodeError as e:
            raise ValueError(f"architecture spec is not JSON ({e})") from None
        except KeyError as e:
            raise ValueError(f"architecture spec has no {e.args[0]!r} entry") from None
        except (TypeError, AttributeError) as e:
            raise ValueError(f"architecture spec is malformed ({e})") from None

    def summary(self) -> str:
        """One line per paper stage: '#A / #R' as in Table 3."""
        rows = []
        for row in dict.fromkeys(PAPER_STAGE.values()):
            stages = [s for s in STAGES if PAPER_STAGE[s] == row]
            n_a = sum(self.count(s, "A") for s in stages)
            n_r = sum(self.count(s, "R") for s in stages)
            rows.append(f"{row:7s} A={n_a} R={n_r}  " + " | ".join(" ".join(self.stages[s]) or "-" for s in stages))
        return "\n".join(rows)


def _fail(msg: str):
    raise ValueError(msg)


def _preset(patterns: dict[str, str], **kw) -> ArchSpec:
    return ArchSpec(stages={s: _blocks(p) for s, p in patterns.items()}, **kw)


def sd15() -> ArchSpec:
    """Stable Diffusion v1.5's UNet (859.5M parameters)."""
    return _preset({
        "down1": "RARA", "down2": "RARA", "down3": "RARA", "mid_down": "RR",
        "mid": "RAR", "mid_up": "RRR", "up1": "RARARA", "up2": "RARARA", "up3": "RARARA",
    })


def snapfusion() -> ArchSpec:
    """SnapFusion's efficient UNet, our reading of Table 3 (see README, 'Paper notes').

    Table 3 gives only block counts per stage. Down-1/Up-3 lose all cross-attention; Down-3 keeps 2 A and 1 R;
    Up-1 has 6 A and 2 R, read here as two R-layers each followed by three A. Mid has 1 A and 4 R: of the 14 splits
    over mid_down | mid | mid_up that keep one skip per up-stage ResNet (README, 'Paper notes'), those with
    R | . | R R have more parameters than those with - | . | R (``tests/test_unet.py::test_table3_mid_row_splits``
    counts both); we take the larger (closer to Table 1's 848M) with the A where SD-v1.5 has it, in the mid block:
    R | R A | R R.
    """
    return _preset({
        "down1": "RR", "down2": "RARA", "down3": "RAA", "mid_down": "R",
        "mid": "RA", "mid_up": "RR", "up1": "RAAARAAA", "up2": "RARARA", "up3": "RRR",
    })


def tiny(context_dim: int = 32) -> ArchSpec:
    """SD-v1.5's block layout at toy widths, for tests and the toy world."""
    return dataclasses.replace(sd15(), channels=(32, 64, 64, 64), context_dim=context_dim, heads=4, groups=8)


def toy(context_dim: int = 32) -> ArchSpec:
    """The toy world's teacher: ``tiny`` without cross-attention at the finest level, as Table 3's Down-1 and Up-3.
    On the toy world's 16x16 latent, attention over its 256 positions would double the cost of a training step."""
    t = tiny(context_dim)
    return dataclasses.replace(t, stages={**t.stages, "down1": _blocks("RR"), "up3": _blocks("RRR")})


PRESETS = {"sd15": sd15, "snapfusion": snapfusion, "tiny": tiny, "toy": toy}


def preset(name: str) -> ArchSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown architecture preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()


@dataclass(frozen=True)
class BlockShape:
    """Input, skip and output channels of one block, found by walking the spec (same walk as the forward pass)."""

    stage: str
    name: str
    c_in: int
    c_skip: int  # channels concatenated from a skip connection (up-stage ResNets), else 0
    c_out: int
    level: int = field(default=0)


def skip_points(blocks: tuple[str, ...]) -> list[bool]:
    """For a down stage: True after each block that ends an R-layer (an R and the A blocks right after it)."""
    out = []
    for i in range(len(blocks)):
        next_is_r = i + 1 == len(blocks) or blocks[i + 1][0] == "R"
        out.append(next_is_r and any(b[0] == "R" for b in blocks[: i + 1]))
    return out


def walk(spec: ArchSpec) -> tuple[list[BlockShape], dict[str, int]]:
    """Channel bookkeeping of the forward pass: each block's shape in execution order, and each stage's output width.

    Mirrors ``UNet.forward`` step by step; a single skip stack suffices because pushes and pops nest level by level.
    """
    c = spec.channels
    h = c[0]
    skips = [h]  # conv_in output
    shapes, stage_out = [], {}
    for stage in STAGES:
        level = LEVEL[stage]
        blocks = spec.stages[stage]
        for name, push in zip(blocks, skip_points(blocks)):
            c_skip = skips.pop() if (stage in UP_STAGES and name[0] == "R") else 0
            c_out = c[level] if name[0] == "R" else h
            shapes.append(BlockShape(stage, name, h, c_skip, c_out, level))
            h = c_out
            if stage in DOWN_STAGES and push:
                skips.append(h)
        if stage in DOWN_STAGES[:3]:
            skips.append(h)  # downsampler output
        stage_out[stage] = h
    return shapes, stage_out
