"""Uniform channel slimming of the UNet (the arms' 'conventional pruning'): exact at ratio 1, L1 choice per axis,
every reader takes the channels its writers kept (skip concatenations at their offset, GEGLU's value and gate
together, q and k alike), the time MLP's inputs at the nearest frequency, and the ratio chosen by latency or size."""

import dataclasses

import pytest
import torch
from helpers import randomize

from snapfusion_min.arch import tiny, walk
from snapfusion_min.experiments.channel_slimming import (
    choose_ratio,
    frequency_map,
    kept_channels,
    slim_unet,
    slimmed_spec,
)
from snapfusion_min.unet import UNet, timestep_embedding


def tiny_unet(seed: int = 0) -> UNet:
    return randomize(UNet(tiny()), seed).eval()


def inputs(unet: UNet) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([700, 30]),
            torch.randn(2, 7, unet.spec.context_dim, generator=g))


def test_ratio_one_is_exact():
    unet = tiny_unet()
    same = slim_unet(unet, 1.0)
    assert same.spec == unet.spec
    with torch.no_grad():
        torch.testing.assert_close(same(*inputs(same)), unet(*inputs(unet)), rtol=0, atol=0)


def test_kept_weights_are_the_originals_at_the_kept_indices():
    unet = tiny_unet(3)
    small = slim_unet(unet, 0.5)
    out_index, in_index = kept_channels(unet, 0.5)
    old, new = unet.state_dict(), small.state_dict()
    assert set(old) == set(new)
    for key, value in new.items():
        module, want = key.rsplit(".", 1)[0], old[key]
        if module in out_index:
            want = want[out_index[module]]
        if module in in_index and want.dim() > 1:
            want = want[:, in_index[module]]
        torch.testing.assert_close(value, want, rtol=0, atol=0)


def plant(weight: torch.Tensor, keep: list[int]) -> None:
    """Make the output channels ``keep`` of ``weight`` the largest by L1 norm, 10^4 times the rest."""
    with torch.no_grad():
        weight[keep] *= 1e4


