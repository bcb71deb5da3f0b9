"""Whole generations: ours against diffusers' StableDiffusionPipeline + DDIMScheduler or DPMSolverMultistepScheduler,
and checkpoint round trips."""

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from helpers import ROOT, max_rel_err, randomize, sd_tokenizer, tiny_pipeline
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from snapfusion_min import read_pipeline
from snapfusion_min.arch import sd15
from snapfusion_min.diffusion import timesteps
from snapfusion_min.eval.metrics import psnr
from snapfusion_min.formats.checkpoint import META_KEY
from snapfusion_min.formats.weights import CheckpointError
from snapfusion_min.pipeline import OutOfDomainWarning, SamplerConfig
from snapfusion_min.world import unknown_words

TINY_UNET = dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=4,
                 norm_num_groups=8, layers_per_block=2)
TINY_VAE = dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8, layers_per_block=2, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_CLIP = CLIPTextConfig(hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                           hidden_act="quick_gelu")
PROMPTS = ["a small red triangle at the top left", "two blue circles on a dark background"]


def reference(prediction: str, spacing: str, folder):
    """A random tiny SD in diffusers, saved as a diffusers folder."""
    folder.mkdir(parents=True, exist_ok=True)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=spacing == "trailing", steps_offset=1, prediction_type=prediction,
                              timestep_spacing=spacing)
    ref = StableDiffusionPipeline(
        vae=randomize(AutoencoderKL(**TINY_VAE), 1), text_encoder=randomize(CLIPTextModel(TINY_CLIP), 2),
        tokenizer=sd_tokenizer(folder), unet=randomize(UNet2DConditionModel(**TINY_UNET), 3), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.save_pretrained(folder)
    return ref


@pytest.mark.parametrize("prediction,spacing", [("epsilon", "leading"), ("v_prediction", "leading"),
                                                ("v_prediction", "trailing")])
def test_ddim_generation_equals_stable_diffusion_pipeline(tmp_path, prediction, spacing):
    """Same initial latents, same prompts: tokenizer, text encoder, CFG, DDIM and decoder end to end."""
    ref = reference(prediction, spacing, tmp_path)
    ours = read_pipeline(tmp_path)  # the diffusers-folder path
    assert ours.prediction == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    latents = torch.randn(2, 4, 8, 8)
    kw = dict(height=64, width=64, latents=latents)
    want = ref(PROMPTS, num_inference_steps=10, guidance_scale=7.5, output_type="pt", **kw).images
    got = ours(PROMPTS, steps=10, guidance=7.5, spacing=spacing, output_type="pt", **kw)
    assert max_rel_err(got, want) < 1e-4
    want = ref(PROMPTS, num_inference_steps=4, guidance_scale=1.0, output_type="pt", **kw).images  # no CFG
    assert max_rel_err(ours(PROMPTS, steps=4, guidance=1.0, spacing=spacing, output_type="pt", **kw), want) < 1e-4


@pytest.mark.parametrize("solver,spacing", [("dpm++", "trailing"), ("dpm", "leading")])
def test_dpm_solver_generation_equals_stable_diffusion_pipeline(tmp_path, solver, spacing):
    """The whole pipeline with DPM-Solver(++) against StableDiffusionPipeline driven by DPMSolverMultistepScheduler
    (on our leading grid, passed as its custom timesteps: its own 'leading' is another grid)."""
    ref = reference("v_prediction", spacing, tmp_path)
    ref.scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        algorithm_type={"dpm": "dpmsolver", "dpm++": "dpmsolver++"}[solver], solver_order=2, timestep_spacing=spacing,
        final_sigmas_type="zero" if spacing == "trailing" else "sigma_min")
    ours = read_pipeline(tmp_path)
    kw = dict(height=64, width=64, latents=torch.randn(2, 4, 8, 8))
    steps = 6
    grid = {"num_inference_steps": steps} if spacing == "trailing" else {"timesteps": timesteps(steps, "leading")[:-1]}
    want = ref(PROMPTS, guidance_scale=5.0, output_type="pt", **grid, **kw).images
    got = ours(PROMPTS, steps=steps, guidance=5.0, spacing=spacing, solver=solver, output_type="pt", **kw)
    assert max_rel_err(got, want) < 1e-4
    assert max_rel_err(ours(PROMPTS, steps=steps, guidance=5.0, spacing=spacing, output_type="pt", **kw), want) > 1e-3


