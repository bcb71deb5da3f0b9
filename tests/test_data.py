"""The toy world and the captioned-folder loader."""

import json

import pytest
import torch
from PIL import Image

from snapfusion_min.data import ALL_COMBOS, CaptionedFolder, ToyWorld, combos, is_heldout


def test_toy_world_is_deterministic_by_seed():
    a, b, c = ToyWorld(seed=0), ToyWorld(seed=0), ToyWorld(seed=1)
    for i in (0, 5, 999_999):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert any(a[i][1] != c[i][1] or not torch.equal(a[i][0], c[i][0]) for i in range(4))
    image, caption = a[3]
    assert image.shape == (3, 64, 64) and -1 <= image.min() and image.max() <= 1
    assert caption.startswith("a ") and caption.endswith(" background")


def test_heldout_combinations_never_appear_in_training():
    train, heldout = combos("train"), combos("heldout")
    assert len(ALL_COMBOS) == 900 and len(train) + len(heldout) == 900 and 60 < len(heldout) < 120
    assert not {c.caption for c in train} & {c.caption for c in heldout}
    data = ToyWorld("train", seed=3)
    assert not any(is_heldout(data.sample(i)[1]) for i in range(3000))
    assert all(is_heldout(ToyWorld("heldout", seed=3).sample(i)[1]) for i in range(200))
    # every single attribute value still occurs in training: held-out tests combinations, not new words
    for attr in ("color", "shape", "size", "position", "background"):
        assert {getattr(c, attr) for c in train} == {getattr(c, attr) for c in ALL_COMBOS}


def make_folder(root, n=3):
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (40 + 10 * i, 30), (10 * i, 20, 30)).save(root / f"img{i}.png")
    return root


def test_folder_with_jsonl_and_sidecar_captions(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "captions.jsonl").write_text("\n".join(json.dumps({"file": f"img{i}.png", "caption": f"cap {i}"})
                                                   for i in range(2)))
    (root / "img2.txt").write_text("sidecar caption\n")
    data = CaptionedFolder(root, resolution=16)
    assert len(data) == 3 and [c for _, c in data.items] == ["cap 0", "cap 1", "sidecar caption"]
    image, caption = data[2]
    assert image.shape == (3, 16, 16) and caption == "sidecar caption"


def test_folder_problems_name_the_file_or_are_counted(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "img0.txt").write_text("zero")
    (root / "img1.txt").write_text("one")
    with pytest.raises(ValueError, match=r"img2\.png: no caption"):
        CaptionedFolder(root)
    (root / "img2.txt").write_text("two")
    (root / "img1.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"img1\.png: unreadable image"):
        CaptionedFolder(root)
    data = CaptionedFolder(root, skip_bad=True)
    assert len(data) == 2 and list(data.skipped) == ["img1.png"]
    with pytest.raises(FileNotFoundError):
        CaptionedFolder(tmp_path / "missing")
    (root / "captions.jsonl").write_text('{"file": "img0.png"}\n')
    with pytest.raises(ValueError, match=r"captions\.jsonl:1"):
        CaptionedFolder(root)
