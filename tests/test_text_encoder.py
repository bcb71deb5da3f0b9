"""CLIP ViT-L/14 text encoder and tokenizer against transformers' CLIPTextModel and CLIPTokenizer."""

import gzip
import json

import open_clip
import torch
from conftest import max_rel_err, randomize
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from snapfusion_min.text_encoder import EOT, TextEncoder, Tokenizer
from snapfusion_min.weights import apply_map, clip_source_keys, clip_state

PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "A pikachu fine dining with a view to the Eiffel "
           "Tower!!  ", "word " * 100, "naïve café, 3.14 — isn't it?"]


def test_text_encoder_equals_transformers_clip_vit_l14():
    ref = randomize(CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
                                                 num_attention_heads=12, num_hidden_layers=12))).eval()
    ours = TextEncoder().eval()
    apply_map(ours, clip_state(ref.state_dict()), clip_source_keys, "text encoder")
    tokens = Tokenizer()(PROMPTS)
    with torch.no_grad():
        assert max_rel_err(ours(tokens), ref(tokens).last_hidden_state) < 1e-5


def sd_tokenizer(tmp_path) -> CLIPTokenizer:
    """SD-v1.5's CLIPTokenizer, with vocab.json / merges.txt rebuilt from the BPE file open_clip ships."""
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def test_tokenizer_equals_sd15_clip_tokenizer(tmp_path):
    ref = sd_tokenizer(tmp_path)(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
    ours = Tokenizer()(PROMPTS)
    assert torch.equal(ours, ref)
    assert ours[1, 2:].eq(EOT).all()  # padded with <|endoftext|>, not 0 as open_clip's own tokenizer
    assert not torch.equal(ours, open_clip.tokenize(PROMPTS))
