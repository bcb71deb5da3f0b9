"""Alg. 1's parts: the latency lookup table, evolving actions on the spec, weight carry-over, checkpoints."""

import pytest
import torch
from helpers import ROOT, one_line_error, randomize, run_script, tiny_pipeline

from snapfusion_min import read_pipeline
from snapfusion_min.arch import tiny, walk
from snapfusion_min.evolve import Action, EvolveConfig, apply, candidate_actions, choose, evolve_unet, score_actions
from snapfusion_min.latency import LatencyTable, block_keys, measure_table
from snapfusion_min.unet import UNet


@pytest.fixture
def unet():
    return randomize(UNet(tiny(32)), 0).eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 500]), torch.randn(2, 16, 32, generator=g)


def test_lookup_table_is_skeleton_plus_blocks_in_situ(unet, monkeypatch):
    """§2.2's table with the clock replaced by known costs: each block configuration is timed once (blocks of equal
    configuration share an entry), the skeleton excludes the shortcuts of dropped width-changing ResNets, the in-situ
    factor is (whole - skeleton) / sum of blocks alone, and an evolved spec's prediction is skeleton + factor x the
    blocks it keeps -- computed here from the spec's own list of blocks. (Whether per-block costs carry over to a real
    machine's timings is a measurement: bench/latency_table.py.)"""
    cost = {"R": 2e-3, "A": 3e-3}  # seconds a block of each kind takes alone
    keys = block_keys(unet.spec, 16, 2)

    def fake_median_times(fns, warmup=1, repeat=5, device=None):
        out = {name: cost[keys[name][0]] for name in fns if name in keys}
        out |= {name: 1e-4 for name in fns if name.startswith("shortcut ")}
        alone = sum(cost[k[0]] for k in keys.values())
        out["skeleton"] = 5e-3 + sum(v for n, v in out.items() if n.startswith("shortcut "))
        out["whole"] = 5e-3 + 1.25 * alone  # in place, blocks cost 25% more than alone
        assert set(out) == set(fns), set(fns) ^ set(out)
        return out

    monkeypatch.setattr("snapfusion_min.latency.median_times", fake_median_times)
    table = measure_table(unet, latent=16, batch=2, context_len=16)
    assert len(table.ms) == len(set(keys.values())) < len(keys)  # one entry per configuration
    assert table.skeleton_ms == pytest.approx(5.0) and table.in_situ == pytest.approx(1.25)
    many = unet
    for action in ["-down1.A0", "-up3.A0", "-mid.R0", "-down2.R1+up2.R0", "-up1.A2"]:
        many = evolve_unet(many, Action(action[0], tuple(action[1:].split("+"))))
    kept = list(block_keys(many.spec, 16, 2).values())
    assert len(kept) == len(keys) - 6
    expected = 5.0 + 1.25 * sum(1e3 * cost[k[0]] for k in kept)
    assert table.predict(many.spec) == pytest.approx(expected) and table.predict(unet.spec) == pytest.approx(
        5.0 + 1.25 * 1e3 * sum(cost[k[0]] for k in keys.values()))


def test_removing_changes_spec_and_params_not_output_shape(unet):
    z, t, c = inputs()
    n0 = sum(p.numel() for p in unet.parameters())
    actions = candidate_actions(unet.spec, "-")
    assert {str(a) for a in actions} >= {"-down1.A0", "-mid.R0", "-down2.R1+up2.R0", "-up3.A2"}
    for action in actions:
        smaller = evolve_unet(unet, action)
        assert smaller.spec != unet.spec
        assert sum(p.numel() for p in smaller.parameters()) < n0
        assert smaller(z, t, c).shape == (2, 4, 8, 8)
        kept = smaller.state_dict()
        for key, value in unet.state_dict().items():  # every kept block keeps its weights
            if key in kept:
                assert torch.equal(kept[key], value)


@torch.no_grad()
def test_removing_an_attention_block_equals_skipping_it(unet):
    """Deleting an A block (or a mid ResNet) from the spec = running it as the identity (Eq. 5)."""
    z, t, c = inputs()
    for address in ("down2.A1", "mid.A0", "up1.A0", "mid.R1"):
        unet.removed = {address}
        want = unet(z, t, c)
        unet.removed = set()
        torch.testing.assert_close(evolve_unet(unet, Action("-", (address,)))(z, t, c), want, rtol=0, atol=0)


