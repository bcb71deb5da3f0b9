"""Core ML that ships: the UNet in two chunks, Apple's Swift-pipeline layout, weight compression.

The chunks and the Apple conventions are checked in torch (Core ML prediction needs macOS): the two halves compose to
the whole UNet bit for bit at every block boundary, and Apple's sampling loop (StableDiffusionPipeline.swift: float
token ids, hidden states as [B, width, 1, L], an eps-predicting UNet, latents divided by 0.18215 before a decoder
that returns [-1, 1]) run with our wrappers draws our pipeline's images. Packages are checked by their specs and
their stored (and decompressed) weights.
"""

import json
import math
import sys

import numpy as np
import pytest
import torch
from helpers import few_blocks, tiny_pipeline

from snapfusion_min import diffusion as D
from snapfusion_min.export.coreml import ExportOptions, export, output_psnr
from snapfusion_min.export.parts import (
    APPLE_LATENT_SCALE,
    DecoderPart,
    TextEncoderPart,
    UNetChunk1,
    UNetChunk2,
    UNetPart,
    balanced_cut,
    packages,
)
from snapfusion_min.pipeline import SamplerConfig

SAMPLER = SamplerConfig(steps=4, guidance=3.0, resolution=64, spacing="trailing")


@pytest.mark.parametrize("apple", [False, True])
def test_chunks_compose_to_the_whole_unet_at_every_cut(apple):
    pipe = tiny_pipeline(seed=5, sampler=SAMPLER)
    whole = UNetPart(pipe, apple).eval()
    (pkg,) = packages(pipe, "unet", 64, 2, layout="apple" if apple else "snapfusion")
    inputs = list(pkg.inputs.values())
    inputs[1] = torch.tensor([999.0, 250.0])  # two different timesteps: the eps conversion looks each one up
    with torch.no_grad():
        want = whole(*inputs)
        n = len(pipe.unet.plan())
        for cut in range(1, n):
            middle = UNetChunk1(pipe, cut, apple).eval()(*inputs)
            got = UNetChunk2(pipe, cut, apple).eval()(*inputs, *middle)
            assert torch.equal(got, want), f"cut after step {cut} of {n}"
    assert 1 <= balanced_cut(pipe.unet) < n


def test_balanced_cut_halves_the_weights():
    """The chosen boundary leaves no other boundary with a smaller gap between the halves' parameter counts."""
    unet = tiny_pipeline(seed=5).unet

    def first_half(k):
        used = {id(p) for m in (unet.conv_in, unet.time_embed) for p in m.parameters()}
        used |= {id(p) for s, name, _ in unet.plan()[:k] for p in unet.stages[s][name].parameters()}
        return sum(p.numel() for p in unet.parameters() if id(p) in used)

    total = sum(p.numel() for p in unet.parameters())
    gaps = {k: abs(total - 2 * first_half(k)) for k in range(1, len(unet.plan()))}
    assert gaps[balanced_cut(unet)] == min(gaps.values())
    assert gaps[balanced_cut(unet)] < 0.2 * total


