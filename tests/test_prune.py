"""§3.2 decoder pruning: exact at r = 1, kept weights are the original's at L1-chosen indices, ~1/4 cost at r = 0.5."""

import dataclasses

import pytest
import torch
from helpers import randomize, tiny_pipeline

from snapfusion_min import read_pipeline
from snapfusion_min.cost import count_params
from snapfusion_min.decoder_distill import DecoderConfig, synthetic_latents
from snapfusion_min.prune import kept_channels, prune_decoder, pruned_config
from snapfusion_min.training import LOCAL
from snapfusion_min.vae import TOY_VAE, VAE, VAEConfig

SMALL = TOY_VAE


def small_vae(seed: int = 0) -> VAE:
    return randomize(VAE(SMALL), seed).eval()


def test_ratio_one_is_exact():
    vae = small_vae()
    same = prune_decoder(vae, 1.0)
    z = torch.randn(2, 4, 8, 8)
    assert same.cfg == vae.cfg
    torch.testing.assert_close(same.decode(z), vae.decode(z), rtol=0, atol=0)


def test_kept_weights_are_the_originals_at_the_kept_indices():
    vae = small_vae(1)
    small = prune_decoder(vae, 0.5)
    out_index, in_index = kept_channels(vae, 0.5)
    old, new = vae.decoder.state_dict(), small.decoder.state_dict()
    assert set(old) == set(new)
    for key, value in new.items():
        module = key.rsplit(".", 1)[0]
        want = old[key]
        if module in out_index:
            want = want[out_index[module]]
        if module in in_index and want.dim() > 1:
            want = want[:, in_index[module]]
        torch.testing.assert_close(value, want, rtol=0, atol=0)
    # every layer that reads a channel axis reads the channels its writers kept
    assert torch.equal(out_index["conv_in"], in_index["mid.res1.conv1"])
    assert torch.equal(out_index["conv_in"], out_index["mid.attn.to_out"])
    assert torch.equal(out_index["levels.0.upsample"], in_index["levels.1.res.0.conv1"])
    assert torch.equal(out_index["levels.2.res.0.conv_shortcut"], out_index["levels.2.res.1.conv2"])
    assert torch.equal(out_index["mid.attn.to_q"], out_index["mid.attn.to_k"])


def test_sec3_2_selection_is_top_l1_within_each_groupnorm_group():
    vae = small_vae(2)
    out_index, _ = kept_channels(vae, 0.5)
    w = vae.decoder.levels[1].res[0].conv1.weight.detach()  # a hidden axis: conv1 alone writes it, norm2 groups it
    l1 = w.abs().sum(dim=(1, 2, 3))
    size = l1.numel() // SMALL.groups
    want = []
    for g in range(SMALL.groups):
        chunk = l1[g * size:(g + 1) * size]
        want += sorted(g * size + i for i in chunk.argsort(descending=True)[: size // 2].tolist())
    assert out_index["levels.1.res.0.conv1"].tolist() == want


def test_sd15_decoder_at_half_width_has_a_quarter_of_the_parameters():
    with torch.device("meta"):
        vae = VAE()
    cfg = pruned_config(vae.cfg, 0.5)
    with torch.device("meta"):
        small = VAE(cfg)
    p0, p1 = count_params(vae.decoder), count_params(small.decoder)
    assert cfg.decoder_channels == (256, 256, 128, 64)
    assert 49e6 < p0 < 50e6  # the paper's "50M"
    assert 12e6 < p1 < 13e6 and 0.24 < p1 / p0 < 0.26  # the paper's "13M"


def test_groups_merge_where_one_channel_per_group_would_be_left():
    """At r = 0.5 the toy decoder's last level (16 channels, 8 groups) would keep one channel per group, an instance
    norm; pairs of groups merge instead. SD-v1.5's decoder keeps its 32 groups."""
    assert pruned_config(VAEConfig(), 0.5).decoder_groups == 32
    cfg = pruned_config(SMALL, 0.5)
    assert (cfg.groups, cfg.decoder_groups) == (8, 4)
    small = prune_decoder(small_vae(), 0.5)
    norms = [m for m in small.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels // m.num_groups >= 2 for m in norms)
    assert all(m.num_groups == 8 for m in small.encoder.modules() if isinstance(m, torch.nn.GroupNorm))
    # each merged group holds the kept channels of two original groups, in order
    keep = kept_channels(small_vae(), 0.5)[0]["norm_out"]
    assert keep.tolist() == sorted(keep.tolist()) and (keep // 2).tolist() == list(range(8))


def test_pruned_decoder_keeps_output_shape_and_round_trips(tmp_path):
    vae = small_vae(3)
    small = prune_decoder(vae, 0.5)
    z = torch.randn(2, 4, 8, 8)
    assert small.decode(z).shape == vae.decode(z).shape == (2, 3, 64, 64)
    tiny_pipeline().with_parts(vae=small).save(tmp_path / "pruned.safetensors")
    again = read_pipeline(tmp_path / "pruned.safetensors")
    assert again.vae.cfg == small.cfg
    torch.testing.assert_close(again.vae.decode(z), small.decode(z), rtol=0, atol=0)
    full = tiny_pipeline().with_parts(vae=vae)
    full.set_decoder(again.vae, 0.5)  # a pipeline can decode with the pruned decoder
    assert full.vae.cfg.decoder_channels == (32, 32, 16, 8)


def test_bad_input():
    vae = small_vae()
    for r in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            prune_decoder(vae, r)
    pipe = tiny_pipeline().with_parts(vae=vae)
    wide = VAE(dataclasses.replace(TOY_VAE, latent_channels=8))
    with pytest.raises(ValueError, match="latents"):
        pipe.set_decoder(wide, 0.5)
    with pytest.raises(ValueError, match="latents"):
        pipe.set_decoder(vae, 0.18215)


def test_a_latent_cache_that_cannot_be_read_is_made_again(tmp_path, capsys):
    """A truncated cache, or a file that is not one (a pickle of anything else), is a warning and is made again."""
    pipe, cfg = tiny_pipeline(), DecoderConfig(latents=2, teacher_steps=1, latent_cache=str(tmp_path / "c.pt"))
    made = synthetic_latents(pipe, "init", cfg, str(tmp_path / "d"), LOCAL)
    good = (tmp_path / "c.pt").read_bytes()
    for bad in (good[:len(good) // 2], b"not a torch file"):
        (tmp_path / "c.pt").write_bytes(bad)
        again = synthetic_latents(pipe, "init", cfg, str(tmp_path / "d"), LOCAL)
        assert torch.equal(again, made) and "cannot be read" in capsys.readouterr().err
    torch.save([1, 2], tmp_path / "c.pt")  # readable, but not a cache
    assert torch.equal(synthetic_latents(pipe, "init", cfg, str(tmp_path / "d"), LOCAL), made)