def test_own_checkpoint_round_trip_and_seeds(tmp_path):
    reference("v_prediction", "leading", tmp_path / "sd")
    pipe = read_pipeline(tmp_path / "sd")
    pipe.save(tmp_path / "own.safetensors")
    again = read_pipeline(tmp_path / "own.safetensors")
    assert again.prediction == "v" and again.unet.spec == pipe.unet.spec
    kw = dict(steps=3, height=64, width=64, output_type="pt")
    a = pipe(PROMPTS, seed=7, **kw)
    torch.testing.assert_close(again(PROMPTS, seed=7, **kw), a, rtol=0, atol=0)  # same seed, same image
    assert not torch.allclose(pipe(PROMPTS, seed=8, **kw), a)
    # image i uses seed + i, so it does not depend on the batch (up to float summation order, ~1e-6)
    torch.testing.assert_close(pipe(PROMPTS[1:], seed=8, **kw), a[1:], rtol=0, atol=1e-4)
    assert sd15().stages == again.unet.spec.stages


def test_bad_requests_are_refused(tmp_path):
    reference("epsilon", "leading", tmp_path)
    pipe = read_pipeline(tmp_path)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe("a cat", height=60, width=64)
    with pytest.raises(ValueError, match="steps must be a positive"):
        pipe("a cat", steps=0, height=64, width=64)
    with pytest.raises(ValueError, match="no prompts"):
        pipe([], height=64, width=64)
    with pytest.raises(TypeError, match="'stepz'.*a sampler override is one of"):
        pipe("a cat", stepz=2)


def test_a_sampler_or_its_overrides_draw_the_same():
    """pipe(prompts, SamplerConfig(...)) and pipe(prompts, field=value, ...) are one request; overrides apply on top
    of a given sampler, and None leaves a field as it is."""
    pipe = tiny_pipeline()
    s = dataclasses.replace(pipe.sampler, steps=2, guidance=1.5, spacing="leading", solver="dpm++")
    a = pipe(["a red circle"], s, output_type="pt")
    b = pipe(["a red circle"], steps=2, guidance=1.5, spacing="leading", solver="dpm++", output_type="pt")
    c = pipe(["a red circle"], dataclasses.replace(s, steps=3), steps=2, guidance=None, output_type="pt")
    assert torch.equal(a, b) and torch.equal(a, c)
    assert pipe.sampler_with(s, steps=None) == s and pipe.sampler_with(steps=5).steps == 5


def test_out_of_domain_requests_warn():
    """A toy-world model (its checkpoint says data 'toy') warns about words no toy caption has -- in the prompt or
    the negative prompt, whatever the case and commas -- and any model about a resolution it was not trained at;
    in-domain requests warn about nothing."""
    pipe = tiny_pipeline(sampler=SamplerConfig(steps=2, guidance=2.0, resolution=32))
    caption = "A small red circle, at the top left on a dark background"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("an astronaut riding a horse")  # not a toy-world model: any words
        pipe.training = {"data": "toy"}
        pipe(caption)
    with pytest.warns(OutOfDomainWarning, match=r"never seen: pink, star \(its captions read like"):
        pipe(["a pink star", caption, "a star"])
    with pytest.warns(OutOfDomainWarning, match=r"never seen: blurry \("):
        pipe(caption, negative_prompt="blurry")
    with pytest.warns(OutOfDomainWarning, match=r"^sampling at 64x32, but the checkpoint was trained at 32x32$"):
        pipe(caption, height=64, width=32)
    pipe.training = {}
    long = "a red circle " * 6  # 18 tokens; this text encoder reads 14 (16 positions less start and end)
    with pytest.warns(OutOfDomainWarning, match=r"^1 prompt\(s\) longer than the text encoder reads \(18 tokens, "
                      r"e\.g\. 'a red circle a red circle a red circle a'\.\.\.\): cut to its first 14$"):
        pipe(["a red circle", long])
    assert unknown_words("two large purple striped crosses and a circle on a dark background") == []
    assert unknown_words("a large purple diamond, near the center") == ["diamond", "near"]


