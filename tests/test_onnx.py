"""ONNX export (``export.py --to onnx``): every file run in ONNX Runtime against our torch modules on the same inputs
(max relative error <= 1e-4 in fp32), for the bundled toy model, SD-v1.5's and Table 3's layouts at reduced width,
a w-conditioned student and blocks switched off; dynamic shapes at another batch and size; and a sampling loop
written from the exported JSON alone (numpy + ONNX Runtime, as a runtime in another language would write it) that
draws our pipeline's images.
"""

import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import max_rel_err, randomize, run_main, tiny_pipeline

from snapfusion_min.arch import snapfusion
from snapfusion_min.export.onnx import MAX_RELATIVE_ERROR, check, export_onnx
from snapfusion_min.export.parts import GatedUNetPart
from snapfusion_min.pipeline import read_pipeline
from snapfusion_min.toy import BUNDLED
from snapfusion_min.unet import UNet, with_guidance_input

PROMPT = "a large red striped circle at the top left and a blue square on a dark background"


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def sample_from_json(folder, ids: np.ndarray, z: np.ndarray) -> np.ndarray:
    """DDIM with CFG from ``snapfusion_min.json`` and the .onnx files only: token ids [2, L] (negative prompt
    first), z_T [1, 4, h, w] -> image [1, 3, H, W] in [0, 1]. v-prediction: x = alpha z - sigma v, eps = sigma z +
    alpha v (Eq. 6 solved); the grid's last point -1 is clean data (alpha 1, sigma 0)."""
    meta = json.loads((folder / "snapfusion_min.json").read_text())
    text, unet, decoder = (session(folder / f"{p}.onnx") for p in ("text_encoder", "unet", "decoder"))
    abar = np.array(meta["alphas_cumprod"], dtype=np.float64)
    states = np.concatenate([text.run(None, {"input_ids": ids[i:i + 1].astype(np.int32)})[0] for i in range(2)])
    grid, w = meta["timesteps"], meta["guidance"]
    for t, t_next in zip(grid[:-1], grid[1:]):
        out = unet.run(None, {"sample": np.concatenate([z, z]), "timestep": np.full(2, t, np.float32),
                              "encoder_hidden_states": states})[0]
        out = out[:1] + w * (out[1:] - out[:1])
        a, s = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
        x, eps = (a * z - s * out, s * z + a * out) if meta["prediction"] == "v" else ((z - s * out) / a, out)
        a2, s2 = (1.0, 0.0) if t_next < 0 else (np.sqrt(abar[t_next]), np.sqrt(1 - abar[t_next]))
        z = (a2 * x + s2 * eps).astype(np.float32)
    return decoder.run(None, {"z": z})[0]


def test_bundled_toy_model_samples_in_onnxruntime(tmp_path):
    """The three parts of the bundled model, each within 1e-4 of torch; the JSON's loop draws our image."""
    pipe = read_pipeline(BUNDLED / "model.safetensors")
    rows = export_onnx(pipe, tmp_path, ["text_encoder", "unet", "decoder"], resolution=64, log=False)
    assert {p: r["max_relative_error"] <= MAX_RELATIVE_ERROR for p, r in rows.items()} == dict.fromkeys(rows, True)
    meta = json.loads((tmp_path / "snapfusion_min.json").read_text())
    assert (tmp_path / meta["tokenizer"]["vocab"]).is_file() and (tmp_path / meta["tokenizer"]["merges"]).is_file()
    assert meta["timesteps"][0] > meta["timesteps"][-1] and len(meta["timesteps"]) == pipe.sampler.steps + 1
    assert meta["latent_shape"] == list(pipe.initial_latents(1, 64, 64, seed=5).shape[1:])
    want = pipe(PROMPT, seed=5, output_type="pt")
    ids = pipe.tokenizer(["", PROMPT]).numpy()
    got = sample_from_json(tmp_path, ids, pipe.initial_latents(1, 64, 64, seed=5).numpy())
    assert np.abs(got - want.numpy()).max() < 1e-3  # 20 steps of fp32 error, on [0, 1] pixels