def test_apple_sampling_loop_draws_our_images():
    """Apple's Swift loop (CFG batch [uncond; cond], eps from the UNet, DDIM here on the checkpoint's own grid, the
    decoder fed latent / 0.18215) with the Apple-layout wrappers equals our pipeline, for a v-prediction model."""
    pipe = tiny_pipeline(seed=7, prediction="v", sampler=SAMPLER)
    prompt, w = "a small red circle at the top left on a dark background", SAMPLER.guidance
    want = pipe(prompt, seed=3, output_type="pt")
    text, unet, decoder = TextEncoderPart(pipe), UNetPart(pipe, apple=True), DecoderPart(pipe, apple=True)
    with torch.no_grad():
        ids = pipe.tokenizer(["", prompt]).float()  # Swift passes float ids; negative prompt first
        states = torch.cat([text(ids[:1]), text(ids[1:])])
        states = states.transpose(1, 2).unsqueeze(2)  # toHiddenStates: [2, L, width] -> [2, width, 1, L]
        z = pipe.initial_latents(1, 64, 64, seed=3)
        grid = D.timesteps(SAMPLER.steps, "trailing")
        for t, t_next in zip(grid[:-1], grid[1:]):
            eps = unet(torch.cat([z, z]), torch.tensor([float(t)] * 2), states)
            eps = eps[:1] + w * (eps[1:] - eps[:1])  # performGuidance
            alpha, sigma = pipe.schedule.alpha_sigma(t)
            x = D.x_from_eps(z=z, eps=eps, alpha=alpha, sigma=sigma)
            z = D.ddim_step(x=x, eps=eps, alpha_next=pipe.schedule.alpha_sigma(t_next)[0],
                            sigma_next=pipe.schedule.alpha_sigma(t_next)[1])
        image = decoder(z / APPLE_LATENT_SCALE)  # Decoder.swift divides by 0.18215; the package returns [-1, 1]
    got = (image / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_output_psnr_is_apples_definition():
    want = torch.linspace(-2, 2, 1000)
    noise = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 0.02
    expected = 20 * np.log10(2 / noise.double().pow(2).mean().sqrt().item())  # peak |want| = 2
    assert output_psnr(want + noise, want) == pytest.approx(expected, rel=1e-9)
    assert output_psnr(want + noise, want) > 35 > output_psnr(want + 10 * noise, want)


def test_bad_options(monkeypatch):
    pipe = tiny_pipeline(sampler=SAMPLER)
    for options, batch, message in ((ExportOptions(layout="apple"), 1, "batch 2"),
                                    (ExportOptions(compress="pal6", precision="fp32"), 2, "--precision fp16"),
                                    (ExportOptions(compress="pal3"), 2, "--compress must be one of"),
                                    (ExportOptions(layout="android"), 2, "layout must be one of")):
        with pytest.raises(ValueError, match=message):
            export(pipe, None, ["unet"], batch=batch, options=options)
    monkeypatch.setitem(sys.modules, "kmeans1d", None)  # as if not installed
    with pytest.raises(ValueError, match="needs kmeans1d: pip install kmeans1d"):
        export(pipe, None, ["unet"], options=ExportOptions(compress="pal4"))
    ExportOptions(compress="int8").check(2)  # int8 needs no k-means


ct = pytest.importorskip("coremltools")
FP32 = 65568


def spec_io(path):
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    ins = {f.name: tuple(f.type.multiArrayType.shape) for f in spec.description.input}
    return ins, [f.name for f in spec.description.output], spec


@pytest.mark.parametrize("noise, passes", [(1e-3, True), (0.1, False)])
def test_verify_judges_each_package_by_psnr(monkeypatch, capsys, noise, passes):
    """--verify's wiring, with Core ML's prediction (macOS only) stood in for by torch plus noise of a known size:
    every package is run on its own example inputs, each output compared, 35 dB decides."""
    from snapfusion_min.export.coreml import verify

    pipe = tiny_pipeline(seed=3, sampler=SAMPLER)
    options = ExportOptions(layout="apple", chunk=True)
    by_name = {pkg.name: pkg for part in ("text_encoder", "unet", "decoder")
               for pkg in packages(pipe, part, 64, 2, layout="apple", chunk=True)}

    class FakeModel:
        def __init__(self, path):
            self.pkg = by_name[path.removesuffix(".mlpackage")]

        def predict(self, feed):
            with torch.no_grad():
                out = self.pkg.module.eval()(*(torch.from_numpy(feed[k]) for k in self.pkg.inputs))
            out = out if isinstance(out, tuple) else (out,)
            return {n: (o + noise * o.abs().max() * torch.randn_like(o)).numpy() for n, o in zip(self.pkg.outputs, out)}

    monkeypatch.setattr(ct.models, "MLModel", FakeModel)
    assert verify(pipe, {name: f"{name}.mlpackage" for name in by_name}, 64, 2, options) is passes
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == list(by_name)
    assert all(("pass" if passes else "FAIL") in line for line in lines), lines


@pytest.mark.slow
def test_apple_layout_chunked(tmp_path):
    """The files Apple's StableDiffusionPipeline+Resources.swift looks for, with the inputs and outputs its Swift
    code feeds and reads; the chunks' intermediate tensors match by name; the chunks weigh about half each."""
    pipe = tiny_pipeline(seed=3, sampler=SAMPLER, arch=few_blocks())  # fewer ops: a faster conversion
    export(pipe, tmp_path, ["text_encoder", "unet", "decoder"], resolution=64, batch=2,
           options=ExportOptions(layout="apple", chunk=True), log=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "TextEncoder.mlpackage", "UnetChunk1.mlpackage", "UnetChunk2.mlpackage", "VAEDecoder.mlpackage",
        "merges.txt", "snapfusion_min.json", "vocab.json"]
    ins, outs, spec = spec_io(tmp_path / "TextEncoder.mlpackage")
    assert ins == {"input_ids": (1, 16)} and outs == ["last_hidden_state"]
    assert spec.description.input[0].type.multiArrayType.dataType == FP32  # Swift passes Float32 ids
    ins1, outs1, _ = spec_io(tmp_path / "UnetChunk1.mlpackage")
    assert ins1 == {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 32, 1, 16)}
    assert outs1[:2] == ["temb", "hidden_states"] and all(o.startswith("skip_") for o in outs1[2:])
    ins2, outs2, _ = spec_io(tmp_path / "UnetChunk2.mlpackage")
    assert set(outs1) <= set(ins2) <= set(outs1) | set(ins1) and outs2 == ["noise_pred"]  # eps, for a v model
    ins, outs, _ = spec_io(tmp_path / "VAEDecoder.mlpackage")
    assert ins == {"z": (1, 4, 8, 8)} and outs == ["image"]
    sidecar = json.loads((tmp_path / "snapfusion_min.json").read_text())
    sizes = [sidecar["packages"][n]["bytes"] for n in ("UnetChunk1", "UnetChunk2")]
    assert 0.35 < sizes[0] / sum(sizes) < 0.65, sizes
    stage, name, _ = pipe.unet.plan()[balanced_cut(pipe.unet) - 1]
    assert sidecar["chunk_after"] == f"{stage}.{name}" and sidecar["unet_output"] == "eps"
    assert (sidecar["layout"], sidecar["prediction"]) == ("apple", "v")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>")
    prompt = "a small red circle at the top left"
    ids = tok(prompt, padding="max_length", max_length=16, truncation=True).input_ids
    assert ids == pipe.tokenizer([prompt])[0].tolist()

    # a second export into the folder (a pruned decoder, say) replaces its package and keeps the others' rows
    export(tiny_pipeline(seed=4, sampler=SAMPLER), tmp_path, ["decoder"], resolution=64, batch=2,
           options=ExportOptions(layout="apple"), log=False)
    rows = json.loads((tmp_path / "snapfusion_min.json").read_text())["packages"]
    assert rows["VAEDecoder"]["replaced"] and "replaced" not in rows["UnetChunk1"]
    assert sorted(rows) == ["TextEncoder", "UnetChunk1", "UnetChunk2", "VAEDecoder"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


PANTER_DITE = math.sqrt(math.sqrt(3) * math.pi / 2)  # optimal n-bit quantizer of N(0, s^2): rms error ~ this * s / 2^n


def int8_expected(w: np.ndarray) -> float:
    """Squared error expected of symmetric int8 per output channel: step max|w_c| / 127, uniform rounding error."""
    step = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) / 127
    return float((step**2 / 12 * w[0].size).sum())


