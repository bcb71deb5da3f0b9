"""export.py on Linux: the tiny architecture's three models convert to Core ML with the expected interface and weights.

Core ML *prediction* needs macOS; here the packages are checked by their specs and stored weights.
"""

import json
import sys

import numpy as np
import pytest
import torch
from helpers import few_blocks, randomize, run_main, tiny_pipeline

from snapfusion_min.arch import tiny
from snapfusion_min.export.coreml import export
from snapfusion_min.pipeline import SamplerConfig
from snapfusion_min.unet import Attention, UNet, split_einsum_attention, with_guidance_input
from snapfusion_min.vae import VAEConfig

ct = pytest.importorskip("coremltools")

FP32, FP16, INT32 = 65568, 65552, 131104  # Core ML ArrayFeatureType data types


SAMPLER = SamplerConfig(steps=8, guidance=4.0, resolution=64, spacing="trailing")
VAE = VAEConfig(channels=(16, 32, 64, 64), decoder_channels=(32, 32, 16, 8), layers=1, groups=8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    pipe = tiny_pipeline(seed=3, sampler=SAMPLER, vae=VAE, arch=few_blocks())  # fewer ops: a faster conversion
    pipe = pipe.with_parts(unet=with_guidance_input(pipe.unet, 32))  # Meng et al.'s w input: a 4th UNet input
    pipe.unet.w_proj.weight.data.normal_(std=0.1)
    paths = export(pipe, out, ["text_encoder", "unet", "decoder"], resolution=64, batch=2, log=False)
    return pipe, out, paths


def shapes(desc) -> dict:
    return {f.name: (tuple(f.type.multiArrayType.shape), f.type.multiArrayType.dataType) for f in desc}


@pytest.mark.slow
def test_interfaces(exported):
    _, _, paths = exported
    specs = {part: ct.models.MLModel(str(path), skip_model_load=True).get_spec() for part, path in paths.items()}
    assert shapes(specs["text_encoder"].description.input) == {"input_ids": ((1, 16), INT32)}
    assert [o.name for o in specs["text_encoder"].description.output] == ["last_hidden_state"]
    assert shapes(specs["unet"].description.input) == {
        "sample": ((2, 4, 8, 8), FP32), "timestep": ((2,), FP32), "encoder_hidden_states": ((2, 16, 32), FP32),
        "guidance": ((2,), FP32)}
    assert [o.name for o in specs["unet"].description.output] == ["v_pred"]
    assert shapes(specs["decoder"].description.input) == {"z": ((1, 4, 8, 8), FP32)}
    assert [o.name for o in specs["decoder"].description.output] == ["image"]
    for spec in specs.values():
        assert spec.WhichOneof("Type") == "mlProgram"
        assert all(o.type.multiArrayType.dataType == FP32 for o in spec.description.output)


@pytest.mark.slow
def test_metadata_lets_an_app_sample(exported):
    pipe, out, paths = exported
    sidecar = json.loads((out / "snapfusion_min.json").read_text())
    assert sidecar["arch"] == json.loads(pipe.unet.spec.to_json())
    assert (sidecar["prediction"], sidecar["steps"], sidecar["guidance"]) == ("v", 8, 4.0)
    assert sidecar["scheduler"]["spacing"] == "trailing" and sidecar["latent_scale"] == 0.5
    assert sidecar["w_conditioned"] is True  # the UNet takes 'guidance' and needs no CFG batch
    for part, path in paths.items():
        meta = json.loads(ct.models.MLModel(str(path), skip_model_load=True).user_defined_metadata["snapfusion_min"])
        assert meta["part"] == part and meta["arch"] == sidecar["arch"] and meta["precision"] == "fp16"


@pytest.mark.slow
def test_stored_weights_are_the_checkpoints_in_fp16(exported):
    pipe, _, paths = exported
    modules = {"text_encoder": ("encoder", pipe.text_encoder), "unet": ("unet", pipe.unet),
               "decoder": ("decoder", pipe.vae.decoder)}
    for part, path in paths.items():
        stored = ct.optimize.coreml.get_weights_metadata(ct.models.MLModel(str(path), skip_model_load=True),
                                                         weight_threshold=64)
        prefix, module = modules[part]
        found = 0
        for name, p in module.named_parameters():
            if p.numel() < 64:
                continue
            key = f"p_{prefix}_{name.replace('.', '_')}_to_fp16".lower()  # MIL names are lower-case
            if key in stored:
                found += 1
                want = p.detach().numpy().astype(np.float16).reshape(stored[key].val.shape)
                np.testing.assert_array_equal(stored[key].val, want, err_msg=f"{part}: {name}")
        big = sum(1 for _, p in module.named_parameters() if p.numel() >= 64)
        assert found >= 0.8 * big, f"{part}: only {found} of {big} weights found by name in the package"


def test_split_einsum_attention_equals_default():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 64, 32), torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    heads = 4
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(y.view(2, -1, heads, 8).transpose(1, 2) for y in (q, k, v))).transpose(1, 2).reshape(2, 64, 32)
    torch.testing.assert_close(split_einsum_attention(q, k, v, heads), ref, rtol=1e-5, atol=1e-6)
    unet = randomize(UNet(tiny(32)), 4).eval()
    z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32)
    with torch.no_grad():
        want = unet(z, 500, ctx)
        for m in unet.modules():
            if isinstance(m, Attention):
                m.split_einsum = True
        torch.testing.assert_close(unet(z, 500, ctx), want, rtol=1e-5, atol=1e-5)


