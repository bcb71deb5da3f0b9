"""Alg. 1 against its baselines (experiments/alg1_baselines.py): its verdicts read from intervals over prompts and
seeds (eval/bootstrap.py, tested in test_bootstrap.py), the page true row by row, and every arm trained for Alg. 1's
whole budget. The arms' runs themselves: test_recipe.py (--quick --arms)."""

import json

import numpy as np
from helpers import tiny_pipeline

from snapfusion_min import evolve
from snapfusion_min.evolve import EvolveConfig, evolve_and_finetune
from snapfusion_min.experiments import alg1_baselines, channel_slimming
from snapfusion_min.experiments.alg1_baselines import ARMS, ArmsConfig, difference, keeps, write_page
from snapfusion_min.latency import LatencyTable, block_keys


def facts_of(clip: dict[str, tuple[list[float], float]]) -> dict:
    """Synthetic facts: name -> (per-seed CLIP, spread of the draws around the mean); FID mirrors CLIP (x -100)."""
    rng, out = np.random.default_rng(0), {}
    noise = rng.standard_normal(200)
    for name, (seeds, spread) in clip.items():
        draws_ = np.concatenate([[np.mean(seeds)], np.mean(seeds) + spread * noise])
        out[name] = {"draws": {"clip": draws_, "fid": -100 * draws_},
                     "seeds": [{"clip": s, "fid": -100 * s} for s in seeds], "ms": [10.0] * len(seeds),
                     "params": [1e6] * len(seeds),
                     "specs": [f"{name}{i}" for i in range(len(seeds))], "copies": [[] for _ in seeds],
                     "starts": ["abc"] * len(seeds)}
    return out


def test_verdicts_come_from_the_interval_alone():
    f = facts_of({"alg1": ([0.90, 0.91, 0.92], 0.001), "far": ([0.80, 0.81, 0.82], 0.001),
                  "noisy": ([0.85, 0.86, 0.87], 0.2), "above": ([0.95, 0.96, 0.97], 0.001)})
    assert difference(f, "alg1", "far", "clip")["verdict"] == "better"
    assert difference(f, "alg1", "far", "fid")["verdict"] == "better"  # FID: lower is better (here -100 x CLIP)
    assert difference(f, "alg1", "above", "clip")["verdict"] == "worse"
    assert difference(f, "alg1", "above", "fid")["verdict"] == "worse"
    d = difference(f, "alg1", "noisy", "clip")  # every seed apart, but the interval holds 0
    assert d["d"][1] < 0 < d["d"][2] and d["verdict"] == "tie"
    f["biased"] = {"draws": {"clip": f["alg1"]["draws"]["clip"], "fid": f["alg1"]["draws"]["fid"].copy()}}
    f["biased"]["draws"]["fid"][0] -= 50  # its estimate below Alg. 1's, every resample far above
    f["biased"]["draws"]["fid"][1:] += 5
    assert difference(f, "alg1", "biased", "fid")["verdict"] == "better"  # not 'worse' from the estimate


def test_keeping_the_teachers_quality_needs_the_interval_within_the_margin():
    f = facts_of({"teacher": ([0.905], 0.0), "alg1": ([0.90, 0.90, 0.90], 0.001), "wide": ([0.90], 0.05)})
    assert keeps(f, "alg1", "teacher", {"clip": 0.01}) == {"clip": True}
    assert difference(f, "wide", "teacher", "clip")["verdict"] == "tie"
    assert keeps(f, "wide", "teacher", {"clip": 0.01}) == {"clip": False}  # a tie alone shows nothing


