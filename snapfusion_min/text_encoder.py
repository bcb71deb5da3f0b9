"""The frozen text encoder c = E(prompt) (paper §2.1, App. B.1): CLIP's text transformer on open_clip's text tower.

SD-v1.5 conditions on the *last hidden state* of CLIP ViT-L/14's text transformer after its final layer norm
(all 77 positions, not the pooled embedding). The same class serves the toy world with a tiny CLIP.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode, default_bpe
from open_clip.transformer import QuickGELU, TextTransformer
from torch import nn

SOT, EOT = 49406, 49407  # <|startoftext|>, <|endoftext|> in CLIP's BPE vocabulary


@dataclass(frozen=True)
class TextConfig:
    width: int = 768  # CLIP ViT-L/14 text transformer
    layers: int = 12
    heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    quick_gelu: bool = True  # OpenAI CLIP's activation, x * sigmoid(1.702 x)


@functools.lru_cache
def bpe(context_length: int) -> SimpleTokenizer:
    """open_clip's BPE tokenizer (its vocabulary ships inside open_clip), built once: reading the vocabulary takes a
    tenth of a second, and every pipeline and judge needs one."""
    return SimpleTokenizer(context_length=context_length)


class Tokenizer:
    """Prompts -> [B, 77] token ids exactly as SD-v1.5's CLIPTokenizer: SOT, BPE, EOT, truncated, padded with EOT.

    open_clip's own tokenizer pads with 0 ('!'); SD pads with <|endoftext|> = 49407, and since every position feeds
    cross-attention, the padding changes images.
    """

    def __init__(self, context_length: int = 77):
        self.context_length = context_length
        self.bpe = bpe(context_length)

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = self.context_length
        rows = []
        for prompt in prompts:
            ids = [SOT] + self.bpe.encode(prompt)[: n - 2] + [EOT]
            rows.append(ids + [EOT] * (n - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


def write_bpe_files(folder: str | Path) -> None:
    """CLIP's BPE vocabulary as transformers' CLIPTokenizer reads it (``vocab.json``, ``merges.txt``), rebuilt from
    the file open_clip ships: 256 byte symbols, the same with ``</w>``, one symbol per merge, then SOT and EOT."""
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert vocab.index("<|startoftext|>") == SOT and len(vocab) == EOT + 1
    Path(folder, "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


class TextEncoder(nn.Module):
    """Token ids [B, L] -> last hidden state [B, L, width] (transformers' ``CLIPTextModel(...).last_hidden_state``)."""

    def __init__(self, cfg: TextConfig | None = None):
        super().__init__()
        self.cfg = cfg or TextConfig()
        self.tower = TextTransformer(
            context_length=self.cfg.context_length, vocab_size=self.cfg.vocab_size, width=self.cfg.width,
            heads=self.cfg.heads, layers=self.cfg.layers, output_dim=None, proj_type="none",
            act_layer=QuickGELU if self.cfg.quick_gelu else nn.GELU,
        )
        self.tower.attn_mask = None  # built in forward instead, so the model can be created on the meta device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        n = tokens.shape[1]
        x = tower.token_embedding(tokens) + tower.positional_embedding[:n]
        # CLIP's text is causal: -inf above the diagonal. Written as a select, not full(-inf).triu(1): coremltools
        # folds triu by multiplying with a 0/1 mask, and -inf * 0 = NaN stored every entry of a Core ML mask as NaN.
        above = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        causal = torch.zeros(n, n, device=x.device, dtype=x.dtype).masked_fill(above, float("-inf"))
        x = tower.transformer(x, attn_mask=causal)
        return tower.ln_final(x)
