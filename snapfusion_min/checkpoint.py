"""Reading weight files safely, and the project's own checkpoint: one .safetensors file whose metadata carries
the architecture spec, the prediction type and the other configs (JSON), written atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .weights import CheckpointError

META_KEY = "snapfusion_min"  # safetensors metadata entry that marks (and describes) our own checkpoints
FORMAT_VERSION = 1


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a pickled .ckpt/.pt/.bin read with ``weights_only=True``.

    Never unpickles arbitrary objects: a pickle that carries code is refused. A Lightning-style ``{"state_dict": ...}``
    wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are not the user's business
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"Unsupported (global|operand)[^.\n]*", str(e))
        raise CheckpointError(f"{path}: refused to unpickle, the file holds more than tensors"
                              f"{f' ({what[0]})' if what else ''}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return obj


def read_meta(path: str | Path) -> dict | None:
    """Our config dict if ``path`` is one of our checkpoints, else None (also None for non-safetensors files)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None
    return json.loads(meta[META_KEY]) if META_KEY in meta else None


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; a checkpoint should read like any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module], config: dict) -> None:
    """Save ``{"unet": ..., "vae": ..., "text_encoder": ...}`` (any subset) with ``config`` as JSON metadata."""
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    meta = {META_KEY: json.dumps({"format_version": FORMAT_VERSION, **config})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def config_dict(cfg: object) -> dict:
    """A stage config as JSON-ready data with the name of its class: what a checkpoint records of its training."""
    return {"stage": type(cfg).__name__, **dataclasses.asdict(cfg)}  # type: ignore[call-overload]