@torch.no_grad()
def test_a_copy_reproduces_its_source(unet):
    z, t, c = inputs()
    width = {f"{b.stage}.{b.name}": b.c_in for b in walk(unet.spec)[0]}
    for address in ("down1.A0", "mid.R0", "up2.A1"):
        bigger = evolve_unet(unet, Action("+", (address,)))
        stage, name = address.split(".")
        new = bigger.spec.stages[stage][bigger.spec.stages[stage].index(name) + 1]
        assert new not in unet.spec.stages[stage]
        x = torch.randn(2, width[address], 4, 4)
        cond = c if name[0] == "A" else torch.randn(2, 4 * 32)  # text for A, time embedding for R
        torch.testing.assert_close(bigger.stages[stage][new](x, cond), unet.stages[stage][name](x, cond),
                                   rtol=0, atol=0)
        assert bigger(z, t, c).shape == (2, 4, 8, 8)


def test_evolved_checkpoint_round_trips(tmp_path, unet):
    evolved = evolve_unet(evolve_unet(unet, Action("-", ("down2.A0",))), Action("+", ("up1.A1",)))
    tiny_pipeline().with_parts(unet=evolved).save(tmp_path / "evolved.safetensors")
    again = read_pipeline(tmp_path / "evolved.safetensors")
    assert again.unet.spec == evolved.spec and "A3" in again.unet.spec.stages["up1"]
    z, t, c = inputs()
    with torch.no_grad():
        torch.testing.assert_close(again.unet(z, t, c), evolved(z, t, c), rtol=0, atol=1e-5)  # memory layout


def test_bad_input(tmp_path, unet):
    with pytest.raises(ValueError, match="unknown block address"):
        apply(unet.spec, Action("-", ("down2.A7",)))
    with pytest.raises(ValueError, match="unknown block address"):
        apply(unet.spec, Action("-", ("side1.R0",)))
    with pytest.raises(ValueError, match="breaks the architecture|shapes"):
        apply(unet.spec, Action("-", ("up3.R0",)))  # an up ResNet alone would leave a skip connection unconsumed
    tiny_pipeline().with_parts(unet=unet).save(tmp_path / "m.safetensors")
    r = run_script("evolve.py", "--checkpoint", str(tmp_path / "m.safetensors"), "--target", "0.01", "--out",
                   str(tmp_path / "e.safetensors"))
    assert one_line_error(r, "below"), r.stderr[-2000:]
    assert not (tmp_path / "e.safetensors").exists()
    for bad in (dict(target=1.5), dict(target=0.0), dict(keep_prob=1.5), dict(threads=0), dict(baseline="best")):
        with pytest.raises(ValueError):
            EvolveConfig(**bad)


def unit_table(spec) -> LatencyTable:
    """A lookup table in which every block configuration of ``spec`` costs 1 ms."""
    return LatencyTable("cpu", 2, 8, "float32", ms={key: 1.0 for key in block_keys(spec, 8, 2).values()})


@torch.no_grad()
def test_alg1_scores_every_action_on_the_network_it_builds(unet):
    """Alg. 1 ranks the network ``apply`` builds: for a down/up ResNet pair that is the U without both blocks and
    without the skip between them, not Eq. 5's identity of both (which keeps the skip and the 1x1 projection)."""
    z, t, c = inputs()
    scored = {}

    def scorer(pipe):  # records the output of every network it is asked to score
        out = pipe.unet(z, t, c)
        scored[pipe.unet.spec.to_json()] = out
        return out.square().mean().item()

    rows = score_actions(tiny_pipeline().with_parts(unet=unet), unit_table(unet.spec), scorer)
    actions = candidate_actions(unet.spec, "-")
    assert sorted(str(r["action"]) for r in rows) == sorted(str(a) for a in actions)
    base = unet(z, t, c).square().mean().item()
    pairs = 0
    for r in rows:
        built = evolve_unet(unet, r["action"])
        torch.testing.assert_close(scored[built.spec.to_json()], built(z, t, c), rtol=0, atol=1e-6)
        assert r["d_clip"] == pytest.approx(base - built(z, t, c).square().mean().item(), rel=1e-6)
        assert r["d_latency_ms"] == len(r["action"].addresses) and r["value"] == r["d_clip"] / r["d_latency_ms"]
        if len(r["action"].addresses) == 2:  # the identity view of a pair is another network
            pairs += 1
            unet.removed = set(r["action"].addresses)
            assert not torch.allclose(unet(z, t, c), built(z, t, c), atol=1e-3)
            unet.removed = set()
    assert pairs >= 2
    assert [r["value"] for r in rows] == sorted(r["value"] for r in rows)