@pytest.mark.slow
def test_compression_sizes_and_weight_errors(tmp_path):
    """The schemes on the toy-shaped decoder (Gaussian random weights): the package shrinks as the bits go down;
    k-means palettization's error is that of the optimal n-bit quantizer of a Gaussian (Panter & Dite's
    sqrt(sqrt(3) pi / 2) 2^-n, within 15%), int8's that of rounding to each channel's step (within 10%); the error
    equals one recomputed from the stored lookup tables and indices (not coremltools' decompression); the metadata
    names the scheme."""
    from snapfusion_min.export.compress import compress, package_bytes, weights

    pipe = tiny_pipeline(seed=3, sampler=SAMPLER)
    sizes, errors = {}, {}
    for scheme in ("fp16", "pal4"):  # through export (its report row, the metadata) ...
        options = ExportOptions(compress=None if scheme == "fp16" else scheme)
        export(pipe, tmp_path / scheme, ["decoder"], resolution=64, batch=2, options=options, log=False)
        row = json.loads((tmp_path / scheme / "snapfusion_min.json").read_text())["packages"]["decoder"]
        sizes[scheme], errors[scheme] = row["bytes"], row.get("weight_error")
    for scheme in ("pal6", "int8"):  # ... and the same converted package compressed directly (one conversion less)
        model, errors[scheme] = compress(ct.models.MLModel(str(tmp_path / "fp16" / "decoder.mlpackage"),
                                                           skip_model_load=True), scheme)
        model.save(str(tmp_path / scheme / "decoder.mlpackage"))
        sizes[scheme] = package_bytes(tmp_path / scheme / "decoder.mlpackage")
    assert sizes["pal4"] < sizes["pal6"] < 0.6 * sizes["fp16"], sizes
    assert sizes["int8"] < 0.7 * sizes["fp16"], sizes
    for bits in (6, 4):  # 8 bits: the bundled model's test below
        e = errors[f"pal{bits}"]
        assert e["tensors"] >= 10 and e["relative"] == pytest.approx(PANTER_DITE / 2**bits, rel=0.15), (bits, e)

    original, _ = weights(ct.models.MLModel(str(tmp_path / "fp16" / "decoder.mlpackage"), skip_model_load=True))
    int8 = ct.models.MLModel(str(tmp_path / "int8" / "decoder.mlpackage"), skip_model_load=True)
    quantized = [k.removesuffix("_quantized_quantized_data_0") for k in ct.optimize.coreml.get_weights_metadata(
        int8, weight_threshold=0) if k.endswith("_quantized_quantized_data_0")]
    assert len(quantized) == errors["int8"]["tensors"]
    expected = sum(int8_expected(original[n]) for n in quantized) / sum((original[n] ** 2).sum() for n in quantized)
    assert errors["int8"]["relative"] == pytest.approx(math.sqrt(expected), rel=0.1)

    stored = ct.models.MLModel(str(tmp_path / "pal4" / "decoder.mlpackage"), skip_model_load=True)
    meta = ct.optimize.coreml.get_weights_metadata(stored, weight_threshold=0)
    diff2 = total2 = 0.0
    for key in [k for k in meta if k.endswith("_palettized_indices_0")]:
        name = key.removesuffix("_palettized_indices_0")
        lut = np.asarray(meta[f"{name}_palettized_lut_0"].val).reshape(-1)
        assert lut.size == 16  # 4 bits
        w = original[name].astype(np.float64)
        bits = np.unpackbits(np.asarray(meta[key].val, dtype=np.uint8), bitorder="little").reshape(-1, 4)
        indices = (bits.astype(np.int64) << np.arange(4)).sum(axis=1)  # 4-bit indices, packed low bits first
        rebuilt = lut[indices[: w.size]].reshape(w.shape)
        diff2, total2 = diff2 + ((rebuilt - w) ** 2).sum(), total2 + (w**2).sum()
    assert math.sqrt(diff2 / total2) == pytest.approx(errors["pal4"]["relative"], rel=1e-6)
    meta = json.loads(stored.user_defined_metadata["snapfusion_min"])
    assert meta["compress"] == "pal4" and meta["part"] == "decoder"


