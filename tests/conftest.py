"""Test set-up: diffusers and transformers serve as reference oracles only, offline, built from configs.

Helpers live in ``helpers.py``; ``-m "not slow"`` (make test-fast) leaves out the full-size and end-to-end tests.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a model hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
