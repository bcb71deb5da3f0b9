"""The bundled toy CLIP (models/toy/clip.safetensors): a real judge, and the toy diffusion model's text encoder."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from snapfusion_min.eval.metrics import clip_score, zero_shot_accuracy
from snapfusion_min.formats.images import to_tensor
from snapfusion_min.pipeline import read_pipeline
from snapfusion_min.text_encoder import Tokenizer
from snapfusion_min.toy.clip import Heldout, build_toy_clip, evaluate_generation, text_encoder_from_clip, toy_judge
from snapfusion_min.world import World

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "models" / "toy" / "clip.safetensors"


@pytest.fixture(scope="module")
def clip():
    model = build_toy_clip()
    model.load_state_dict(load_file(CLIP))
    return model.eval()


@pytest.fixture(scope="module")
def heldout():
    data = World("heldout", length=300, seed=99)
    samples = [data.sample(i) for i in range(300)]
    return (torch.stack([to_tensor(im) for im, _ in samples]) + 1) / 2, [c for _, c in samples]


def test_zero_shot_accuracy_on_heldout_real_images(clip, heldout):
    images, truth = heldout
    accuracy = zero_shot_accuracy(toy_judge(clip), images, truth)  # each named attribute against its alternatives
    assert accuracy["color"] >= 0.9 and accuracy["shape"] >= 0.9, accuracy
    assert min(accuracy.values()) >= 0.65, accuracy  # place, the hardest: 9 values, chance 11%
    with safe_open(str(CLIP), "pt") as f:  # the figures the training command recorded, on another held-out set
        recorded = json.loads(f.metadata()["snapfusion_min_toy_clip"])["zero_shot_accuracy_heldout"]
    assert set(recorded) == set(accuracy) and all(abs(recorded[k] - accuracy[k]) < 0.1 for k in accuracy)


def test_clip_score_prefers_matching_captions(clip, heldout):
    images, truth = heldout
    captions = [c.caption for c in truth]
    shuffled = captions[1:] + captions[:1]
    judge = toy_judge(clip)
    matching, wrong = clip_score(judge, images, captions), clip_score(judge, images, shuffled)
    assert matching > wrong + 0.2, (matching, wrong)


def test_text_encoder_is_the_clip_text_tower(clip):
    """Our TextEncoder over the toy CLIP's weights: its hidden state at the first <|endoftext|>, projected, is CLIP's
    own text embedding (open_clip pools the argmax token = first <|endoftext|>, since we pad with it)."""
    encoder = text_encoder_from_clip(clip)
    tokens = Tokenizer(32)(["a small red circle in the center on a dark background", "a large blue cross"])
    with torch.no_grad():
        hidden = encoder(tokens)
        pooled = hidden[torch.arange(2), tokens.argmax(-1)] @ clip.text.text_projection
        torch.testing.assert_close(pooled, clip.text(tokens), rtol=1e-5, atol=1e-5)


def test_a_tables_rows_share_one_heldout_reference(clip):
    """``judge_on_heldout`` works out the real images' scores once a table: each row's numbers equal a call of its
    own, the round trip is per autoencoder, and a held-out set of other prompts is refused."""
    pipe = read_pipeline(ROOT / "models" / "toy" / "model.safetensors")
    other = pipe.with_parts(vae=copy.deepcopy(pipe.vae))
    with torch.no_grad():
        other.vae.decoder.conv_out.bias.add_(0.3)  # another autoencoder: its round trip scores differently
    heldout, calls = Heldout(clip, 8), []
    scores = heldout.scores
    heldout.scores = lambda images: calls.append(len(images)) or scores(images)
    for p, steps in ((pipe, 2), (pipe, 3), (other, 2)):
        alone = evaluate_generation(p, clip, n=8, steps=steps)
        shared = evaluate_generation(p, clip, n=8, steps=steps, heldout=heldout)
        assert alone.pop("images").equal(shared.pop("images")) and alone == shared
    assert len(calls) == 3 + 1 + 2  # three generated sets, the real images once, two autoencoders' round trips
    assert shared["clip_score_decoded"] != evaluate_generation(pipe, clip, n=8, steps=2)["clip_score_decoded"]
    with pytest.raises(ValueError, match="held-out set of 8 prompts"):
        evaluate_generation(pipe, clip, n=4, heldout=heldout)
