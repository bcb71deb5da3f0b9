"""FID's Frechet distance against closed forms; CLIP score and zero-shot accuracy with the bundled toy CLIP; at SD
scale, any open_clip model from a local file and FID on torch-fidelity's Inception (random weights here)."""

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from helpers import CLIP, randomize
from torchvision.transforms.functional import to_pil_image

from snapfusion_min.eval import metrics
from snapfusion_min.eval.metrics import (
    clip_score,
    fid,
    fid_from_statistics,
    fid_statistics,
    frechet_distance,
    image_files,
    inception_features,
    load_statistics,
    open_clip_judge,
    read_images,
    save_statistics,
)
from snapfusion_min.formats.images import to_tensor
from snapfusion_min.toy.clip import load_toy_clip, real_heldout, toy_judge


def random_rotation(d, rng):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def test_frechet_distance_commuting_gaussians_closed_form():
    """Same eigenvectors: FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(0)
    d = 16
    q = random_rotation(d, rng)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_non_commuting_2x2_closed_form():
    """For 2x2: tr sqrt(C1 C2) = sqrt(tr(C1 C2) + 2 sqrt(det(C1 C2))), any PSD C1, C2."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
        c1, c2 = a @ a.T + 0.01 * np.eye(2), b @ b.T + 0.01 * np.eye(2)
        tr_sqrt = np.sqrt(np.trace(c1 @ c2) + 2 * np.sqrt(np.linalg.det(c1 @ c2)))
        expected = np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
        assert frechet_distance(np.zeros(2), c1, np.zeros(2), c2) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert abs(fid(x, x)) < 1e-8
    shifted = [fid(x, x + s) for s in (0.5, 1.0, 2.0)]
    assert shifted == pytest.approx([8 * 0.25, 8 * 1.0, 8 * 4.0], rel=1e-6)  # a pure shift adds |delta mu|^2
    assert fid(x, 1.5 * x) > 0


# ---- SD scale: any open_clip model from a local file, FID on torch-fidelity's Inception ---------------------------
TOY_CLIP_CONFIG = {  # the toy CLIP (toyclip.build_toy_clip) stated as an open_clip model config
    "embed_dim": 64, "quick_gelu": True, "custom_text": True,
    "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "head_width": 16, "image_size": 64},
    "text_cfg": {"context_length": 32, "width": 64, "heads": 4, "layers": 3}}
TINY_VIT_CONFIG = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


def register(name, config, folder):
    """Make ``name`` an open_clip model, as a user's own config file would."""
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")


def test_open_clip_judge_is_the_toy_judge_for_the_toy_clip(tmp_path):
    """The generic path (model name + local weights, open_clip's own tokenizer and preprocessing config) gives the toy
    judge's features for the bundled toy CLIP, and its CLIP score tells matching captions from shuffled ones."""
    register("toy-clip-test", TOY_CLIP_CONFIG, tmp_path)
    toy = toy_judge(load_toy_clip(CLIP))
    judge = open_clip_judge("toy-clip-test", CLIP, preprocess={"mean": (0.5,) * 3, "std": (0.5,) * 3})
    images, truth = real_heldout(64)
    captions = [c.caption for c in truth]
    torch.testing.assert_close(judge.image_features(images), toy.image_features(images), rtol=0, atol=1e-6)
    torch.testing.assert_close(judge.text_features(captions), toy.text_features(captions), rtol=0, atol=1e-6)
    matching = clip_score(judge, images, captions)
    shuffled = clip_score(judge, images, captions[1:] + captions[:1])
    assert matching > shuffled + 0.05, (matching, shuffled)


