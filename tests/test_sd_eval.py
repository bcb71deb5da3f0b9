"""§5's protocol at SD scale (sd_eval): MS-COCO caption choice, resumable and sharded generation into a folder,
scoring a folder, evaluate.py --prompts-file end to end, and Alg. 1 with an open_clip scorer."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import CLIP, ROOT, run_main, tiny_pipeline
from test_metrics import TOY_CLIP_CONFIG, folder_of, register

from snapfusion_min import read_pipeline
from snapfusion_min.eval.coco import clip_scorer, generate_folder, read_prompt_file, score_folder
from snapfusion_min.eval.metrics import (
    clip_score,
    fid_from_statistics,
    fid_statistics,
    image_files,
    inception_features,
    load_statistics,
    open_clip_judge,
    read_images,
    save_statistics,
)
from snapfusion_min.pipeline import SamplerConfig
from snapfusion_min.toy.clip import load_toy_clip, real_heldout, toy_judge

COCO = {i: [f"image {i} caption {k}" for k in range(1 + i % 5)] for i in range(40, 60)}  # 1 to 5 captions each
PROMPTS = [f"a {c} {s} in the center on a dark background" for c in ("red", "blue", "green") for s in
           ("circle", "square", "triangle", "cross")]


def coco_file(path, shuffle_seed=0):
    """A captions_val2014.json in MS-COCO's layout, annotations in a scrambled order, captions with stray spaces."""
    annotations = [{"image_id": i, "id": 1000 * i + k, "caption": f" {c}\n"} for i, caps in COCO.items()
                   for k, c in enumerate(caps)]
    random.Random(shuffle_seed).shuffle(annotations)
    path.write_text(json.dumps({"images": [{"id": i} for i in COCO], "annotations": annotations}))
    return path


def test_coco_caption_choice_is_fixed_by_the_seed(tmp_path):
    a = read_prompt_file(coco_file(tmp_path / "a.json", 0), seed=3)
    assert read_prompt_file(coco_file(tmp_path / "b.json", 1), seed=3) == a  # not the file's order: the seed's
    image_of = {c: i for i, caps in COCO.items() for c in caps}
    assert sorted(image_of[c] for c in a) == sorted(COCO)  # one caption per image, cleaned
    other = read_prompt_file(tmp_path / "a.json", seed=4)
    assert other != a and sorted(image_of[c] for c in other) == sorted(COCO)
    assert read_prompt_file(tmp_path / "a.json", 7, seed=3) == a[:7]  # a subset is a prefix of the seeded order
    chosen = [read_prompt_file(tmp_path / "a.json", seed=s) for s in range(40)]
    assert len({c for p in chosen for c in p if image_of[c] == 44}) == 5  # every caption of an image can be drawn
    with pytest.raises(ValueError, match="asked for 21 prompts, .* has 20"):
        read_prompt_file(tmp_path / "a.json", 21)
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not an MS-COCO captions file"):
        read_prompt_file(tmp_path / "bad.json")
    (tmp_path / "p.txt").write_text("  first prompt \n\nsecond\n")
    assert read_prompt_file(tmp_path / "p.txt") == ["first prompt", "second"]


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "tiny.safetensors"
    tiny_pipeline(sampler=SamplerConfig(steps=4, guidance=2.0, spacing="trailing", resolution=32)).save(path)
    return path


def pngs(folder):
    return {p.name: p.read_bytes() for p in image_files(folder)}


