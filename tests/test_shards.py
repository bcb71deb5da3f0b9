"""WebDataset shards (shards.py): written by the webdataset package in img2dataset's layout, one corrupt image and one
sample without a caption among them; the stream's order, rank and worker split, and training on two ranks with exact
resume."""

import gzip
import io
import json
import lzma
import os
import shutil
import tarfile

import pytest
import torch
import webdataset as wds
from helpers import CLIP, run_script
from PIL import Image

from snapfusion_min.formats.shards import Shards, index_shard, is_shards, shard_paths
from snapfusion_min.training import Dist, batch_at, captions, make_dataset
from snapfusion_min.vae import TOY_VAE
from snapfusion_min.world import World

N_SHARDS, PER_SHARD = 4, 6
BAD = {"shard-00001.tar:000007": "unreadable (UnidentifiedImageError)", "shard-00002.tar:000015": "empty caption"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shards of 6 toy samples: .jpg + .txt + .json in even shards, .png + .json (caption inside) in odd ones."""
    folder = tmp_path_factory.mktemp("shards")
    toy = World("train", seed=3)
    for s in range(N_SHARDS):
        with wds.TarWriter(str(folder / f"shard-{s:05d}.tar")) as sink:
            for k in range(PER_SHARD):
                i = s * PER_SHARD + k
                image, combo = toy.sample(i)
                data = io.BytesIO()
                image.save(data, format="JPEG" if s % 2 == 0 else "PNG")
                ext = "jpg" if s % 2 == 0 else "png"
                sample = {"__key__": f"{i:06d}", ext: data.getvalue(),
                          "json": json.dumps({"caption": combo.caption, "url": f"https://x/{i}"}).encode()}
                if s % 2 == 0:
                    sample["txt"] = combo.caption.encode()
                if i == 7:
                    sample[ext] = b"not an image at all"
                if i == 15:
                    sample["json"] = json.dumps({"url": "no caption here"}).encode()
                    sample.pop("txt", None)
                sink.write(sample)
    return folder


def test_shards_are_named_by_folder_glob_or_brace_range(shards, tmp_path):
    assert is_shards(str(shards)) and not is_shards("toy")
    mixed = tmp_path / "mixed"  # shards and images in one folder: which is meant is not guessed
    mixed.mkdir()
    shutil.copyfile(shards / "shard-00000.tar", mixed / "shard-00000.tar")
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    with pytest.raises(ValueError, match=r"mixed holds both WebDataset shards \(.tar\) and images: give the shards"):
        is_shards(str(mixed))
    names = [p.name for p in shard_paths(str(shards))]
    assert names == [f"shard-{s:05d}.tar" for s in range(N_SHARDS)]
    assert [p.name for p in shard_paths(str(shards / "shard-{00001..00002}.tar"))] == names[1:3]
    assert [p.name for p in shard_paths(str(shards / "shard-*.tar"))] == names
    with pytest.raises(FileNotFoundError, match=r"no such shard: .*shard-00004.tar \(and 1 more\)"):
        shard_paths(str(shards / "shard-{00003..00005}.tar"))


def test_ranks_split_each_epoch_and_batches_are_a_function_of_the_step(shards):
    data = Shards(str(shards), 64)
    keys = {r: [] for r in range(2)}
    for r in range(2):  # one epoch of each rank's stream: disjoint, together every sample
        length = sum(len(data.samples(j)) for j in data.rank_shards(0, r, 2, seed=5))
        keys[r] = [data.samples(j)[k][0] for (j, k), _ in zip(data.stream(0, r, 2, 5), range(length))]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == [f"{i:06d}" for i in range(N_SHARDS * PER_SHARD)]
    # the batch of a step does not depend on what was read before, on a new reader, or on data-loader workers
    want = {(s, r): data.batch(s, 4, r, 2, 5) for s in (0, 1, 2, 7, 30) for r in range(2)}
    again, workers = Shards(str(shards), 64), Shards(str(shards), 64, workers=2)
    for s, r in [(30, 1), (0, 0), (7, 1), (2, 0), (1, 1), (7, 0), (30, 0), (0, 1), (1, 0), (2, 1)]:
        x, c = again.batch(s, 4, r, 2, 5)
        assert torch.equal(x, want[s, r][0]) and c == want[s, r][1]
    for s in (1, 2, 3, 4, 7, 8):  # in order (the workers interleave), then a jump back restarts them
        x, c = workers.batch(s, 4, 0, 2, 5)
        assert torch.equal(x, data.batch(s, 4, 0, 2, 5)[0]) and c == data.batch(s, 4, 0, 2, 5)[1]
    assert x.shape == (2, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    for s in range(40):  # the bad samples come by, are counted with why, and never stop a batch
        for r in range(2):
            data.batch(s, 4, r, 2, 5)
    assert data.skipped == BAD and workers.skipped.items() <= BAD.items()


def test_a_truncated_shard_keeps_the_samples_before_the_damage(shards, tmp_path):
    """A shard cut short keeps its samples up to the cut, one with a garbled tar header those before it; both are
    named as damaged, the broken samples skipped, and every batch is whole. A shard cut exactly between two members
    (no end-of-archive blocks) is named too."""
    for s in range(2):
        (tmp_path / f"shard-{s:05d}.tar").write_bytes((shards / f"shard-{s:05d}.tar").read_bytes())
    whole = bytearray((shards / "shard-00002.tar").read_bytes())
    (tmp_path / "shard-00002.tar").write_bytes(whole[:len(whole) * 2 // 3])
    with tarfile.open(shards / "shard-00003.tar") as tar:
        header = tar.getmembers()[7].offset  # the header of the 3rd sample's first file
    whole = bytearray((shards / "shard-00003.tar").read_bytes())
    whole[header:header + 512] = b"\xab" * 512
    (tmp_path / "shard-00003.tar").write_bytes(whole)
    data = Shards(str(tmp_path), 64)
    for step in range(20):
        assert data.batch(step, 2, 0, 1, 5)[0].shape == (2, 3, 64, 64)
    assert [len(data.samples(j)) for j in range(4)] == [PER_SHARD, PER_SHARD, 5, 4]  # the 5th cut, the 4th garbled
    assert data.skipped["shard-00002.tar"].startswith(("truncated: ", "damaged: "))  # cut in a file or a header
    assert data.skipped["shard-00003.tar"].startswith("damaged: unreadable tar header at byte")
    assert {"shard-00002.tar:000016", "shard-00003.tar:000021"} <= set(data.skipped)
    (tmp_path / "cut").mkdir()
    with tarfile.open(shards / "shard-00000.tar") as tar:
        fourth = sorted({m.name.partition(".")[0] for m in tar.getmembers()})[3]
        cut = min(m.offset for m in tar.getmembers() if m.name.startswith(fourth + "."))  # its first header
    (tmp_path / "cut" / "a.tar").write_bytes((shards / "shard-00000.tar").read_bytes()[:cut])
    samples, problem = index_shard(tmp_path / "cut" / "a.tar")
    assert len(samples) == 3 and problem == "truncated: ends after 3 samples without the tar's end-of-archive blocks"
    assert index_shard(shards / "shard-00000.tar")[1] == ""  # a whole shard: nothing to say


def test_training_helpers_read_shards(shards):
    data = make_dataset(str(shards), 64, seed=5)
    x, c = batch_at(data, 3, 4, Dist(), seed=5)
    assert x.shape == (4, 3, 64, 64) and len(c) == 4
    prompts = captions(data, 30, seed=5)
    assert len(prompts) == 30 and len(set(prompts)) >= 10
    with pytest.raises(TypeError, match="no length"):
        len(data)


@pytest.mark.slow
def test_training_on_two_ranks_from_shards_resumes_exactly(shards, tmp_path):
    """torchrun, two gloo ranks, the tiny UNet trained on the shards: stopped after 1 of 3 steps and resumed, it ends
    bitwise where an uninterrupted run ends."""
    from snapfusion_min.formats.checkpoint import save_checkpoint
    from snapfusion_min.training import load_state
    from snapfusion_min.vae import VAE

    ae = tmp_path / "ae.safetensors"
    save_checkpoint(ae, {"vae": VAE(TOY_VAE)}, {"vae": TOY_VAE.__dict__, "latent_scale": 1.0})

    def train(out, *extra):
        r = run_script("train.py", "unet", "--arch", "tiny", "--clip", str(CLIP), "--autoencoder", str(ae), "--out",
                       str(out), "--train-steps", "3", "--batch-size", "4", "--save-every", "100", "--device", "cpu",
                       "--num-inference-steps", "2", "--data", str(shards), "--workers", "1", *extra, torchrun=True)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    straight = train(tmp_path / "a.safetensors")
    assert "all 2 ranks agree" in straight.stdout and "warning: skipped shard-00001.tar:000007" in straight.stderr
    train(tmp_path / "b.safetensors", "--stop-after", "1")
    train(tmp_path / "b.safetensors", "--resume")
    a, b = (load_state(str(tmp_path / f"{n}.safetensors") + ".state.pt") for n in "ab")
    assert a["step"] == b["step"] == 3 and a["losses"] == b["losses"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_shards_that_hold_nothing_say_why(tmp_path):
    """A gzip or xz file, an empty file and random bytes named .tar: the error names each shard and what is wrong with
    it."""
    (tmp_path / "gz.tar").write_bytes(gzip.compress(b"not a tar" * 100))
    (tmp_path / "xz.tar").write_bytes(lzma.compress(b"not a tar" * 100))
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "noise.tar").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="the shards of rank 0 hold no samples") as e:
        next(Shards(str(tmp_path), 64).stream(0, 0, 1, 0))
    message = str(e.value)
    for name in ("gz.tar: gzip-compressed, not a tar", "noise.tar: unreadable tar after 0 samples (invalid header)",
                 "empty.tar: unreadable tar after 0 samples (empty file)", "and 1 more"):
        assert name in message, message
    assert index_shard(tmp_path / "xz.tar") == ([], "xz-compressed, not a tar (decompress it first)")


def test_shards_that_would_hang_are_refused(tmp_path):
    """The probe's hangs: a shard whose images and captions never pair up, a .tar that is a link to /dev/zero or a
    FIFO, a brace range of a million names: each is an error, at once."""
    unpaired = tmp_path / "unpaired" / "a.tar"
    unpaired.parent.mkdir()
    with tarfile.open(unpaired, "w") as tar:
        for name, payload in (("000.png", b"x"), ("001.txt", b"a caption"), ("002.png", b"y"), ("003.txt", b"c")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(ValueError, match=r"rank 0: \d+ unusable samples in a row, 4 distinct"):
        Shards(str(unpaired.parent), 32).batch(0, 2, 0, 1, 0)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "zero.tar").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"zero.tar is not a regular file \(a folder, FIFO or device\)"):
        shard_paths(str(odd))
    (odd / "zero.tar").unlink()
    os.mkfifo(odd / "fifo.tar")
    with pytest.raises(ValueError, match=r"fifo.tar is not a regular file"):
        shard_paths(str(odd / "fifo.tar"))
    with pytest.raises(ValueError, match=r"names 1,000,000 shards; at most 100,000"):
        shard_paths(str(tmp_path / "s-{000000..999999}.tar"))