@pytest.mark.parametrize("which", ["bundled toy model", "random SD-v1.5 layout"])
def test_bf16_images_match_fp32(which):
    """Every part in bfloat16 (text encoder, UNet, decoder) draws the fp32 image within 35 dB PSNR (Core ML's parity
    gate): on the bundled toy model (20 steps) and on random weights in SD-v1.5's layout (bench/bf16_psnr.py prints
    the figures)."""
    if which == "bundled toy model":
        make = lambda: read_pipeline(ROOT / "models" / "toy" / "model.safetensors")  # noqa: E731
        prompts = ["a large red circle at the top left on a dark background",
                   "a small yellow cross at the bottom right on a light background"]
    else:
        make, prompts = tiny_pipeline, PROMPTS
    fp32, bf16 = make(), make().to(dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and next(bf16.vae.parameters()).dtype == torch.bfloat16
    a, b = fp32(prompts, seed=3, output_type="pt"), bf16(prompts, seed=3, output_type="pt")
    assert psnr(a, b) >= 35, psnr(a, b)
    assert psnr(a, fp32(prompts, seed=4, output_type="pt")) < 35  # the bound tells apart the next seed (28 dB on the
    # toy model: the same shape and colours, a little moved)


def test_auto_dtype(monkeypatch):
    """--dtype auto: float16 on an accelerator; on the CPU bfloat16 only where it is native (emulated bf16 is far
    slower than fp32: 0.3 vs 181 GFLOP/s in a 2048^2 matmul on this AVX2 CPU)."""
    from snapfusion_min import pipeline

    assert pipeline.auto_dtype(torch.device("cuda"))[0] == torch.float16
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(pipeline, "native_bf16", lambda native=native: native)
        assert pipeline.pick_dtype("auto", torch.device("cpu")) == want
    assert pipeline.bf16_in_cpuinfo("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile")
    assert pipeline.bf16_in_cpuinfo("Features\t: fp asimd sve bf16 i8mm")
    assert not pipeline.bf16_in_cpuinfo("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni")


def test_api_mistakes_are_errors_naming_the_argument(tmp_path):
    """The Python API refuses what the commands refuse, naming the argument, before any work: no bare Python error
    from deep inside (a generator's overflow, a temporary file's name, a NoneType's attribute)."""
    pipe = tiny_pipeline(sampler=SamplerConfig(steps=1, guidance=1.0, resolution=32))
    with pytest.raises(TypeError, match=r"^path must be a str or a path to a checkpoint, got NoneType$"):
        read_pipeline(None)
    with pytest.raises(TypeError, match=r"^prompts must be a string or a list of strings, got NoneType$"):
        pipe(None)
    with pytest.raises(TypeError, match=r"^prompts must be a string or a list of strings, got list holding other"):
        pipe(["a red circle", 3])
    with pytest.raises(TypeError, match=r"^negative_prompt must be a string, got int$"):
        pipe("a red circle", negative_prompt=0)
    with pytest.raises(ValueError, match=rf"^seed must be in \[-2\*\*63, 2\*\*63 - 2\] for 2 images, got {2**70}$"):
        pipe(["a", "b"], seed=2**70)
    with pytest.raises(TypeError, match=r"^seed must be an integer, got float$"):
        pipe("a", seed=1.5)
    pipe(["a", "b"], seed=2**63 - 2)  # the largest seed two images allow: image 1 starts from 2**63 - 1
    pipe((p for p in ("a", "b")), seed=-(2**63))  # any iterable of strings; the smallest seed
    with pytest.raises(ValueError, match=r"is a folder: save writes one \.safetensors file"):
        pipe.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scale", [float("nan"), "0.18", -1.0, None])
def test_a_latent_scale_that_is_not_a_positive_number_names_the_checkpoint(tmp_path, scale):
    """A checkpoint whose metadata's latent scale is NaN, a string, negative or null is refused on load (it drew a
    black image, or failed after sampling)."""
    tiny_pipeline().save(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta[META_KEY]) | {"latent_scale": scale}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={META_KEY: json.dumps(config)})
    with pytest.raises(CheckpointError, match=r"bad.safetensors: its latent scale .* is not a positive number"):
        read_pipeline(tmp_path / "bad.safetensors")


def test_a_full_disk_leaves_the_file_that_was_there(tmp_path, monkeypatch):
    """An injected ENOSPC in the middle of a write -- safetensors' error for a checkpoint, torch.save's 'unexpected
    pos' for a resumable state -- is one OSError saying so; the earlier file is byte-identical, no temporary left."""
    import shutil as shutil_module
    from collections import namedtuple

    from safetensors import SafetensorError

    from snapfusion_min.formats import checkpoint
    from snapfusion_min.training import save_state

    pipe = tiny_pipeline()
    pipe.save(tmp_path / "m.safetensors")
    save_state(tmp_path / "m.state.pt", {"step": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_then(error):
        def write(*args, **kwargs):
            path = next(a for a in (*args, *kwargs.values()) if isinstance(a, str) and a.endswith(".tmp"))
            Path(path).write_bytes(b"half a file")
            raise error
        return write

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda p: usage(5 << 20, 5 << 20, 0))
    monkeypatch.setattr(checkpoint, "save_file", half_then(SafetensorError("Error while serializing: IoError")))
    with pytest.raises(OSError, match=r"no space left on the device of .* to write m.safetensors; the file there"):
        pipe.save(tmp_path / "m.safetensors")
    monkeypatch.setattr(torch, "save", half_then(RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                              "unexpected pos 64 vs 0")))
    with pytest.raises(OSError, match=r"\[Errno 28\] no space left on the device of .* to write m.state.pt"):
        save_state(tmp_path / "m.state.pt", {"step": 2})
    from snapfusion_min.export import diffusers_folder

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError")

    monkeypatch.setattr(diffusers_folder, "save_file", full)
    with pytest.raises(OSError, match=r"no space left on the device of .* to write sd"):
        diffusers_folder.save_diffusers(pipe, tmp_path / "sd")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no folder, no temporary
