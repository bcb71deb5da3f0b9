"""Loading SD-v1.5's single-file (LDM) release, checked against diffusers' own converter, and refusing bad files."""

import pickle
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from helpers import max_rel_err, random_model
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from snapfusion_min import CheckpointError, read_pipeline
from snapfusion_min.arch import sd15
from snapfusion_min.formats.checkpoint import read_state_dict
from snapfusion_min.formats.weights import to_ldm
from snapfusion_min.text_encoder import TextEncoder, Tokenizer
from snapfusion_min.unet import UNet
from snapfusion_min.vae import VAE

pytestmark = pytest.mark.full_size  # the 6 GB LDM file and SD-v1.5 in three copies: run alone (memory)

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def random_ldm_state_dict() -> dict[str, torch.Tensor]:
    """A random SD-v1.5-shaped LDM file: our key tables name the LDM keys (weights.to_ldm), the converter below checks
    them."""
    state = to_ldm(random_model(lambda: UNet(sd15()), 1), random_model(VAE, 2), random_model(TextEncoder, 3))
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["alphas_cumprod"] = torch.rand(1000)  # LatentDiffusion's own buffers sit beside the models
    return state


@pytest.fixture(scope="module")
def ldm_file(tmp_path_factory):
    """The random LDM file, with EMA copies (half the weights, in fp16 as SD's half-precision releases store them)
    under LDM's names. Written once for this module and deleted when its tests end: it is 6 GB."""
    folder = tmp_path_factory.mktemp("ldm")
    path = folder / "v1-5-random.safetensors"
    state = random_ldm_state_dict()
    for k in [k for k in state if k.startswith("model.diffusion_model.")]:
        state["model_ema." + "".join(k.split(".")[1:])] = (state[k] * 0.5).half()
    save_file(state, str(path))
    yield path, state
    shutil.rmtree(folder)


@pytest.mark.slow
def test_ldm_single_file_equals_diffusers_converter(ldm_file):
    """The same random LDM file, loaded by us and by diffusers.loaders.single_file_utils, gives equal outputs."""
    path, state = ldm_file
    pipe = read_pipeline(path)
    with torch.device("meta"):  # no time in the default initialisation: every weight is assigned from the file
        ref_unet, ref_vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
    ref_unet.load_state_dict(convert_ldm_unet_checkpoint(state, ref_unet.config), assign=True)
    ref_vae.load_state_dict(convert_ldm_vae_checkpoint(state, ref_vae.config), assign=True)
    ref_text = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
                                            num_attention_heads=12, num_hidden_layers=12))
    clip = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(state).items()}
    ref_text.load_state_dict(clip, strict=False)
    z, c, tokens = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 768), Tokenizer()(["a cat", "a dog on a sofa"])
    with torch.no_grad():
        assert max_rel_err(pipe.unet(z, 500, c), ref_unet.eval()(z, 500, c).sample) < 1e-4
        assert max_rel_err(pipe.vae.decode(z[:1, :, :8, :8]), ref_vae.eval().decode(z[:1, :, :8, :8]).sample) < 1e-4
        assert max_rel_err(pipe.text_encoder(tokens), ref_text.eval()(tokens).last_hidden_state) < 1e-5
    assert pipe.prediction == "eps"


@pytest.mark.slow
def test_ema_weights_are_picked_on_request(ldm_file):
    """(The plain weights are the first test's: equal to diffusers' converter, which leaves EMA alone.)"""
    path, state = ldm_file
    averaged = read_pipeline(path, ema=True).unet.state_dict()["stages.down1.R0.conv1.weight"]
    plain = state["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    torch.testing.assert_close(averaged, (plain * 0.5).half().float(), rtol=0, atol=0)


def test_missing_ema_is_a_clear_error(tmp_path):
    """Checked before any weight is mapped, so a file with a few LDM keys and no model_ema.* shows it."""
    path = tmp_path / "no-ema.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "model.diffusion_model.out.2.bias": torch.zeros(4)}, str(path))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        read_pipeline(path, ema=True)


def test_ckpt_is_read_without_unpickling_code(tmp_path):
    good = tmp_path / "v1-5.ckpt"
    tensors = {"model.diffusion_model.conv_in.weight": torch.randn(3, 3)}
    torch.save({"state_dict": tensors, "global_step": 840000}, good)
    assert read_state_dict(good).keys() == tensors.keys()  # Lightning wrapper unwrapped, plain ints allowed

    class Payload:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('x')",))

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, f)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_pipeline(evil)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_corrupt_truncated_and_foreign_files_are_named(tmp_path, ldm_file):
    path, state = ldm_file
    truncated = tmp_path / "truncated.safetensors"
    with open(path, "rb") as f:  # the header and the first tensors, not a 6 GB read
        truncated.write_bytes(f.read(100_000))
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        read_pipeline(truncated)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt|refused"):
        read_pipeline(garbage)
    other = tmp_path / "vit.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion v1 checkpoint"):
        read_pipeline(other)
    # SD-2's UNet in the LDM layout, cut to a few keys (a full copy would be 6 GB): the mis-shaped key is named
    sd2_like = {k: state[k] for k in list(state)[:8] if k.startswith("model.diffusion_model.")}
    sd2_like["cond_stage_model.model.token_embedding.weight"] = torch.zeros(49408, 1024)
    sd2_like["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = torch.zeros(320, 320)  # SD-2: linear
    sd2 = tmp_path / "sd2.safetensors"
    save_file(sd2_like, str(sd2))
    with pytest.raises(CheckpointError, match=r"mis-shaped: input_blocks\.1\.1\.proj_in\.weight"):
        read_pipeline(sd2)
    with pytest.raises(FileNotFoundError):
        read_pipeline(tmp_path / "nope.safetensors")