def test_generation_shards_and_resumes_without_duplicates_or_losses(tmp_path, tiny_checkpoint):
    """Two ranks' shares are disjoint and together the whole; a second call makes nothing; the images equal one
    single-rank run's byte for byte; another setting in the same folder is refused."""
    pipe = read_pipeline(tiny_checkpoint)
    assert generate_folder(pipe, PROMPTS, tmp_path / "one", batch=2, progress=False) == len(PROMPTS)
    made = [generate_folder(pipe, PROMPTS, tmp_path / "two", batch=2, rank=r, world=2, progress=False) for r in (0, 1)]
    assert made == [6, 6] and pngs(tmp_path / "two") == pngs(tmp_path / "one")
    assert generate_folder(pipe, PROMPTS, tmp_path / "two", batch=2, progress=False) == 0
    (tmp_path / "two" / "00005.png").unlink()
    assert generate_folder(pipe, PROMPTS, tmp_path / "two", batch=2, progress=False) == 1
    assert pngs(tmp_path / "two") == pngs(tmp_path / "one")
    with pytest.raises(ValueError, match=r"holds images made with other settings \(guidance 2.0 vs 3.0\)"):
        generate_folder(pipe, PROMPTS, tmp_path / "two", guidance=3.0, progress=False)
    with pytest.raises(ValueError, match="prompts_sha256"):
        generate_folder(pipe, PROMPTS[::-1], tmp_path / "two", progress=False)
    with pytest.raises(ValueError, match=r"other settings \(sampler 'ddim' vs 'dpm\+\+'\)"):
        generate_folder(pipe.with_parts(sampler=dataclasses.replace(pipe.sampler, solver="dpm++")), PROMPTS,
                        tmp_path / "two", progress=False)
    record = tmp_path / "two" / "generation.json"  # a folder made before the sampler was recorded: DDIM's
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "sampler"}))
    assert generate_folder(pipe, PROMPTS, tmp_path / "two", batch=2, progress=False) == 0