def test_page_states_each_verdict(tmp_path):
    f = facts_of({"teacher": ([0.95], 0.001), "alg1": ([0.90, 0.91, 0.92], 0.001),
                  "dclip": ([0.90, 0.91, 0.925], 0.02), "random": ([0.80, 0.81, 0.82], 0.001),
                  "slim": ([0.70, 0.71, 0.72], 0.001), "scratch": ([0.20, 0.21, 0.22], 0.001)})
    f["teacher"]["ms"], f["alg1"]["ms"], f["slim"]["ms"] = [20.0], [10.0, 10.0, 10.0], [15.0, 15.0, 14.0]
    f["dclip"]["specs"], f["dclip"]["copies"][2] = ["alg10", "other", "alg12"], ["+up2.A2"]
    log = {"target_ms": 10.0, "target_params": 1e6, "chosen": {"ratio": 0.5, "channels": [16], "measured_ms": 15.0},
           "sweep": [{"ratio": 0.5, "channels": [16], "params": 1e6, "measured_ms": 15.0}]}
    for seed in (0, 1, 2):
        (tmp_path / f"slim{seed}.json").write_text(json.dumps(log))
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
    assert text.startswith("# Is Alg. 1 worth it? Evolving against the baselines\n") and "equal latency" not in text
    assert "Within 10% of Alg. 1's latency (10.0 ms a step): dCLIP alone (no latency term), random removals, Alg. " \
           "1's architecture from scratch; further from it: uniform channel slimming (L1) (14.7 ms)." in text
    assert "teacher, CLIP 0.01 below it, FID 10% above it; a tie alone shows nothing) does not hold here (CLIP: " \
           "not shown, FID: kept)" in text  # FID 4 above the teacher's 95: within 10%
    assert "same blocks as Alg. 1 of the same seed in 2 of 3 seeds; the start" in text
    assert "starts at or below the target): dCLIP alone (no latency term), seed 2: +up2.A2." in text
    assert "| 0.5 | (16,) | 1.00M | 15.0 |" in text and "Chosen in the runs (3 seeds, each against its own " \
        "Alg. 1): 0.5 (16,), the fraction of Alg. 1's parameter count" in text
    assert "no fraction meets Alg. 1's latency" in text and "3.0 min for 2 runs" in text
    assert "UNet checksum abc, the same for every run" in text
    f["random"]["starts"][1] = "abd"  # a run resumed on another machine re-made the robust UNet
    text = "\n".join(write_page(ArmsConfig(), f, {}, 30.0, tmp_path, tmp_path, (0.5, 1.0), log["sweep"]))
    assert "2 makings of it, UNet checksums abc, abd" in text


def test_every_arm_trains_for_alg1s_whole_budget(tmp_path, monkeypatch):
    """Alg. 1 that stops after its second evolving step trains 2 x robust_steps + finetune_steps, not the nominal
    iterations x robust_steps + finetune_steps; its log says so, and every other arm given that budget trains exactly
    as many steps in all. (Training is replaced by a copy that counts its steps.)"""
    trained = []

    def fake_train(path, out, steps, keep_prob, cfg, figures=False, where=None):
        trained.append(steps)
        pipe = evolve.Place().load(path)
        pipe.save(out)
        return pipe

    monkeypatch.setattr(evolve, "train", fake_train)
    monkeypatch.setattr(alg1_baselines, "train", fake_train)
    for module in (evolve, alg1_baselines, channel_slimming):  # latency is not what this test is about
        monkeypatch.setattr(module, "measure_unet", lambda *a, **k: 1.0)
    real_sweep = channel_slimming.slim_sweep  # one width is enough here
    monkeypatch.setattr(alg1_baselines, "slim_sweep", lambda *a, **k: real_sweep(*a, **k, ratios=(0.5,)))
    real_choose, calls = evolve.choose, []

    def choose_once(*args):  # the second evolving step finds nothing left to do: Alg. 1 stops early
        calls.append(1)
        return real_choose(*args) if len(calls) == 1 else []

    monkeypatch.setattr(evolve, "choose", choose_once)
    start = tmp_path / "robust.safetensors"
    pipe = tiny_pipeline()
    pipe.save(start)
    table = LatencyTable("cpu", 2, 8, "float32", ms={key: 1.0 for key in block_keys(pipe.unet.spec, 8, 2).values()})
    cfg = EvolveConfig(target=0.8, iterations=3, actions=20, robust_steps=5, finetune_steps=7)
    log = evolve_and_finetune(str(start), table, cfg, lambda p: 0.0, None, str(tmp_path / "alg10.safetensors"))
    assert trained == [5, 5, 7] and log["train_steps"] == 17  # 2 of 3 robust rounds, then fine-tuning
    alg1 = alg1_baselines.record(log, tmp_path / "alg10.safetensors", start)
    for arm in ("random", "scratch", "dclip", "slim"):
        trained.clear()
        out = alg1_baselines.run_arm(arm, 0, str(start), json.loads(json.dumps(alg1)), table, cfg, lambda p: 0.0,
                                     str(tmp_path / f"{arm}0.safetensors"))
        assert sum(trained) == 17 and out["train_steps"] == 17, (arm, trained)
