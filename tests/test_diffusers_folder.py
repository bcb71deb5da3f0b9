"""Back to diffusers: ``export.diffusers_folder.save_diffusers`` inverts the key tables exactly, and diffusers' own
``StableDiffusionPipeline.from_pretrained`` draws our images from the folder it writes."""

import dataclasses
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import ROOT, max_rel_err, run_main, tiny_pipeline
from safetensors.torch import load_file
from test_pipeline import reference

from snapfusion_min import CheckpointError, read_pipeline
from snapfusion_min.arch import ArchSpec
from snapfusion_min.export.diffusers_folder import NotExpressible, save_diffusers
from snapfusion_min.formats.weights import clip_state
from snapfusion_min.pipeline import SamplerConfig
from snapfusion_min.prune import prune_decoder
from snapfusion_min.unet import UNet

FILES = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
         "text_encoder/model.safetensors"]


def test_diffusers_folder_round_trip_is_bitwise(tmp_path):
    """diffusers folder -> ours -> diffusers folder: the same keys and the very same tensors in every part, and the
    configs that matter unchanged. (The text encoder is written with SD-v1.5's 'text_model.' prefix, which
    transformers 4 needs and 5 reads; transformers 5 itself saves without it.)"""
    reference("v_prediction", "trailing", tmp_path / "ref")
    save_diffusers(read_pipeline(tmp_path / "ref"), tmp_path / "out")
    for name in FILES:
        want, got = (clip_state(load_file(tmp_path / f / name)) for f in ("ref", "out"))
        assert sorted(got) == sorted(want), name
        for k in want:
            assert torch.equal(got[k], want[k]), k
    for part, keys in (("unet", ["block_out_channels", "cross_attention_dim", "attention_head_dim", "norm_num_groups",
                                 "layers_per_block", "down_block_types", "up_block_types"]),
                       ("vae", ["block_out_channels", "norm_num_groups", "layers_per_block", "latent_channels",
                                "scaling_factor"]),
                       ("text_encoder", ["hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_hidden_layers", "hidden_act", "max_position_embeddings"]),
                       ("scheduler", ["prediction_type", "timestep_spacing", "set_alpha_to_one", "beta_schedule"])):
        config = "scheduler_config.json" if part == "scheduler" else "config.json"
        want, got = (json.loads((tmp_path / f / part / config).read_text()) for f in ("ref", "out"))
        assert {k: got[k] for k in keys} == {k: want[k] for k in keys}, part


@pytest.mark.parametrize("sampler", [None, SamplerConfig(steps=8, guidance=3.0, spacing="trailing", resolution=64,
                                                         distilled=True)])
def test_diffusers_draws_our_images(tmp_path, sampler):
    """The bundled toy model (v-prediction, leading grid, toy widths, no cross-attention at the finest level, a
    3-level one-ResNet VAE, a 32-token text encoder) and the same model as an 8-step trailing-grid student: diffusers'
    pipeline loaded from the written folder gives our images from the same initial latents, with the guidance scale
    and steps the folder's user is told to pass; read back, the folder is the same architecture."""
    pipe = read_pipeline(ROOT / "models" / "toy" / "model.safetensors")
    pipe = pipe.with_parts(sampler=sampler) if sampler else pipe
    save_diffusers(pipe, tmp_path / "toy")
    assert read_pipeline(tmp_path / "toy").unet.spec.stages == pipe.unet.spec.stages
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "toy")
    theirs.set_progress_bar_config(disable=True)
    s = pipe.sampler
    assert (theirs.scheduler.config.timestep_spacing, theirs.scheduler.config.prediction_type) == (
        s.spacing, "v_prediction")
    prompts = ["a large red circle at the top left on a dark background", "a small blue square in the center"]
    side = 64 // pipe.vae.cfg.factor
    latents = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    want = pipe(prompts, latents=latents, output_type="pt")
    got = theirs(prompts, num_inference_steps=s.steps, guidance_scale=s.guidance, height=64, width=64,
                 latents=latents * theirs.scheduler.init_noise_sigma, output_type="pt").images
    assert max_rel_err(got, want) < 1e-4
    assert max_rel_err(pipe(prompts[::-1], latents=latents, output_type="pt"), want) > 0.05  # the bound tells apart


def test_what_diffusers_cannot_express_is_refused_before_writing(tmp_path):
    pipe = tiny_pipeline()
    evolved = dataclasses.replace(pipe.unet.spec, stages={**pipe.unet.spec.stages, "down1": ("R0", "A0", "R1")})
    cases = [(pipe.with_parts(unet=UNet(ArchSpec(**{**dataclasses.asdict(evolved), "stages": evolved.stages}))),
              r"cannot express this architecture spec \(down1 is R0 A0 R1\)"),
             (pipe.with_parts(vae=prune_decoder(pipe.vae, 0.5)), r"do not mirror the encoder's .*: pruned \(§3.2\)")]
    removed = tiny_pipeline()
    removed.unet.removed = {"down2.A1"}
    cases.append((removed, r"blocks \['down2.A1'\] are switched off"))
    for bad, message in cases:
        with pytest.raises(NotExpressible, match=message):
            save_diffusers(bad, tmp_path / "out")
        assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # nothing written, no temp left
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        save_diffusers(pipe, tmp_path / "used")
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["keep.txt"]


def test_a_folder_of_other_block_types_is_refused_naming_them(tmp_path):
    """A diffusers UNet whose stages are neither SD-v1.5's nor its ResNets alone (here a fifth level) is one error."""
    save_diffusers(tiny_pipeline(), tmp_path / "f")
    config = tmp_path / "f" / "unet" / "config.json"
    for down in (["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                 ["CrossAttnDownBlock2D"] * 4 + ["DownBlock2D"]):
        config.write_text(json.dumps({**json.loads(config.read_text()), "down_block_types": down}))
        with pytest.raises(CheckpointError, match=r"are not SD-v1.5's stages with or without cross-attention"):
            read_pipeline(tmp_path / "f")


def test_export_to_diffusers_command(tmp_path, capsys):
    assert run_main("export.py", "--to", "diffusers", "--out-dir", str(tmp_path / "toy")) == 0
    s = read_pipeline(ROOT / "models" / "toy" / "model.safetensors").sampler  # the bundled model's own settings
    assert f"num_inference_steps={s.steps}, guidance_scale={s.guidance:g})" in capsys.readouterr().out
    assert json.loads((tmp_path / "toy" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    again = run_main("export.py", "--to", "diffusers", "--out-dir", str(tmp_path / "toy"))
    assert again == f"export.py: error: --out-dir {tmp_path / 'toy'} is not empty; a diffusers folder needs a new or " \
                    "empty one"
    assert run_main("export.py", "--to", "diffusers", "--arch", "sd15", "--out-dir", str(tmp_path / "x")) == \
        "export.py: error: --arch: not used with --to diffusers"