def test_open_clip_judge_preprocesses_like_open_clip(tmp_path):
    """A small random ViT: at its input size our features are open_clip's exactly; from twice the size (resized by
    us, by PIL in open_clip's transforms) to cosine 1 - 1e-5."""
    register("tiny-vit-test", TINY_VIT_CONFIG, tmp_path)
    model = randomize(open_clip.create_model("tiny-vit-test"), 3).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    judge = open_clip_judge("tiny-vit-test", tmp_path / "tiny.pt")
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-vit-test")
    images = (real_heldout(8)[0][:, :, ::2, ::2], real_heldout(8)[0])  # 32x32 = its size, 64x64
    for x, bound in ((images[0], 1e-6), (images[1], 1e-5)):  # no antialiasing: 1e-4
        pils = [to_pil_image((im * 255).round().byte()) for im in x]
        want = model.encode_image(torch.stack([preprocess(p) for p in pils]), normalize=True).detach()
        got = judge.image_features(torch.stack([to_tensor(p) for p in pils]) / 2 + 0.5)
        assert (1 - (got * want).sum(-1)).max() < bound
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Q-99'"):
        open_clip_judge("ViT-Q-99", tmp_path / "tiny.pt")
    with pytest.raises(FileNotFoundError, match="no such CLIP weights file"):
        open_clip_judge("tiny-vit-test", tmp_path / "absent.pt")
    good = (tmp_path / "tiny.pt").read_bytes()
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")  # another model's weights
    for name, content in (("cut.pt", good[:len(good) // 2]), ("text.pt", b"not weights"), ("other.pt", None)):
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not usable as tiny-vit-test weights \\(") as e:
            open_clip_judge("tiny-vit-test", tmp_path / name)
        assert "\n" not in str(e.value)


def folder_of(images, folder):
    folder.mkdir()
    for i, x in enumerate(images):
        to_pil_image(x).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.slow  # SD scale's FID: Inception at 299x299
class RunsCode:
    """Unpickling this creates the file ``marker``: a stand-in for a pickle carrying code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def test_inception_weights_are_read_once_so_a_swap_runs_no_code(random_inception_file, tmp_path, monkeypatch):
    """The probe's case: the file is swapped for a code-carrying pickle right after our tensors-only read; torch-
    fidelity, which unpickles without a guard, must never open it."""
    weights, marker = tmp_path / "inception.pth", tmp_path / "code-ran"
    shutil.copyfile(random_inception_file, weights)
    read = metrics.read_state_dict

    def read_then_swap(path):
        state = read(path)
        torch.save({"x": RunsCode(marker)}, path)
        return state

    monkeypatch.setattr(metrics, "read_state_dict", read_then_swap)
    try:
        net = metrics.inception(weights)
    finally:
        weights.unlink()
    assert not marker.exists() and sum(p.numel() for p in net.parameters()) > 2 * 10**7


def test_fid_on_inception_features_of_folders_and_statistics(random_inception, tmp_path):
    """FID of a folder with itself ~ 0 and growing with a brightness shift; a folder against its saved .npz
    statistics gives the same number; torch-fidelity's formula agrees with our own frechet_distance."""
    real = real_heldout(12, seed=5)[0]
    feats = {}
    for shift in (0.0, 0.1, 0.3):
        folder = folder_of((real + shift).clamp(0, 1), tmp_path / f"shift{shift}")
        feats[shift] = inception_features(random_inception, read_images(image_files(folder), size=64, batch=16))
    ref = fid_statistics(feats[0.0])
    fids = [fid_from_statistics(fid_statistics(feats[s]), ref) for s in (0.0, 0.1, 0.3)]
    assert abs(fids[0]) < 1e-3 * fids[1] and 0 < fids[1] < fids[2], fids  # 12 images: torch-fidelity's eigvals
    ours = frechet_distance(*fid_statistics(feats[0.3]).values(), *ref.values())
    assert ours == pytest.approx(fids[2], rel=1e-4)
    save_statistics(tmp_path / "ref.npz", ref)
    assert fid_from_statistics(fid_statistics(feats[0.1]), load_statistics(tmp_path / "ref.npz")) == fids[1]
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="do not fit together"):
        load_statistics(tmp_path / "bad.npz")
    np.savez(tmp_path / "nan.npz", mu=np.zeros(2), sigma=np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="nan.npz: FID statistics sigma hold values that are not finite numbers"):
        load_statistics(tmp_path / "nan.npz")
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="missing sigma$"):
        load_statistics(tmp_path / "nosigma.npz")


