"""Reading weight files safely, and the project's own checkpoint: one .safetensors file whose metadata carries
the architecture spec, the prediction type and the other configs (JSON), written atomically."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import pickle
import re
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .weights import CheckpointError

META_KEY = "snapfusion_min"  # safetensors metadata entry that marks (and describes) our own checkpoints
FORMAT_VERSION = 1


def regular_file(path: str | Path, what: str) -> Path:
    """``path`` if it is a regular file; else FileNotFoundError ('no such <what>') or, for a folder, FIFO or device
    (which would block or never end when read), a ValueError -- before anything opens it."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file (a folder, FIFO or device)")
    if not path.is_file():
        raise FileNotFoundError(f"no such {what}: {path}")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a pickled .ckpt/.pt/.bin read with ``weights_only=True``.

    Never unpickles arbitrary objects: a pickle that carries code is refused. A Lightning-style ``{"state_dict": ...}``
    wrapper is unwrapped.
    """
    path = regular_file(path, "checkpoint file")
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
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] != b"\x80" and head != b"PK":  # neither a pickle (protocol >= 2) nor torch's zip: not refused
            raise CheckpointError(f"{path}: truncated or corrupt checkpoint (not a pickle of tensors)") from None
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


def positive_number(path: str | Path, name: str, value: object) -> float:
    """A metadata number that must be finite and positive (a latent scale); anything else names the file."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{path}: its {name} {json.dumps(value)} is not a positive number")
    return float(value)


def umask() -> int:
    """This process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def full_disk_said(folder: Path, name: str) -> Iterator[None]:
    """A write into ``folder`` that fails for want of space -- ENOSPC, or torch.save's 'unexpected pos' and
    safetensors' error with the disk nearly full -- becomes one OSError saying so; other errors pass unchanged."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        if getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(folder).free < 1 << 20:
            raise OSError(errno.ENOSPC, f"no space left on the device of {folder} to write {name}; the file there "
                                        "is as it was") from None
        raise


@contextmanager
def _written_temp(folder: Path, name: str, write: Callable[[str], None]) -> Iterator[str]:
    """A temporary file beside the target, filled by ``write``, with a new file's usual mode (mkstemp makes 0600);
    removed at the end unless it was renamed or linked into place."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        with full_disk_said(folder, name):
            write(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves a half-written file behind."""
    path = Path(path)
    with _written_temp(path.parent, path.name, write) as tmp:
        os.replace(tmp, path)


def atomic_create(folder: str | Path, stem: str, suffix: str, write: Callable[[str], None]) -> Path:
    """Like ``atomic_write``, but never replaces a file: the first free name of <stem><suffix>, <stem>-2<suffix>, ...
    is taken with an atomic hard link, so runs writing into one folder at once lose nothing."""
    with _written_temp(Path(folder), stem + suffix, write) as tmp:
        for k in range(1, 10**6):
            path = Path(folder) / f"{stem}{'' if k == 1 else f'-{k}'}{suffix}"
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
    raise FileExistsError(f"{folder}: no free name for {stem}{suffix}")


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temporary files an interrupted ``atomic_write`` of ``path`` left behind; returns them."""
    path = Path(path)
    stale = list(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextmanager
def contiguous_layout(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Parameters in the plain (row-major) layout safetensors writes, converted one at a time and back afterwards:
    a channels-last UNet is saved without a second copy of its conv weights (2 GB at SD-v1.5's size)."""
    changed = []
    for m in modules:
        for p in m.parameters():
            if p.device.type == "cpu" and not p.data.is_contiguous():
                fmt = torch.channels_last if p.data.is_contiguous(memory_format=torch.channels_last) else None
                p.data = p.data.contiguous()
                changed.append((p, fmt))
    try:
        yield
    finally:
        for p, fmt in changed:
            p.data = p.data.contiguous(memory_format=fmt) if fmt else p.data


def save_checkpoint(path: str | Path, modules: dict[str, torch.nn.Module], config: dict) -> None:
    """Save ``{"unet": ..., "vae": ..., "text_encoder": ...}`` (any subset) with ``config`` as JSON metadata."""
    meta = {META_KEY: json.dumps({"format_version": FORMAT_VERSION, **config})}
    with contiguous_layout(list(modules.values())):
        tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items()
                   for k, v in m.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def config_dict(cfg: object) -> dict:
    """A stage config as JSON-ready data with the name of its class: what a checkpoint records of its training."""
    return {"stage": type(cfg).__name__, **dataclasses.asdict(cfg)}  # type: ignore[call-overload]


def _running(holder: list[str]) -> bool:
    """Whether the process named by a lock's 'host pid' still runs (on another host: assumed so)."""
    if len(holder) != 2 or not holder[1].isdigit():
        return False  # not a lock we wrote: a half-written one
    if holder[0] != socket.gethostname():
        return True
    try:
        os.kill(int(holder[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextmanager
def writer_lock(out: str | Path) -> Iterator[None]:
    """One writer per output: ``<out>.lock`` created exclusively, holding this process's host and pid, removed on
    exit. A lock whose process is gone (a crash, a kill) is taken over; a live one is a ValueError naming it."""
    lock, me = Path(f"{out}.lock"), f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            fd = None
        if fd is None:
            try:
                holder = lock.read_text(errors="replace").split()
            except FileNotFoundError:  # its run just finished
                continue
            if _running(holder):
                raise ValueError(f"{out} is being written by another run (pid {holder[1]} on {holder[0]}, {lock}); "
                                 f"wait for it, or write to another --out (remove {lock} if that run is gone)")
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise ValueError(f"cannot take {lock}: another run keeps taking it")
    try:
        yield
    finally:
        if lock.is_file() and lock.read_text(errors="replace") == me:
            lock.unlink()
