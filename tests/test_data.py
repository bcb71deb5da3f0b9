"""The captioned-folder loader (the toy world: test_world.py)."""

import io
import json
import tarfile

import numpy as np
import pytest
from helpers import bomb_png
from PIL import Image

from snapfusion_min.data import CaptionedFolder
from snapfusion_min.formats.images import to_rgb
from snapfusion_min.training import make_dataset


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


def test_folder_problems_name_the_file_or_are_counted(tmp_path, capsys):
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
    make_dataset(str(root), 64, skip_bad=True)  # as train.py --skip-bad opens it: it says what it left out
    assert f"warning: left out 1 of 3 images of {root} (e.g. img1.png: unreadable image" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        CaptionedFolder(tmp_path / "missing")
    (root / "captions.jsonl").write_text('{"file": "img0.png"}\n')
    with pytest.raises(ValueError, match=r"captions\.jsonl:1"):
        CaptionedFolder(root)
    rows = [{"file": "img0.png", "caption": 5}, {"file": "img1.png", "caption": ["a", "list"]},
            {"file": "img2.png", "caption": "two"}]
    (root / "img1.png").unlink()
    make_folder(tmp_path / "fresh")
    (root / "img1.png").write_bytes((tmp_path / "fresh" / "img1.png").read_bytes())
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"img0\.png: its caption is a int, not a string"):
        CaptionedFolder(root)
    data = CaptionedFolder(root, skip_bad=True)
    assert [c for _, c in data.items] == ["two"]
    assert data.skipped == {"img0.png": "its caption is a int, not a string",
                            "img1.png": "its caption is a list, not a string"}


def test_truncated_jpeg_is_found_when_the_folder_is_opened(tmp_path):
    """A truncated JPEG passes PIL's verify(); the check decodes every image fully."""
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"img{i}.jpg", quality=90)
        (root / f"img{i}.txt").write_text(f"caption {i}")
    whole = (root / "img1.jpg").read_bytes()
    (root / "img1.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"img1\.jpg: unreadable image"):
        CaptionedFolder(root, resolution=32)
    data = CaptionedFolder(root, resolution=32, skip_bad=True)
    assert len(data) == 1 and list(data.skipped) == ["img1.jpg"]


def test_an_image_broken_after_the_check_is_skipped_and_counted_not_fatal(tmp_path):
    root = make_folder(tmp_path / "data")
    for i in range(3):
        (root / f"img{i}.txt").write_text(f"cap {i}")
    data = CaptionedFolder(root, resolution=16, skip_bad=True)
    (root / "img1.png").write_bytes(b"gone bad")
    image, caption = data[1]  # the next good image instead
    assert caption == "cap 2" and image.shape == (3, 16, 16) and list(data.skipped) == ["img1.png"]
    data.skip_bad = False  # without --skip-bad it is an error naming the file
    with pytest.raises(ValueError, match=r"img1\.png: unreadable image"):
        data[1]


@pytest.mark.parametrize("mode,pixel,want", [
    ("I;16", 65535, (255, 255, 255)),  # 16-bit white: not clipped, not wrapped
    ("I;16", 32768, (128, 128, 128)),  # 16-bit mid grey -> 8-bit mid grey (PIL's convert would give white)
    ("RGBA", (200, 10, 10, 0), to_rgb.__globals__["BACKGROUND"]),  # fully transparent: the background (white)
    ("RGBA", (200, 10, 10, 255), (200, 10, 10)),  # opaque: itself
    ("LA", (0, 128), (128, 128, 128)),  # black at half alpha over white
])
def test_16_bit_and_alpha_images_load_as_they_look(tmp_path, mode, pixel, want):
    path = tmp_path / "x.png"
    Image.new(mode, (8, 8), pixel).save(path)
    with Image.open(path) as image:
        got = to_rgb(image).getpixel((4, 4))
    assert all(abs(a - b) <= 1 for a, b in zip(got, want)), (mode, got)


def test_palette_transparency_is_composited(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30] * 256)
    image.info["transparency"] = 0
    image.save(tmp_path / "p.png", transparency=0)
    with Image.open(tmp_path / "p.png") as loaded:
        assert to_rgb(loaded).getpixel((0, 0)) == (255, 255, 255)


def test_an_image_over_the_pixel_limit_is_a_bad_sample_not_a_crash(tmp_path):
    """A decompression bomb (20,000 x 20,000 by its header) in a folder is an error naming it, or with --skip-bad is
    left out and counted; in a WebDataset shard it is a skipped sample. Nothing is decoded. An image between our
    limit and PIL's (10,000 x 10,000) too."""
    from snapfusion_min.formats.shards import Shards

    root = make_folder(tmp_path / "data", 2)
    for i in range(2):
        (root / f"img{i}.txt").write_text(f"cap {i}")
    (root / "bomb.png").write_bytes(bomb_png())
    (root / "bomb.txt").write_text("a bomb")
    with pytest.raises(ValueError, match=r"bomb\.png: unreadable image \(400,000,000 pixels, more than 67,108,864\)"):
        CaptionedFolder(root)
    data = CaptionedFolder(root, skip_bad=True)
    assert len(data) == 2 and data.skipped == {"bomb.png": "unreadable image (400,000,000 pixels, more than "
                                                            "67,108,864)"}
    shard = tmp_path / "shards" / "a.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("000.png", bomb_png()), ("000.txt", b"a bomb"),
                              ("001.png", (root / "img0.png").read_bytes()), ("001.txt", b"cap 0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    shards = Shards(str(shard.parent), 32)
    assert shards.load(0, 0) == "unreadable (400,000,000 pixels, more than 67,108,864)"
    assert shards.load(0, 1)[1] == "cap 0"
    (root / "bomb.png").write_bytes(bomb_png(10000, 10000))
    assert CaptionedFolder(root, skip_bad=True).skipped == {"bomb.png": "unreadable image (100,000,000 pixels, more "
                                                                        "than 67,108,864)"}
    (root / "bomb.png").write_bytes(bomb_png(9000, 8000))  # under PIL's warning, over ours
    assert CaptionedFolder(root, skip_bad=True).skipped == {"bomb.png": "unreadable image (72,000,000 pixels, more "
                                                                        "than 67,108,864)"}