@pytest.mark.slow
def test_causal_mask_is_stored_right_and_never_compressed(tmp_path):
    """The text encoder's folded causal mask (77 x 77: above int8's size threshold) is stored as CLIP's (0 on and
    below the diagonal, -inf above; it was once all NaN, which makes every output NaN on device) and is left alone
    by compression, which would turn -inf into NaN."""
    from snapfusion_min.arch import tiny
    from snapfusion_min.export.compress import weights
    from snapfusion_min.pipeline import random_pipeline
    from snapfusion_min.text_encoder import TextConfig

    pipe = random_pipeline(tiny(64), text_cfg=TextConfig(width=64, heads=2, layers=1), sampler=SAMPLER)
    want = np.triu(np.full((77, 77), -np.inf, dtype=np.float16), 1)
    want[np.tril_indices(77)] = 0
    for scheme in (None, "int8"):
        export(pipe, tmp_path / str(scheme), ["text_encoder"], options=ExportOptions(compress=scheme), log=False)
        model = ct.models.MLModel(str(tmp_path / str(scheme) / "text_encoder.mlpackage"), skip_model_load=True)
        stored, compressed = weights(ct.optimize.coreml.decompress_weights(model) if scheme else model)
        assert not [n for n, w in stored.items() if w.dtype.kind == "f" and np.isnan(w).any()]
        masks = [n for n, w in stored.items() if w.dtype.kind == "f" and np.isinf(w).any()]
        assert len(masks) == 1 and masks[0] not in compressed
        np.testing.assert_array_equal(stored[masks[0]].reshape(77, 77), want)
    error = json.loads((tmp_path / "int8" / "snapfusion_min.json").read_text())["packages"]["text_encoder"]
    assert np.isfinite(error["weight_error"]["relative"]) and error["weight_error"]["tensors"] >= 4


