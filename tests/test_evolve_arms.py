"""Alg. 1 against its baselines (experiments/alg1_baselines.py): the bootstrap over prompts and its verdicts, against
brute force and hand-made cases; the page says each verdict. The arms' runs themselves: test_recipe.py (--quick
--arms)."""

import json

import numpy as np
import pytest
import torch

from snapfusion_min.eval.metrics import fid
from snapfusion_min.experiments.alg1_baselines import (
    ARMS,
    ArmsConfig,
    apart,
    difference,
    draws,
    interval,
    metric,
    write_page,
)


def judged(seed: int, n: int = 40, shift: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"cos": 0.8 + shift + 0.05 * torch.randn(n, generator=g), "features": torch.randn(n, 6, generator=g) + shift}


def test_draws_start_with_every_prompt_once_and_repeat():
    d = draws(40, 100)
    assert d.shape == (101, 40) and d[0].tolist() == list(range(40))
    assert d.min() >= 0 and d.max() < 40 and torch.equal(d, draws(40, 100))
    assert len(set(d[1].tolist())) < 40  # with replacement


def test_metric_is_the_seed_mean_of_clip_and_fid_on_each_draw():
    seeds, real = [judged(1), judged(2)], torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
    index = draws(40, 5)
    m = metric(seeds, real, index)
    for row, i in enumerate(index):
        assert m["clip"][row] == pytest.approx(np.mean([s["cos"][i].mean().item() for s in seeds]), rel=1e-6)
        assert m["fid"][row] == pytest.approx(np.mean([fid(s["features"][i], real[i]) for s in seeds]), rel=1e-9)


def test_interval_is_the_middle_95_percent_of_the_draws():
    values = np.concatenate([[0.5], np.linspace(0, 1, 1001)])
    est, lo, hi = interval(values)
    assert (est, lo, hi) == pytest.approx((0.5, 0.025, 0.975))


def facts_of(clip: dict[str, tuple[list[float], float]]) -> dict:
    """Synthetic facts: name -> (per-seed CLIP, spread of the draws around the mean); FID mirrors CLIP (x -100)."""
    rng, out = np.random.default_rng(0), {}
    noise = rng.standard_normal(200)
    for name, (seeds, spread) in clip.items():
        draws_ = np.concatenate([[np.mean(seeds)], np.mean(seeds) + spread * noise])
        out[name] = {"draws": {"clip": draws_, "fid": -100 * draws_},
                     "seeds": [{"clip": [s], "fid": [-100 * s]} for s in seeds], "ms": [10.0] * len(seeds),
                     "params": [1e6] * len(seeds),
                     "specs": [f"{name}{i}" for i in range(len(seeds))], "copies": [[] for _ in seeds]}
    return out


def test_verdicts_need_the_interval_and_every_seed():
    f = facts_of({"alg1": ([0.90, 0.91, 0.92], 0.001), "far": ([0.80, 0.81, 0.82], 0.001),
                  "overlap": ([0.85, 0.86, 0.93], 0.001), "noisy": ([0.85, 0.86, 0.87], 0.2),
                  "above": ([0.95, 0.96, 0.97], 0.001)})
    assert difference(f, "alg1", "far", "clip")["verdict"] == "better"
    assert difference(f, "alg1", "far", "fid")["verdict"] == "better"  # FID: lower is better (here -100 x CLIP)
    assert difference(f, "alg1", "above", "clip")["verdict"] == "worse"
    assert difference(f, "alg1", "above", "fid")["verdict"] == "worse"
    d = difference(f, "alg1", "overlap", "clip")  # the interval excludes 0, one seed of the other beats Alg. 1's
    assert d["d"][1] > 0 and not d["apart"] and d["verdict"] == "tie"
    d = difference(f, "alg1", "noisy", "clip")  # every seed apart, but the interval holds 0
    assert d["apart"] and d["d"][1] < 0 < d["d"][2] and d["verdict"] == "tie"
    assert apart([1, 2], [3, 4]) and apart([3, 4], [1, 2]) and not apart([1, 3], [2, 4])


def test_page_states_each_verdict(tmp_path):
    f = facts_of({"teacher": ([0.95], 0.001), "alg1": ([0.90, 0.91, 0.92], 0.001),
                  "dclip": ([0.90, 0.91, 0.925], 0.001), "random": ([0.80, 0.81, 0.82], 0.001),
                  "slim": ([0.70, 0.71, 0.72], 0.001), "scratch": ([0.20, 0.21, 0.22], 0.001)})
    f["teacher"]["ms"], f["alg1"]["ms"] = [20.0], [10.0, 10.0, 10.0]
    f["dclip"]["specs"], f["dclip"]["copies"][2] = ["alg10", "other", "alg12"], ["+up2.A2"]
    log = {"target_ms": 10.0, "target_params": 1e6, "chosen": {"ratio": 0.5, "channels": [16], "measured_ms": 15.0},
           "sweep": [{"ratio": 0.5, "channels": [16], "params": 1e6, "measured_ms": 15.0}]}
    for seed in (0, 1, 2):
        (tmp_path / f"slim{seed}.safetensors.log.json").write_text(json.dumps(log))
    lines = write_page(ArmsConfig(), f, {"alg11": 60.0, "random0": 120.0}, 30.0, tmp_path, tmp_path, (0.5, 1.0),
                       log["sweep"])
    text = (tmp_path / "evolving.md").read_text()
    assert text == "\n".join(lines) + "\n" and (tmp_path / "fig_evolving.png").stat().st_size > 1000
    for label in ARMS.values():
        assert f"| {label} |" in text
    assert "beats in CLIP score: random removals, uniform channel slimming (L1), Alg. 1's architecture from " \
           "scratch;" in text
    assert "It ties in CLIP score: dCLIP alone (no latency term);" in text
    assert "at 2.0x lower latency, Alg. 1 is worse in CLIP score and worse in FID" in text
    assert "\"as good as the original\" does not hold here" in text
    assert "same blocks as Alg. 1 of the same seed in 2 of 3 seeds; the start" in text
    assert "starts at or below the target): dCLIP alone (no latency term), seed 2: +up2.A2." in text
    assert "| 0.5 | (16,) | 1.00M | 15.0 |" in text and "Chosen in the runs (3 seeds, each against its own " \
        "Alg. 1): 0.5 (16,), the fraction of Alg. 1's parameter count" in text
    assert "no fraction meets Alg. 1's latency" in text and "3.0 min for 2 runs" in text
