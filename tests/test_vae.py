"""SD's VAE against diffusers' AutoencoderKL on the same (random) weights, at SD-v1.5's full widths."""

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import max_rel_err, randomize

from snapfusion_min.formats.weights import apply_map, vae_source_key
from snapfusion_min.vae import VAE, VAEConfig


@pytest.mark.full_size  # run alone: memory
def test_sd15_vae_equals_diffusers():
    ref = randomize(AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4)).eval()
    ours = VAE(VAEConfig()).eval()
    apply_map(ours, ref.state_dict(), lambda k: [vae_source_key(k, "diffusers")], "VAE")
    assert sum(p.numel() for p in ours.decoder.parameters()) == 49_490_199  # the paper's "50M" decoder
    z, x = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert max_rel_err(ours.decode(z), ref.decode(z).sample) < 1e-4
        assert max_rel_err(ours.encode(x, sample=False), ref.encode(x).latent_dist.mean) < 1e-4