@pytest.mark.slow
def test_bundled_toy_model_compresses_within_the_uniform_grid_bound(tmp_path):
    """The bundled (trained) toy model's decoder at 8 bits: k-means1d's palette is the optimal one, so no tensor's
    error exceeds that of 256 evenly spaced levels over its range (|error| <= half a step); the package shrinks."""
    from snapfusion_min.export.compress import compress, package_bytes, weights
    from snapfusion_min.pipeline import read_pipeline
    from snapfusion_min.toy import BUNDLED

    pipe = read_pipeline(BUNDLED / "model.safetensors")
    export(pipe, tmp_path, ["decoder"], log=False)
    fp16 = ct.models.MLModel(str(tmp_path / "decoder.mlpackage"), skip_model_load=True)
    compress(fp16, "pal8")[0].save(str(tmp_path / "pal8.mlpackage"))
    assert package_bytes(tmp_path / "pal8.mlpackage") < 0.6 * package_bytes(tmp_path / "decoder.mlpackage")
    original, _ = weights(fp16)
    model = ct.models.MLModel(str(tmp_path / "pal8.mlpackage"), skip_model_load=True)
    decompressed, compressed = weights(ct.optimize.coreml.decompress_weights(model))
    assert len(compressed) >= 10
    for name in compressed:
        w, wc = original[name].astype(np.float64), decompressed[name].astype(np.float64)
        half_step = (w.max() - w.min()) / (2 * 255)
        assert np.sqrt(((wc - w) ** 2).mean()) <= half_step, name
        assert len(np.unique(wc)) <= 256, name


def test_w_conditioned_unet_takes_guidance_as_an_input(tmp_path):
    """Meng et al.'s student in Core ML: a fourth input 'guidance' (the chunks: only the first, w goes into temb);
    the wrappers compute the UNet at that w; Apple's layout, whose Swift code feeds no w, is refused. (The converted
    package's inputs: test_export.py, whose exported UNet is w-conditioned.)"""
    from snapfusion_min.unet import with_guidance_input

    pipe = tiny_pipeline(seed=6, sampler=SAMPLER)
    pipe = pipe.with_parts(unet=with_guidance_input(pipe.unet, 32))
    pipe.unet.w_proj.weight.data.normal_(std=0.1)
    first, second = packages(pipe, "unet", 64, 2, chunk=True)
    assert list(first.inputs) == ["sample", "timestep", "encoder_hidden_states", "guidance"]
    assert "guidance" not in second.inputs and second.inputs["temb"].shape == (2, 128)
    inputs = list(first.inputs.values())
    inputs[3] = torch.tensor([1.5, 4.0])
    with torch.no_grad():
        want = pipe.unet(*inputs[:3], w=inputs[3])
        assert torch.equal(UNetPart(pipe).eval()(*inputs), want)
        middle = first.module.eval()(*inputs)
        assert torch.equal(second.module.eval()(*inputs[:3], *middle), want)
        assert not torch.allclose(UNetPart(pipe).eval()(*inputs[:3], torch.ones(2)), want)
    with pytest.raises(ValueError, match="export it with --layout snapfusion"):
        export(pipe, tmp_path, ["unet"], options=ExportOptions(layout="apple"), log=False)