def test_criterion_orders_removals_by_value_or_by_dclip_alone(unet):
    """Alg. 1 ranks by dCLIP / dLatency; the latency-free ablation (alg1_baselines' 'dclip' arm) by dCLIP alone. With
    a score that is a sum over blocks, dCLIP of an action is the sum of its blocks' parts: the orders are known."""
    part = {a: (i * 37 % 11) / 10 for i, a in enumerate(unet.spec.addresses())}

    def scorer(pipe):
        return sum(part[a] for a in pipe.unet.spec.addresses())

    pipe, table = tiny_pipeline().with_parts(unet=unet), unit_table(unet.spec)
    by_value, by_clip = (score_actions(pipe, table, scorer, c) for c in ("value", "d_clip"))
    for rows, key in ((by_value, lambda a: sum(part[x] for x in a.addresses) / len(a.addresses)),
                      (by_clip, lambda a: sum(part[x] for x in a.addresses))):
        assert [r["action"] for r in rows] == sorted((r["action"] for r in rows), key=key)
    assert [r["action"] for r in by_value] != [r["action"] for r in by_clip]
    with pytest.raises(ValueError, match="criterion"):
        EvolveConfig(criterion="params")


def test_copies_are_only_actions_candidate_actions_offers(unet):
    """At or below the target Alg. 1 copies the highest-value blocks, but never a down/up ResNet pair."""
    pair = next(a for a in candidate_actions(unet.spec, "-") if len(a.addresses) == 2)
    single = [a for a in candidate_actions(unet.spec, "-") if len(a.addresses) == 1]
    rows = [{"action": a, "value": float(i)} for i, a in enumerate([*single, pair])]  # the pair is the best
    assert apply(unet.spec, Action("+", pair.addresses))  # a valid spec edit, yet not offered as a copy
    chosen = choose(unet.spec, rows, unit_table(unet.spec), target_ms=1e9, n=3)
    assert [str(a) for a, _ in chosen] == [f"+{a.addresses[0]}" for a in single[::-1][:3]]
    spec = unet.spec
    for action, _ in chosen:
        assert action in candidate_actions(spec, "+")
        spec = apply(spec, action)[0]


def test_the_table_is_timed_in_the_runs_device_and_dtype(tmp_path):
    """evolve.py --dtype times the lookup table in that dtype (the table says so), and a table timed in another
    dtype or device is refused in one line rather than mixed into this run's."""
    from helpers import run_main

    lut = tmp_path / "lut.json"
    common = ("--checkpoint", str(tmp_path / "m.safetensors"), "--table-only", "--table", str(lut), "--device", "cpu")
    tiny_pipeline().save(tmp_path / "m.safetensors")
    assert run_main("evolve.py", *common, "--dtype", "float32") == 0
    assert LatencyTable.load(lut).dtype == "torch.float32" and LatencyTable.load(lut).device == "cpu"
    message = run_main("evolve.py", *common, "--dtype", "bfloat16")  # refused before any timing (slow where emulated)
    assert "on cpu in torch.float32; this run needs batch 2, latent 8 on cpu in torch.bfloat16" in str(message)


@pytest.mark.slow
def test_alg1_on_two_ranks(tmp_path):
    """torchrun, two gloo ranks: robust training and fine-tuning go through the one loop's DDP (the ranks agree after
    each), rank 0 times the table, scores and chooses, and every rank applies its choice; the output holds the logged
    action and the work folder is gone."""
    import json

    out = tmp_path / "e.safetensors"
    r = run_script("evolve.py", "--checkpoint", str(ROOT / "models" / "toy" / "model.safetensors"), "--target",
                   "0.95", "--iterations", "1", "--actions", "1", "--robust-steps", "2", "--finetune-steps", "2",
                   "--batch-size", "4", "--score-prompts", "2", "--num-prompts", "4", "--num-inference-steps", "2",
                   "--device", "cpu", "--dtype", "float32", "--out", str(out), torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("all 2 ranks agree") == 2 and r.stdout.count("lookup table:") == 1
    (action,) = json.loads(out.with_name("e.safetensors.log.json").read_text())["actions"]
    kind, addresses = action["action"][0], action["action"][1:].split("+")
    assert kind == "-" and not set(addresses) & set(read_pipeline(out).unet.spec.addresses())
    assert not out.with_name("e.safetensors.work").exists()