def test_each_reader_takes_the_channels_its_writers_kept():
    """Planted magnitudes fix which channels some axes keep at ratio 0.5; the layers that read them, as the UNet's
    forward pass reads them, must read exactly those."""
    unet = tiny_unet(1)
    s, spec = unet.stages, unet.spec
    stream = [4 * g + k for g in range(8) for k in (0, 3)]  # conv_in's 32 outputs: 2 of each GroupNorm group of 4
    plant(unet.conv_in.weight, stream)
    hidden = [8 * g + k for g in range(8) for k in (1, 4, 5, 6)]  # down2.R0's hidden width: 4 of each group of 8
    for w in (s.down2.R0.conv1.weight, s.down2.R0.time_emb_proj.weight):
        plant(w, hidden)
    value = [2 * i + i % 3 // 2 for i in range(128)]  # down2.A0's GEGLU: 256 channels, value rows, then gates
    plant(s.down2.A0.ff_in.weight, value + [256 + v for v in value])
    per_head = [16 * h + k for h in range(4) for k in range(0, 16, 2)]  # attn1's q . k: 8 of each head's 16
    plant(s.down2.A0.attn1.to_q.weight, per_head)
    with torch.no_grad():  # k alone would keep the other half of each head; q and k together keep q's
        s.down2.A0.attn1.to_k.weight[[i + 1 for i in per_head]] *= 10
    out, inp = kept_channels(unet, 0.5)
    # the level-0 stream: conv_in's kept outputs are normalised and read by down1's first ResNet, and, pushed as
    # the first skip connection, by up3's last ResNet after the channels of its input h: [h; skip]
    assert out["conv_in"].tolist() == stream
    for name in ("stages.down1.R0.conv1", "stages.down1.R1.conv1"):  # identity shortcuts: the same stream
        assert inp[name].tolist() == stream
    assert out["stages.down1.R0.norm1"].tolist() == stream
    last = f"up3.{[n for n in spec.stages['up3'] if n[0] == 'R'][-1]}"
    c_h = {f"{b.stage}.{b.name}": b.c_in for b in walk(spec)[0]}[last]
    for name in ("conv1", "conv_shortcut"):
        assert inp[f"stages.{last}.{name}"][-16:].tolist() == [c_h + i for i in stream]
    assert out[f"stages.{last}.norm1"][-16:].tolist() == [c_h + i for i in stream]
    # down2.R0's hidden width: conv1 and the time projection write it, norm2 normalises it, conv2 reads it
    for name, index in (("conv1", out), ("time_emb_proj", out), ("norm2", out), ("conv2", inp)):
        assert index[f"stages.down2.R0.{name}"].tolist() == hidden, name
    # GEGLU: value i and gate i kept together, ff_out reads the kept i
    assert out["stages.down2.A0.ff_in"].tolist() == value + [256 + v for v in value]
    assert inp["stages.down2.A0.ff_out"].tolist() == value
    # q and k keep the same channels, per head; v's kept channels are what to_out reads
    assert out["stages.down2.A0.attn1.to_q"].tolist() == out["stages.down2.A0.attn1.to_k"].tolist() == per_head
    assert torch.equal(out["stages.down2.A0.attn1.to_v"], inp["stages.down2.A0.attn1.to_out"])
    # the tokens' stream inside a transformer: proj_in writes it, LayerNorms normalise it, q / k / v read it
    a = "stages.down2.A0"
    assert all(torch.equal(out[f"{a}.proj_in"], index[f"{a}.{n}"]) for n, index in (
        ("norm1", out), ("attn1.to_q", inp), ("attn2.to_q", inp), ("ff_in", inp), ("proj_out", inp),
        ("attn2.to_out", out), ("ff_out", out)))
    # a downsampler's kept outputs are the next level's stream and a skip connection
    assert torch.equal(out["stages.down1.downsample"], inp["stages.down2.R0.conv1"])
    assert torch.equal(out["stages.down2.R0.conv_shortcut"], out["stages.down2.R0.conv2"])


def test_time_mlp_reads_the_nearest_frequency():
    """timestep_embedding(t, 16) at each kept input equals timestep_embedding(t, 32) at the mapped index: the
    frequencies 10000^(-k/8) are the even ones of 10000^(-k/16)."""
    t = torch.tensor([0, 17, 500, 999])
    index = frequency_map(32, 16)
    torch.testing.assert_close(timestep_embedding(t, 16), timestep_embedding(t, 32)[:, index])
    freq = lambda dim: torch.exp(-torch.log(torch.tensor(1e4)) * torch.arange(dim // 2) / (dim // 2))  # noqa: E731
    for j, i in enumerate(frequency_map(32, 24)[:12].tolist()):  # 24 -> 32: each the nearest on a log scale
        assert i == int((freq(32).log() - freq(24)[j].log()).abs().argmin())


def test_slimmed_model_saves_loads_and_runs(tmp_path):
    from helpers import tiny_pipeline

    from snapfusion_min import read_pipeline

    small = slim_unet(tiny_unet(2), 0.75)
    assert small.spec.channels == (24, 48, 48, 48)
    pipe = tiny_pipeline().with_parts(unet=small)
    pipe.save(tmp_path / "slim.safetensors")
    again = read_pipeline(tmp_path / "slim.safetensors").unet.eval()
    assert again.spec == small.spec
    for key, value in small.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with torch.no_grad():  # the loaded UNet may run channels-last: the same numbers up to float rounding
        torch.testing.assert_close(again(*inputs(again)), small.eval()(*inputs(small)), rtol=1e-5, atol=1e-5)


def test_choose_ratio_by_latency_then_by_size():
    sweep = [{"ratio": r, "measured_ms": ms, "params": n} for r, ms, n in
             [(0.9, 20.0, 900), (0.7, 14.0, 500), (0.5, 11.0, 260), (0.3, 9.0, 100)]]
    assert choose_ratio(sweep, 15.0, 10)["ratio"] == 0.7  # the largest that meets the latency
    assert choose_ratio(sweep, 8.0, 300)["ratio"] == 0.5  # none meets it: the nearest parameter count
    assert choose_ratio(sweep, 8.0, 450)["ratio"] == 0.7


def test_bad_input():
    spec = tiny()
    for r in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            slimmed_spec(spec, r)
    with pytest.raises(ValueError, match="changes its layers"):
        slimmed_spec(dataclasses.replace(spec, channels=(32, 40, 40, 40)), 0.1)  # 32 and 40 both -> 8
    with pytest.raises(ValueError, match="w-conditioned"):
        slimmed_spec(dataclasses.replace(spec, guidance_embed=16), 0.5)
