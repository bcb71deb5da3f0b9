"""CLIP ViT-L/14 text encoder and tokenizer against transformers' CLIPTextModel and CLIPTokenizer."""

import open_clip
import torch
from helpers import max_rel_err, randomize, sd_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel

from snapfusion_min.formats.weights import apply_map, clip_source_keys, clip_state
from snapfusion_min.text_encoder import EOT, TextEncoder, Tokenizer

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


def test_tokenizer_equals_sd15_clip_tokenizer(tmp_path):
    ref = sd_tokenizer(tmp_path)(PROMPTS, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
    ours = Tokenizer()(PROMPTS)
    assert torch.equal(ours, ref)
    assert ours[1, 2:].eq(EOT).all()  # padded with <|endoftext|>, not 0 as open_clip's own tokenizer
    assert not torch.equal(ours, open_clip.tokenize(PROMPTS))