def test_bad_input(tmp_path, monkeypatch):
    tiny_pipeline(sampler=SAMPLER).save(tmp_path / "m.safetensors")
    ck = str(tmp_path / "m.safetensors")
    monkeypatch.setattr(sys, "platform", "linux")  # --verify needs macOS
    for args, message in ((["--resolution", "96"], "multiple of 64"),
                          (["--checkpoint", str(tmp_path / "missing.safetensors")], "no such checkpoint"),
                          (["--parts", "unet,vocoder"], "parts"), (["--verify"], "needs macOS"),
                          (["--layout", "apple", "--unet-batch", "1"], "batch 2"),
                          (["--compress", "pal6", "--precision", "fp32"], "--precision fp16"),
                          (["--to", "diffusers", "--compress", "pal6"], "not used with --to diffusers")):
        code = run_main("export.py", "--checkpoint", ck, *args, "--out-dir", str(tmp_path / "x"))
        assert isinstance(code, str) and message in code and "\n" not in code, code
    monkeypatch.setitem(sys.modules, "coremltools", None)  # as if not installed
    code = run_main("export.py", "--checkpoint", ck, "--out-dir", str(tmp_path / "x"))
    assert isinstance(code, str) and "coremltools is not installed" in code, code
    assert not (tmp_path / "x").exists()


def test_known_coremltools_noise_is_not_shown(tmp_path, capfd, caplog):
    """What coremltools says on conversions here and is known harmless -- its import-time notes, int64 index
    constants stored as int32 (the toy UNet's) -- does not reach the user; anything else it logs still does. Folding
    the text encoder's causal mask raises no numpy 'invalid value' (it once did: the stored mask was all NaN)."""
    import logging
    import warnings

    from snapfusion_min.export.coreml import load_coremltools

    load_coremltools()
    caplog.set_level(logging.INFO)
    logger = logging.getLogger("coremltools")
    known = ("Torch version 2.14.1 has not been tested with coremltools.", "Failed to load _MLModelProxy",
             "Saving value type of int64 into a builtin type of int32, might lose precision!")
    for text in (*known, "an unknown coremltools warning"):
        logger.warning(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(tiny_pipeline(seed=3, sampler=SAMPLER, vae=VAE), tmp_path, ["text_encoder"], resolution=64, batch=2,
               log=False)
    shown = capfd.readouterr().err + "\n".join(r.getMessage() for r in caplog.records)
    assert not any(text in shown for text in known), shown
    assert not [w for w in caught if "invalid value encountered" in str(w.message)]
    assert "an unknown coremltools warning" in shown