def reduced(spec):
    return dataclasses.replace(spec, channels=(32, 64, 64, 64), context_dim=32, heads=4, groups=8)


def w_conditioned(pipe):
    pipe.unet = randomize(with_guidance_input(pipe.unet, dim=32), seed=9)  # a trained-looking w projection
    return pipe


def switched_off(pipe):
    pipe.unet.removed = {"down2.A0", "mid.A0", "up1.R2"}
    return pipe


@pytest.mark.parametrize("make", [
    lambda: tiny_pipeline(),  # SD-v1.5's block layout at reduced width
    lambda: tiny_pipeline().with_parts(unet=randomize(UNet(reduced(snapfusion())))),  # Table 3's
    lambda: w_conditioned(tiny_pipeline()),
    lambda: switched_off(tiny_pipeline()),
], ids=["sd15", "snapfusion", "w_conditioned", "switched_off"])
def test_unets_of_every_layout_equal_torch(tmp_path, make):
    pipe = make()
    (row,) = export_onnx(pipe, tmp_path, ["unet"], resolution=64, log=False).values()
    assert row["max_relative_error"] <= MAX_RELATIVE_ERROR
    names = [i.name for i in session(tmp_path / "unet.onnx").get_inputs()]
    assert names == ["sample", "timestep", "encoder_hidden_states"] + ["guidance"] * bool(pipe.unet.spec.guidance_embed)
    if pipe.unet.removed:  # the file runs without those blocks: not the whole UNet
        z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32)
        got = session(tmp_path / "unet.onnx").run(None, {"sample": z.numpy(), "timestep": np.full(2, 500, np.float32),
                                                         "encoder_hidden_states": ctx.numpy()})[0]
        removed, pipe.unet.removed = pipe.unet.removed, set()
        with torch.no_grad():
            whole = pipe.unet(z, torch.full((2,), 500.0), ctx)
        assert max_rel_err(torch.from_numpy(got), whole) > 1e-2
        assert json.loads((tmp_path / "snapfusion_min.json").read_text())["removed_blocks"] == sorted(removed)


def test_keep_input_switches_blocks_off_at_run_time(tmp_path):
    """--keep-input: all ones is the whole UNet, zeros where blocks are removed is the UNet with them removed (Eq. 5,
    as ``removed`` drops them), and a weight between blends; in torch exactly, in ONNX Runtime within 1e-4."""
    pipe = tiny_pipeline()
    (row,) = export_onnx(pipe, tmp_path, ["unet"], resolution=64, gated=True, log=False).values()
    blocks = json.loads((tmp_path / "snapfusion_min.json").read_text())["keep_blocks"]
    assert blocks == pipe.unet.spec.addresses() and row["max_relative_error"] <= MAX_RELATIVE_ERROR
    g = torch.Generator().manual_seed(1)
    z, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g), torch.tensor([700.0] * 2)
    off = {"down2.A0", "mid.R1", "up1.R0", "up3.A2"}  # up1.R0 changes width: its drop is the 1x1 shortcut
    keep = torch.tensor([0.0 if b in off else 1.0 for b in blocks])
    unet = session(tmp_path / "unet.onnx")
    with torch.no_grad():
        whole = pipe.unet(z, t, ctx)
        pipe.unet.removed = off
        removed = pipe.unet(z, t, ctx)
        pipe.unet.removed = set()
    for k, want in ((torch.ones(len(blocks)), whole), (keep, removed)):
        feed = {"sample": z.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ctx.numpy(), "keep": k.numpy()}
        assert max_rel_err(torch.from_numpy(unet.run(None, feed)[0]), want) <= MAX_RELATIVE_ERROR
    assert max_rel_err(removed, whole) > 1e-2
    half = {"sample": z, "timestep": t, "encoder_hidden_states": ctx, "keep": torch.rand(len(blocks), generator=g)}
    assert check(pipe, tmp_path, "unet", half, resolution=64, gated=True) <= MAX_RELATIVE_ERROR
    with torch.no_grad():  # in torch: the gate at 1 / 0 is the block run / dropped, bit for bit
        part = GatedUNetPart(pipe)
        assert torch.equal(part(z, t, ctx, torch.ones(len(blocks))), whole)
        assert torch.equal(part(z, t, ctx, keep), removed)
    assert pipe.unet.gates is None  # the part leaves the UNet as it found it


