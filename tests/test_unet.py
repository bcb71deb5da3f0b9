"""The UNet built from an architecture spec, against diffusers' UNet2DConditionModel on the same weights."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import max_rel_err, random_model, randomize

from snapfusion_min.arch import ArchSpec, preset, sd15, snapfusion, tiny, walk
from snapfusion_min.formats.weights import apply_map, unet_source_key
from snapfusion_min.unet import UNet


def diffusers_unet(spec: ArchSpec) -> UNet2DConditionModel:
    return UNet2DConditionModel(block_out_channels=spec.channels, cross_attention_dim=spec.context_dim,
                                attention_head_dim=spec.heads, norm_num_groups=spec.groups, layers_per_block=2)


def ours_from(ref: UNet2DConditionModel, spec: ArchSpec) -> UNet:
    with torch.device("meta"):  # every parameter is assigned below: no time in the default initialisation
        unet = UNet(spec)
    unet = unet.to_empty(device="cpu").eval()
    apply_map(unet, ref.state_dict(), lambda k: [unet_source_key(k, "diffusers")], "UNet")
    return unet


@pytest.mark.full_size  # run alone: memory
def test_sd15_unet_equals_diffusers_full_size():
    """SD-v1.5's full UNet (859.5M parameters, random weights) on a 16x16 latent, batch 2 as with CFG."""
    spec = sd15()
    ref = random_model(lambda: diffusers_unet(spec)).eval()
    ours = ours_from(ref, spec)
    n_ours, n_ref = sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in ref.parameters())
    assert n_ours == n_ref == 859_520_964
    z, c = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 768)
    t = torch.tensor([999, 1])
    with torch.no_grad():
        err = max_rel_err(ours(z, t, c), ref(z, t, c).sample)
    assert err < 1e-4, err


@pytest.mark.parametrize("size", [(16, 16), (24, 40), (13, 9)])  # odd sizes: upsampling follows the skip's size
def test_tiny_unet_equals_diffusers(size):
    spec = tiny()
    ref = randomize(diffusers_unet(spec), seed=1).eval()
    ours = ours_from(ref, spec)
    z, c = torch.randn(2, 4, *size), torch.randn(2, 77, spec.context_dim)
    with torch.no_grad():
        assert max_rel_err(ours(z, 321, c), ref(z, 321, c).sample) < 1e-5


def test_table3_snapfusion_preset_counts():
    """Table 3, 'Ours' column: (#cross-attention, #ResNet) per paper stage."""
    table3 = {"Down-1": (0, 2), "Down-2": (2, 2), "Down-3": (2, 1), "Mid": (1, 4),
              "Up-1": (6, 2), "Up-2": (3, 3), "Up-3": (0, 3)}
    origin = {"Down-1": (2, 2), "Down-2": (2, 2), "Down-3": (2, 2), "Mid": (1, 7),
              "Up-1": (3, 3), "Up-2": (3, 3), "Up-3": (3, 3)}
    for spec, expected in ((snapfusion(), table3), (sd15(), origin)):
        for line in spec.summary().splitlines():
            row, a, r = line.split()[:3]
            assert (int(a[2:]), int(r[2:])) == expected[row], line


def test_every_preset_runs_and_keeps_shape():
    for name in ("snapfusion", "tiny", "toy"):
        spec = preset(name)
        spec = spec if name != "snapfusion" else ArchSpec.from_json({**json.loads(spec.to_json()),
                                                               "channels": [32, 64, 64, 64], "heads": 4, "groups": 8})
        unet = UNet(spec).eval()
        with torch.no_grad():
            assert unet(torch.randn(1, 4, 16, 16), 10, torch.randn(1, 77, spec.context_dim)).shape == (1, 4, 16, 16)


def test_spec_json_round_trip_and_stable_keys():
    spec = snapfusion()
    assert ArchSpec.from_json(spec.to_json()) == spec
    keys = UNet(tiny()).state_dict().keys()
    assert "stages.down2.A1.attn2.to_k.weight" in keys and "stages.up1.R2.conv_shortcut.weight" in keys


def test_spec_validation_names_the_problem():
    stages = dict(sd15().stages)
    stages["up3"] = ("R0", "A0", "R1", "A1")  # one ResNet short of down1's skips
    with pytest.raises(ValueError, match="up3 has 2 ResNets"):
        ArchSpec(stages=stages)
    with pytest.raises(ValueError, match="unknown architecture preset"):
        preset("sd21")


def test_walk_matches_built_modules():
    unet = UNet(tiny())
    for b in walk(tiny())[0]:
        block = unet.stages[b.stage][b.name]
        width = block.conv1.in_channels if b.name[0] == "R" else block.proj_in.in_channels
        assert width == b.c_in + b.c_skip


def test_eq5_dropping_blocks_keeps_shapes_and_extremes():
    """Eq. 5: with p = 1 nothing is dropped; with p = 0 every block is the identity (shortcut for ResNets)."""
    unet = randomize(UNet(tiny()))
    z, c = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 32)
    with torch.no_grad():
        full = unet.eval()(z, 5, c)
        unet.train().keep_prob = 1.0
        torch.testing.assert_close(unet(z, 5, c), full)
        unet.keep_prob = 0.0
        dropped = unet(z, 5, c)
        unet.eval().removed = set(tiny().addresses())
        torch.testing.assert_close(unet(z, 5, c), dropped)
        assert dropped.shape == z.shape and not torch.allclose(dropped, full)
        unet.removed = {"down2.A0"}
        assert not torch.allclose(unet(z, 5, c), full)