def test_generation_resumes_after_a_kill(tmp_path, tiny_checkpoint):
    """evaluate.py killed (SIGKILL) mid-generation, then run again: every image once, none lost, no temporary file,
    the same bytes as an uninterrupted run. One image per batch: on some CPUs an image's last bit depends on the other
    images of its batch (a resumed run's batches are cut elsewhere; issue #44)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS + PROMPTS[:4]))
    args = ["coco", "--checkpoint", str(tiny_checkpoint), "--prompts-file", str(prompts), "--num-prompts", "16",
            "--batch-size", "1", "--num-inference-steps", "12", "--images-dir"]
    folder = tmp_path / "killed" / "s12-w2"
    proc = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *args, str(tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not folder.is_dir() or len(image_files(folder)) < 3:  # no deadline: a slow machine only takes longer
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(image_files(folder))
    assert 3 <= partial < 16, partial
    assert run_main("evaluate.py", *args, str(tmp_path / "killed")) == 0
    assert run_main("evaluate.py", *args, str(tmp_path / "clean")) == 0
    assert pngs(folder) == pngs(tmp_path / "clean" / "s12-w2") and len(pngs(folder)) == 16
    assert not [p for p in folder.iterdir() if p.suffix == ".tmp" or p.name.startswith(".")]


@pytest.mark.slow  # SD scale's FID: Inception at 299x299
def test_score_folder_and_the_evaluate_command(tmp_path, tiny_checkpoint, random_inception, capsys):
    """score_folder's CLIP score is the judge's on the images it reads back, its FID the one of the features; the
    command sweeps guidance into subfolders and prints one row each."""
    pipe, prompts = read_pipeline(tiny_checkpoint), PROMPTS[:6]
    generate_folder(pipe, prompts, tmp_path / "gen", progress=False)
    judge = toy_judge(load_toy_clip(CLIP))
    real = folder_of(real_heldout(6, seed=9)[0], tmp_path / "real")
    reference = fid_statistics(inception_features(random_inception, read_images(image_files(real), 64)))
    r = score_folder(tmp_path / "gen", prompts, judge=judge, inception=random_inception, reference=reference,
                     fid_size=64, batch=4)
    images = torch.cat(list(read_images(image_files(tmp_path / "gen")))).float() / 255
    assert r["clip_score"] == pytest.approx(clip_score(judge, images, prompts), rel=1e-6)
    feats = inception_features(random_inception, read_images(image_files(tmp_path / "gen"), 64))
    assert r["fid"] == pytest.approx(fid_from_statistics(fid_statistics(feats), reference), rel=1e-9)
    with pytest.raises(ValueError, match="1 of 6 images missing"):
        (tmp_path / "gen" / "00003.png").unlink()
        score_folder(tmp_path / "gen", prompts, judge=judge)

    torch.save(random_inception.state_dict(), tmp_path / "inception.pth")
    save_statistics(tmp_path / "r.npz", reference)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    out = run_main("evaluate.py", "coco", "--checkpoint", str(tiny_checkpoint), "--prompts-file",
                   str(tmp_path / "p.txt"), "--num-prompts", "3", "--images-dir", str(tmp_path / "sweep"),
                   "--guidance", "1", "--guidance", "3",
                   "--inception-weights", str(tmp_path / "inception.pth"), "--fid-reference", str(tmp_path / "r.npz"),
                   "--fid-size", "64", "--curve", str(tmp_path / "curve.png"), "--json")
    assert out == 0 and (tmp_path / "curve.png").is_file() and (tmp_path / "curve.svg").is_file()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert [row.split(" | ")[2] for row in rows] == ["1", "3"]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["s4-w1", "s4-w3"]
    assert run_main("evaluate.py", "reference", "--fid-reference", str(real), "--inception-weights",
                    str(tmp_path / "inception.pth"), "--save-reference", str(tmp_path / "saved.npz"), "--fid-size",
                    "64") == 0
    saved = load_statistics(tmp_path / "saved.npz")
    assert np.allclose(saved["mu"], reference["mu"]) and np.allclose(saved["sigma"], reference["sigma"])
    (tmp_path / "empty").mkdir()
    assert run_main("evaluate.py", "reference", "--fid-reference", str(tmp_path / "empty"), "--inception-weights",
                    str(tmp_path / "inception.pth"), "--save-reference", str(tmp_path / "e.npz")) == \
        f"evaluate.py: error: FID reference folder {tmp_path / 'empty'} holds 0 image(s); FID needs at least 2 " \
        "(the paper's protocol: 30,000)"
    capsys.readouterr()
    assert run_main("evaluate.py", "coco", "--prompts-file", str(tmp_path / "p.txt")) == 2
    assert "evaluate.py coco: error: the following arguments are required: --images-dir" in capsys.readouterr().err
    assert run_main("evaluate.py", "coco", "--prompts-file", str(tmp_path / "p.txt"), "--images-dir",
                    str(tmp_path / "x"), "--fid-reference", str(tmp_path / "r.npz")) == \
        "evaluate.py: error: FID needs both --fid-reference and --inception-weights"


def test_alg1_with_an_open_clip_scorer(tmp_path, tiny_checkpoint, capsys):
    """evolve.py at SD scale's settings on the tiny UNet: dCLIP from an open_clip model (the toy CLIP registered as
    one) on a prompt file; the report's CLIP score of the result is clip_scorer's on the held-back prompts."""
    register("toy-clip-evolve", TOY_CLIP_CONFIG, tmp_path)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS))
    out = tmp_path / "evolved.safetensors"
    assert run_main("evolve.py", "--checkpoint", str(tiny_checkpoint), "--clip", "toy-clip-evolve", "--clip-weights",
                    str(CLIP), "--prompts-file", str(tmp_path / "p.txt"), "--score-prompts", "4", "--num-prompts",
                    "4", "--iterations", "1", "--actions", "1", "--robust-steps", "1", "--finetune-steps", "1",
                    "--batch-size", "2", "--target", "0.95", "--num-inference-steps", "2", "--dtype", "float32",
                    "--out", str(out)) == 0  # float32: the scores below are read_pipeline's
    log = json.loads((tmp_path / "evolved.safetensors.log.json").read_text())
    assert log["actions"] and all("d_clip" in a for a in log["actions"])
    judge = open_clip_judge("toy-clip-evolve", CLIP)
    want = clip_scorer(judge, PROMPTS[4:8])(read_pipeline(out))
    assert log["rows"][-1]["clip"] == pytest.approx(want, abs=1e-6)
    assert log["rows"][-1]["fid"] is None and "| - | - | - |" in capsys.readouterr().out
