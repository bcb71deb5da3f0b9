"""Training data at web scale (§5 trains on LAION/COYO-scale image-text pairs): WebDataset tar shards, streamed.

A shard is a tar file in the layout img2dataset writes: the files of one sample share a key (``000123.jpg`` with
``000123.txt`` and/or ``000123.json`` holding a "caption"). ``--data`` names a folder of ``*.tar``, one shard, a glob
(``shards/*.tar``) or a brace range (``shards/{00000..00999}.tar``).

The order is a pure function of (seed, step, rank), so resuming at a step is exact and any data-loader worker can make
any step:
  * rank r's stream: epoch by epoch, the shards in a permutation seeded by (seed, epoch), every world-th one from r;
    inside a shard, its samples in a permutation seeded by (seed, epoch, shard);
  * the batch of step s on rank r: positions [s m, (s + 1) m) of that stream, m being the rank's share of the batch;
  * with W data-loader workers, worker w makes steps w, w + W, ... (they only decode in parallel; same batches).
A shard is read with the standard library's ``tarfile``, which seeks to a sample's bytes: skipping to a step reads
only tar headers. (The webdataset package streams every shard from its start, which resuming deep into an epoch would
have to read through; its files are what this reads.) A sample that cannot be used -- no image, no caption, an image
that does not decode -- is skipped and counted; the next usable sample of the stream takes its place.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import sys
import tarfile
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError
from tqdm import tqdm

from .checkpoint import regular_file
from .images import IMAGE_SUFFIXES, TooManyPixels, center_crop, open_image, to_rgb, to_tensor

Member = tuple[int, int]  # (offset of the data in the tar, size)
Sample = tuple[str, Member | None, Member | None, str]  # key, image, caption, caption kind ('txt' / 'json')


MAX_SHARDS = 100_000  # a brace range naming more is refused before any name is made


def shard_paths(source: str) -> list[Path]:
    """The shards ``source`` names: a folder of .tar files, a .tar, a glob, or a brace range {000..099}. Each must be
    a regular file: a FIFO or a device (a link to /dev/zero) would block or never end."""
    path = Path(source)
    if path.is_dir():
        paths = sorted(path.glob("*.tar"))
    else:
        m = re.search(r"\{(\d+)\.\.(\d+)\}", source)
        if m:
            first, last = int(m[1]), int(m[2])
            if last - first + 1 > MAX_SHARDS:
                raise ValueError(f"{source} names {last - first + 1:,} shards; at most {MAX_SHARDS:,}")
            head, tail, width = source[:m.start()], source[m.end():], len(m[1])
            names = [f"{head}{i:0{width}d}{tail}" for i in range(first, last + 1)]
        else:
            names = sorted(glob.glob(source))
        paths = [Path(n) for n in names]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"no such shard: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                     if len(missing) > 1 else ""))
    for p in paths:
        regular_file(p, "shard")
    if not paths:
        raise FileNotFoundError(f"no .tar shards in {source}")
    return paths


def is_shards(source: str) -> bool:
    """Does ``--data`` name WebDataset shards (rather than 'toy' or a folder of image files)?"""
    path = Path(source)
    if path.is_dir():
        tars, images = any(path.glob("*.tar")), any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())
        if tars and images:
            raise ValueError(f"{source} holds both WebDataset shards (.tar) and images: give the shards as a glob "
                             f"({Path(source) / '*.tar'}) or the images in a folder of their own")
        return tars
    return source.endswith(".tar") or "{" in source or any(c in source for c in "*?[")


COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}  # magic


def index_shard(path: Path) -> tuple[list[Sample], str]:
    """The samples of one shard, in tar order, from its headers only; and what went wrong reading it ('' if nothing):
    a truncated or corrupt shard keeps the samples before the damage."""
    samples: dict[str, list] = {}
    problem, size = "", path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if info.offset_data + info.size > size:
                    problem = f"truncated: {info.name} ends past the file's {size} bytes"
                if not info.isfile():
                    continue
                folder, _, base = info.name.rpartition("/")
                stem, _, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                entry = samples.setdefault(key, [key, None, None, ""])
                ext = ext.lower()
                if "." + ext in IMAGE_SUFFIXES and entry[1] is None:
                    entry[1] = (info.offset_data, info.size)
                elif ext == "txt" or (ext == "json" and entry[3] != "txt"):
                    entry[2], entry[3] = (info.offset_data, info.size), ext
            if not problem and _data_after(path, tar.offset):  # tarfile stops at a garbled header, silently
                problem = f"damaged: unreadable tar header at byte {tar.offset} of {size}"
            if not problem and samples and size - tar.offset < 1024:  # cut between members: no end-of-archive blocks
                problem = f"truncated: ends after {len(samples)} samples without the tar's end-of-archive blocks"
    except (tarfile.TarError, OSError) as e:
        with open(path, "rb") as f:
            head = f.read(6)
        kind = next((k for magic, k in COMPRESSED.items() if head.startswith(magic)), None)
        problem = (f"{kind}-compressed, not a tar (decompress it first)" if kind and not samples
                   else f"{'damaged: ' if samples else ''}unreadable tar after {len(samples)} samples ({e})")
    return [tuple(s) for s in samples.values()], problem  # type: ignore[misc]


def _data_after(path: Path, offset: int) -> bool:
    """Is there more than the end-of-archive zeros (and the record's zero padding) after ``offset``?"""
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            if chunk.strip(b"\0"):
                return True
    return False


class Shards:
    """A map from (step, rank) to a batch of WebDataset samples; see the module docstring for the order."""

    def __init__(self, source: str, resolution: int, workers: int = 0):
        self.paths, self.resolution, self.workers = shard_paths(source), resolution, workers
        self.skipped: dict[str, str] = {}  # 'shard:key' -> why (the bad samples met so far)
        self._index: dict[int, list[Sample]] = {}
        self._damaged: dict[str, str] = {}  # shard -> what is wrong with it (it keeps the samples before that)
        self._files: dict[int, io.BufferedReader] = {}
        self._pid = os.getpid()
        self._loader: Iterator | None = None
        self._next = -1

    def __len__(self) -> int:
        raise TypeError("a stream of shards has no length here: it is read by step (Shards.batch)")

    def __getstate__(self) -> dict:  # what a data-loader worker gets: no open files, no loader of its own
        return {**self.__dict__, "_files": {}, "_loader": None}

    # ---- the order ---------------------------------------------------------------------------------------------
    def samples(self, shard: int) -> list[Sample]:
        if shard not in self._index:
            self._index[shard], problem = index_shard(self.paths[shard])
            if problem:  # counted like a bad sample: the run goes on with what the shard holds
                self._damaged[self.paths[shard].name] = problem
        return self._index[shard]

    def _note(self, skipped: dict[str, str]) -> None:
        for name, why in skipped.items():
            if name not in self.skipped and len(self.skipped) < 10:
                tqdm.write(f"warning: skipped {name}: {why}", file=sys.stderr)  # on its own line, not in the bar
            self.skipped[name] = why

    def rank_shards(self, epoch: int, rank: int, world: int, seed: int) -> list[int]:
        if len(self.paths) < world:
            raise ValueError(f"{len(self.paths)} shards for {world} ranks: each rank needs at least one shard")
        return [int(j) for j in np.random.default_rng([seed, epoch]).permutation(len(self.paths))[rank::world]]

    def stream(self, start: int, rank: int, world: int, seed: int) -> Iterator[tuple[int, int]]:
        """(shard, sample index) from position ``start`` of rank ``rank``'s stream on, forever."""
        skip = start
        for epoch in count():
            shards = self.rank_shards(epoch, rank, world, seed)
            length = sum(len(self.samples(j)) for j in shards)
            if length == 0:
                why = [f"{self.paths[j].name}: {self._damaged.get(self.paths[j].name, 'an empty tar')}"
                       for j in shards[:3]]
                raise ValueError(f"the shards of rank {rank} hold no samples (epoch {epoch}): {'; '.join(why)}"
                                 + (f"; and {len(shards) - 3} more" if len(shards) > 3 else ""))
            if skip >= length:  # a whole epoch before the start
                skip -= length
                continue
            for j in shards:
                n = len(self.samples(j))
                if skip >= n:
                    skip -= n
                    continue
                order = np.random.default_rng([seed, epoch, j]).permutation(n)
                for k in order[skip:]:
                    yield j, int(k)
                skip = 0

    # ---- reading -----------------------------------------------------------------------------------------------
    def _read(self, shard: int, member: Member) -> bytes:
        if self._pid != os.getpid():  # a data-loader worker: its own file handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard) or self._files.setdefault(shard, open(self.paths[shard], "rb"))
        f.seek(member[0])
        return f.read(member[1])

    def load(self, shard: int, k: int) -> tuple[torch.Tensor, str] | str:
        """Sample k of a shard as (image [3, H, W] in [-1, 1], caption), or why it cannot be used."""
        key, image, caption, kind = self.samples(shard)[k]
        if image is None or caption is None:
            return "no image" if image is None else "no caption"
        try:
            text = self._read(shard, caption).decode("utf-8")
            text = json.loads(text).get("caption", "") if kind == "json" else text
            if not isinstance(text, str) or not text.strip():
                return "empty caption"
            with open_image(io.BytesIO(self._read(shard, image))) as im:
                return to_tensor(center_crop(to_rgb(im), self.resolution)), " ".join(text.split())
        except TooManyPixels as e:
            return f"unreadable ({e})"
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, AttributeError) as e:
            return f"unreadable ({type(e).__name__})"

    def window(self, step: int, m: int, rank: int, world: int, seed: int) -> tuple[torch.Tensor, list[str], dict]:
        """The batch of ``step`` on ``rank``: m usable samples from stream position step * m on, and the skipped."""
        items, skipped, misses = [], {}, 0
        for j, k in self.stream(step * m, rank, world, seed):
            got = self.load(j, k)
            if isinstance(got, str):
                skipped[f"{self.paths[j].name}:{self.samples(j)[k][0]}"] = got
                misses += 1  # the stream repeats its epochs: count tries, not distinct samples
                if misses > 1000 + 10 * m:
                    raise ValueError(f"rank {rank}: {misses} unusable samples in a row, {len(skipped)} distinct "
                                     f"(e.g. {next(iter(skipped.items()))})")
                continue
            misses = 0
            items.append(got)
            if len(items) == m:
                return torch.stack([x for x, _ in items]), [c for _, c in items], {**self._damaged, **skipped}
        raise AssertionError("unreachable: the stream is endless")

    def batch(self, step: int, size: int, rank: int, world: int, seed: int) -> tuple[torch.Tensor, list[str]]:
        """This rank's share of the global batch of ``step`` (``training.batch_at`` calls this)."""
        m = len(range(rank, size, world))
        if not self.workers:
            x, captions, skipped = self.window(step, m, rank, world, seed)
        else:
            if self._loader is None or step != self._next:  # start (or restart) the workers at this step
                self._loader = None
                steps = _Steps(self, step, m, rank, world, seed)
                loader = torch.utils.data.DataLoader(steps, batch_size=None, num_workers=self.workers,
                                                     generator=torch.Generator())  # not the training's RNG
                self._loader = iter(loader)
            s, x, captions, skipped = next(self._loader)
            assert s == step, (s, step)
        self._next = step + 1
        self._note(skipped)
        return x, captions

    def captions(self, n: int, seed: int) -> list[str]:
        """The first n captions of rank 0's stream (images not decoded): prompts for synthetic data."""
        out = []
        for i, (j, k) in enumerate(self.stream(0, 0, 1, seed)):
            if i > 100 * n + 10_000 and not out:
                raise ValueError(f"no usable caption in the first {i} samples of {self.paths[0].parent}")
            key, image, caption, kind = self.samples(j)[k]
            if caption is not None and image is not None:
                text = self._read(j, caption).decode("utf-8", "replace")
                try:
                    text = json.loads(text).get("caption", "") if kind == "json" else text
                except (ValueError, AttributeError):
                    continue
                if isinstance(text, str) and text.strip():
                    out.append(" ".join(text.split()))
                    if len(out) == n:
                        return out


class _Steps(torch.utils.data.IterableDataset):
    """Steps start, start + 1, ...: worker w of W makes start + w, start + w + W, ... (the loader interleaves them
    back in order)."""

    def __init__(self, shards: Shards, start: int, m: int, rank: int, world: int, seed: int):
        super().__init__()
        self.shards, self.start, self.m, self.rank, self.world, self.seed = shards, start, m, rank, world, seed

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, list[str], dict]]:
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        for step in count(self.start + w, n):
            yield (step, *self.shards.window(step, self.m, self.rank, self.world, self.seed))