def block_runs(unet: UNet, passes: int, z: torch.Tensor, c: torch.Tensor) -> tuple[list[str], torch.Tensor, dict]:
    """Forward ``passes`` times; which blocks ran in each pass ([passes, blocks] of 0/1), and the calls of every
    width-changing ResNet's 1x1 projection."""
    addresses, ran, hooks, projections = unet.spec.addresses(), [], [], {}
    for address in addresses:
        stage, name = address.split(".")
        block = unet.stages[stage][name]
        hooks.append(block.register_forward_pre_hook(lambda m, a, address=address: ran[-1].add(address)))
        if name[0] == "R" and block.conv_shortcut is not None:
            projections[address] = 0

            def count(m, a, address=address):
                projections[address] += 1
            hooks.append(block.conv_shortcut.register_forward_pre_hook(count))
    with torch.no_grad():
        for _ in range(passes):
            ran.append(set())
            unet(z, 500, c)
    for h in hooks:
        h.remove()
    return addresses, torch.tensor([[a in r for a in addresses] for r in ran], dtype=torch.float64), projections


def test_eq5_keeps_each_block_with_probability_p_independently():
    """Eq. 5: each block runs with probability p in every training pass, independently of the others (binomial
    bounds over 400 passes); in eval mode every block runs; a dropped ResNet of changing width keeps its 1x1 path."""
    unet, p, n = randomize(UNet(tiny())).train(), 0.7, 400
    unet.keep_prob = p
    z, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    torch.manual_seed(0)
    addresses, ran, projections = block_runs(unet, n, z, c)
    sd = (n * p * (1 - p)) ** 0.5
    assert ((ran.sum(0) - n * p).abs() < 4.5 * sd).all(), ran.sum(0)  # each block: 280 +- 41
    assert abs(ran.sum() - n * p * len(addresses)) < 4.5 * sd * len(addresses) ** 0.5  # all together
    both = ran.T @ ran  # passes in which blocks i and j both ran: binomial(n, p^2) if independent
    off = ~torch.eye(len(addresses), dtype=torch.bool)
    sd2 = (n * p * p * (1 - p * p)) ** 0.5
    assert ((both[off] - n * p * p).abs() < 5 * sd2).all(), both[off].max()  # 196 +- 50 (shared draws: 280)
    assert projections and all(k == n for k in projections.values())  # forward or dropped, the 1x1 path runs
    _, ran_eval, projections = block_runs(unet.eval(), 20, z, c)
    assert ran_eval.all() and all(k == 20 for k in projections.values())


@torch.no_grad()
def test_a_dropped_resnet_of_changing_width_is_its_1x1_projection():
    """Eq. 5's identity for a ResNet whose input and output widths differ: h = W_1x1 x + b, nothing else."""
    unet = randomize(UNet(tiny())).eval()
    for address in ("down2.R0", "up1.R0", "up3.R1"):
        stage, name = address.split(".")
        block = unet.stages[stage][name]
        c_in = block.conv1.in_channels
        x = torch.randn(2, c_in, 4, 4)
        want = torch.einsum("oi,bihw->bohw", block.conv_shortcut.weight[:, :, 0, 0], x) + \
            block.conv_shortcut.bias[None, :, None, None]
        torch.testing.assert_close(block.shortcut(x), want)
        assert not torch.allclose(block(x, torch.randn(2, 128)), want)


def test_table3_mid_row_splits():
    """Table 3's Mid row (1 A, 4 R) over mid_down | mid | mid_up: every split ArchSpec accepts and its size. The
    README lists them; the preset's split is one of the largest (closest to Table 1's 848M)."""
    import dataclasses
    import itertools

    from snapfusion_min.arch import _blocks

    base, sizes = snapfusion(), {}
    for word in {"".join(w) for w in itertools.permutations("ARRRR")}:
        for i, j in itertools.combinations_with_replacement(range(6), 2):
            parts = (word[:i], word[i:j], word[j:])
            try:
                spec = dataclasses.replace(base, stages=dict(base.stages, **{s: _blocks(p) for s, p in zip(
                    ("mid_down", "mid", "mid_up"), parts)}))
            except ValueError:
                continue
            with torch.device("meta"):
                sizes[" | ".join(" ".join(p) or "-" for p in parts)] = round(sum(
                    p.numel() for p in UNet(spec).parameters()) / 1e6, 1)
    assert sizes == {
        **dict.fromkeys(["R | R A | R R", "R | A R | R R", "R A | R | R R", "A R | R | R R", "R | R | A R R",
                         "R | R | R A R", "R | R | R R A"], 759.3),
        **dict.fromkeys(["- | R R R A | R", "- | R R A R | R", "- | R A R R | R", "- | A R R R | R", "- | R R R | A R",
                         "- | R R R | R A", "A | R R R | R"], 741.3)}
    chosen = " | ".join(" ".join(base.stages[s]).replace("0", "").replace("1", "") or "-"
                        for s in ("mid_down", "mid", "mid_up"))
    assert chosen == "R | R A | R R" and sizes[chosen] == max(sizes.values())
