"""Data parallelism on two gloo ranks, in processes this test spawns: bucketed gradient averaging, and the decoder
stage's synthetic latents made once, split across the ranks (torchrun runs of whole commands: test_shards.py,
test_evolve.py)."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import ROOT

from snapfusion_min import training
from snapfusion_min.arch import tiny
from snapfusion_min.decoder_distill import DecoderConfig, synthetic_latents
from snapfusion_min.pipeline import read_pipeline
from snapfusion_min.training import Dist, average_gradients, buckets
from snapfusion_min.unet import UNet

TOY = ROOT / "models" / "toy" / "model.safetensors"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    """Both jobs below, run once on two spawned gloo ranks (one start-up for the module); the folder they wrote."""
    folder = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank, args=(str(folder),), nprocs=2, join=True)
    return folder


def _rank(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        _average_job(rank, Path(folder))
        _latents_job(rank, Path(folder))
    finally:
        dist.destroy_process_group()


def fake_gradients(model: torch.nn.Module, rank: int) -> None:
    """Rank r's gradient of parameter i: (i + 1) * (r + 1) * ones, but parameter 3 has none on rank 1 (its block was
    dropped by Eq. 5 there)."""
    for i, p in enumerate(model.parameters()):
        p.grad = None if (i == 3 and rank == 1) else torch.full_like(p, (i + 1) * (rank + 1.0))


def _average_job(rank: int, folder: Path) -> None:
    model, calls = UNet(tiny()), []
    fake_gradients(model, rank)
    reduce = dist.all_reduce
    dist.all_reduce = lambda t, **kw: (calls.append(t.numel()), reduce(t, **kw))[1]
    training.BUCKET_BYTES = 64 * 2**10  # many buckets at the tiny UNet's size
    try:
        average_gradients(model, Dist(rank, 2))
    finally:
        dist.all_reduce = reduce
    if rank == 0:
        got = [p.grad.flatten()[[0, -1]].tolist() for p in model.parameters()]
        (folder / "average.json").write_text(json.dumps({"grads": got, "calls": calls}))


def test_bucketed_average_is_the_mean_over_ranks(ranks):
    """average_gradients all-reduces ~BUCKET_BYTES at a time -- fewer calls than parameters, covering every element
    once -- and leaves each gradient the mean over ranks: (i + 1) * 1.5, and for the parameter one rank dropped
    (counted as zero there) 4 / 2."""
    out = json.loads((ranks / "average.json").read_text())
    params = list(UNet(tiny()).parameters())
    want = [2.0 if i == 3 else (i + 1) * 1.5 for i in range(len(params))]
    assert [g for g, _ in out["grads"]] == want and [g for _, g in out["grads"]] == want
    assert out["calls"] == [sum(p.numel() for p in run) for run in buckets(params, 64 * 2**10)]
    assert 1 < len(out["calls"]) < len(params) and sum(out["calls"]) == sum(p.numel() for p in params)


def _latents_job(rank: int, folder: Path) -> None:
    pipe, made = read_pipeline(TOY), []
    denoise = pipe.denoise
    pipe.denoise = lambda z, *a, **kw: (made.append(len(z)), denoise(z, *a, **kw))[1]
    cfg = DecoderConfig(latents=130, teacher_steps=2, latent_cache=str(folder / f"cache{rank}.pt"))
    latents = synthetic_latents(pipe, str(TOY), cfg, str(folder / "unused"), Dist(rank, 2))
    torch.save({"latents": latents, "made": made}, folder / f"rank{rank}.pt")


def test_synthetic_latents_split_over_ranks_equal_one_process(ranks, tmp_path):
    """The decoder stage's synthetic latents on two ranks: each makes its share of the chunks (64, 64 and 2 latents:
    rank 0 the first and third, rank 1 the second), and both end with the latents one process makes, bit for bit."""
    made = [torch.load(ranks / f"rank{r}.pt") for r in (0, 1)]
    assert made[0]["made"] == [64, 2] and made[1]["made"] == [64]
    cfg = DecoderConfig(latents=130, teacher_steps=2, latent_cache=str(tmp_path / "alone.pt"))
    alone = synthetic_latents(read_pipeline(TOY), str(TOY), cfg, str(tmp_path / "unused"), Dist())
    assert torch.equal(made[0]["latents"], alone) and torch.equal(made[1]["latents"], alone)