def test_dynamic_shapes_run_at_another_batch_and_size(tmp_path):
    """Traced at batch 2 and 64 px, run at batch 1 / 3 and a 24 x 40 latent (192 x 320 px)."""
    pipe = tiny_pipeline()
    export_onnx(pipe, tmp_path, ["text_encoder", "unet", "decoder"], resolution=64, shapes="dynamic", log=False)
    g = torch.Generator().manual_seed(0)
    inputs = {"text_encoder": {"input_ids": torch.randint(0, 49407, (3, 16), generator=g, dtype=torch.int32)},
              "unet": {"sample": torch.randn(1, 4, 24, 40, generator=g), "timestep": torch.tensor([321.0]),
                       "encoder_hidden_states": torch.randn(1, 16, 32, generator=g)},
              "decoder": {"z": torch.randn(3, 4, 24, 40, generator=g)}}
    for part, given in inputs.items():
        assert check(pipe, tmp_path, part, given, resolution=64) <= MAX_RELATIVE_ERROR, part
    static = tmp_path / "static"
    export_onnx(pipe, static, ["decoder"], resolution=64, log=False)
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # a static file refuses another size
        check(pipe, static, "decoder", inputs["decoder"], resolution=64)


def test_bad_requests_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    pipe = tiny_pipeline()
    pipe.save(tmp_path / "m.safetensors")
    ck, out = str(tmp_path / "m.safetensors"), tmp_path / "x"
    for args, message in ((["--layout", "apple"], "--layout: not used with --to onnx"),
                          (["--precision", "fp16"], "--precision: not used with --to onnx"),
                          (["--remove", "up9.A0"], "unknown block address"),
                          (["--shapes", "dynamic", "--to", "coreml"], "--shapes: not used with --to coreml"),
                          (["--keep-input", "--to", "coreml"], "--keep-input: not used with --to coreml"),
                          (["--remove", "up1.A0", "--to", "diffusers"], "--remove: not used with --to diffusers")):
        code = run_main("export.py", "--checkpoint", ck, "--to", "onnx", *args, "--out-dir", str(out))
        assert isinstance(code, str) and message in code and "\n" not in code, code
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # as if the extra were not installed
    code = run_main("export.py", "--checkpoint", ck, "--to", "onnx", "--out-dir", str(out))
    assert isinstance(code, str) and "pip install 'snapfusion-min[onnx]'" in code, code
    assert not out.exists()


def test_a_failed_export_leaves_no_file(tmp_path, monkeypatch):
    """The exporter dies after writing part of its file: no .onnx, no partial file, the earlier file kept."""
    pipe = tiny_pipeline()
    export_onnx(pipe, tmp_path, ["decoder"], resolution=64, log=False)
    before = (tmp_path / "decoder.onnx").read_bytes()

    def dies(module, args, f, **kw):
        open(f, "wb").write(b"half an onnx file")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch.onnx, "export", dies)
    with pytest.raises(RuntimeError, match="killed"):
        export_onnx(pipe, tmp_path, ["decoder", "unet"], resolution=64, log=False)
    assert (tmp_path / "decoder.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if "onnx" in p.name) == ["decoder.onnx"]


def test_command_line_exports_checked_files(tmp_path, capfd):
    code = run_main("export.py", "--to", "onnx", "--parts", "unet", "--remove", "up1.A0", "--out-dir", str(tmp_path))
    assert code in (0, None)
    err = capfd.readouterr().err
    assert "unet.onnx" in err and "ONNX Runtime vs torch" in err
    meta = json.loads((tmp_path / "snapfusion_min.json").read_text())
    assert meta["removed_blocks"] == ["up1.A0"] and meta["files"]["unet"]["max_relative_error"] <= MAX_RELATIVE_ERROR
    assert meta["arch"] == json.loads(read_pipeline(BUNDLED / "model.safetensors").unet.spec.to_json())
