"""Evolve a robust-trained UNet to a latency target (§3.1, Alg. 1) and compare it with a baseline.

    python evolve.py --checkpoint robust.safetensors --target 0.6 --out evolved.safetensors
    python evolve.py --checkpoint robust.safetensors --table-only --table lut.json --figure fig2.png   # §2.2, Fig. 2
    python evolve.py --checkpoint robust.safetensors --target 0.6 --baseline random --out random.safetensors

Alg. 1: alternate robust training (train.py, Eq. 5) with evolving steps. Each step scores every removal action by
dCLIP / dLatency -- CLIP score lost without the block on fixed validation prompts and seeds, latency from the lookup
table -- then, while the predicted latency is above the target, removes the lowest-value blocks; once it is met,
copies the highest-value ones while the target still holds. Every action is logged with its numbers
(<out>.log.json); the evolved spec is in the output checkpoint, loadable by sample.py, distill.py and evaluate.py.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a robust-trained pipeline checkpoint (train.py --keep-prob)")
    p.add_argument("--out", help="the evolved checkpoint")
    p.add_argument("--target", type=float, default=0.6, help="latency target as a fraction of the start (default 0.6)")
    p.add_argument("--table", help="latency lookup table JSON: read if it exists, completed and written back")
    p.add_argument("--table-only", action="store_true", help="build the lookup table (and --figure), then stop")
    p.add_argument("--figure", help="write the paper's Fig. 2 (latency and parameters per block) as a PNG")
    p.add_argument("--iterations", type=int, default=4, help="evolving steps at most (default: 4)")
    p.add_argument("--actions", type=int, default=3, help="actions per evolving step (default: 3)")
    p.add_argument("--train-steps", type=int, default=150, help="robust training steps between evolving steps")
    p.add_argument("--finetune-steps", type=int, default=300, help="plain fine-tuning of the final architecture")
    p.add_argument("--keep-prob", type=float, default=0.9, help="p of Eq. 5 in the robust training (default 0.9)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of robust training and fine-tuning")
    p.add_argument("--n", type=int, default=64, help="validation prompts for dCLIP (default: 64)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps when scoring actions (default: 10)")
    p.add_argument("--guidance", type=float, help="CFG scale when scoring (default: the checkpoint's)")
    p.add_argument("--eval-n", type=int, default=300, help="held-out prompts for the final report (default: 300)")
    p.add_argument("--baseline", choices=["random", "uniform"],
                   help="instead of Alg. 1: remove random blocks / blocks spread evenly over the stages, down to the "
                        "same latency, then fine-tuning for the evolved run's whole budget "
                        "(iterations x train-steps + finetune-steps)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch of the lookup table (2: one CFG step)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads while timing (default 1: stable medians)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if not args.table_only and not args.out:
        p.error("--out is required unless --table-only")
    if not 0.0 < args.target <= 1.0:
        raise ValueError(f"--target must be in (0, 1], got {args.target}")
    return args


def build_table(pipe, args: argparse.Namespace):  # noqa: ANN001, ANN201
    """Load (if any) and complete the lookup table for this UNet's blocks."""
    from snapfusion_min.cost import threads
    from snapfusion_min.evolve import LatencyTable, measure_table

    latent = pipe.sampler["resolution"] // pipe.vae.cfg.factor
    table = LatencyTable.load(args.table) if args.table and Path(args.table).is_file() else None
    if table is not None and (table.batch, table.latent) != (args.batch, latent):
        raise ValueError(f"{args.table} was measured at batch {table.batch}, latent {table.latent}; need "
                         f"{args.batch}, {latent}")
    with threads(args.threads):
        table = measure_table(pipe.unet, latent, args.batch, pipe.text_encoder.cfg.context_length, table=table)
    if args.table:
        table.save(args.table)
    return table


def fig2(pipe, table, path: str) -> None:  # noqa: ANN001
    """Latency (ms) and parameters (M) per block, as the paper's Fig. 2."""
    from snapfusion_min.evolve import block_costs
    from snapfusion_min.viz import bar_chart

    latent = pipe.sampler["resolution"] // pipe.vae.cfg.factor
    costs = block_costs(pipe.unet, latent, table.batch, pipe.text_encoder.cfg.context_length)
    ms = table.block_ms(pipe.unet.spec)
    bar_chart({"latency (ms)": [ms[a] for a in costs], "params (M)": [c["params"] / 1e6 for c in costs.values()]},
              list(costs), title=f"per-block latency ({table.device}, batch {table.batch}) and parameters").save(path)


def clip_of(pipe, clip, args: argparse.Namespace, removed: tuple[str, ...] = ()) -> float:  # noqa: ANN001
    """CLIP score on the fixed validation prompts and seeds (seed 99: not the held-out evaluation's)."""
    from snapfusion_min.toyclip import evaluate_generation

    pipe.unet.removed = set(removed)
    try:
        r = evaluate_generation(pipe, clip, n=args.n, steps=args.steps, guidance=args.guidance, seed=99,
                                reference=False)
    finally:
        pipe.unet.removed = set()
    return r["clip_score"]


def score_actions(pipe, clip, table, args: argparse.Namespace) -> list[dict]:  # noqa: ANN001
    """Every removal action's dCLIP, dLatency and value, lowest value first."""
    from tqdm.auto import tqdm

    from snapfusion_min.evolve import candidate_actions

    base = clip_of(pipe, clip, args)
    ms = table.block_ms(pipe.unet.spec)
    rows = []
    for action in tqdm(candidate_actions(pipe.unet.spec, "-"), desc="scoring actions", leave=False):
        d_clip = base - clip_of(pipe, clip, args, action.addresses)
        d_lat = sum(ms[a] for a in action.addresses)
        rows.append({"action": action, "d_clip": d_clip, "d_latency_ms": d_lat, "value": d_clip / d_lat})
    return sorted(rows, key=lambda r: r["value"])


def finetune(path: str, out: str, steps: int, keep_prob: float, args: argparse.Namespace) -> None:
    """Robust training (keep_prob < 1) or fine-tuning with train.py's own loop, in the model's prediction type."""
    import train
    from snapfusion_min.checkpoint import read_meta

    prediction = (read_meta(path) or {}).get("prediction", "v")
    train.main(["unet", "--init", path, "--out", out, "--steps", str(steps), "--keep-prob", str(keep_prob),
                "--prediction", prediction,
                "--lr", str(args.lr), "--batch-size", "32", "--seed", str(args.seed), "--device", args.device,
                "--save-every", str(10**9)])


def evolve(pipe, clip, table, target_ms: float, args: argparse.Namespace, work: Path, log: list) -> object:  # noqa: ANN001
    """Algorithm 1. Returns the pipeline with the evolved UNet."""
    from snapfusion_min import load_pipeline
    from snapfusion_min.evolve import Action, apply, evolve_unet

    current = args.checkpoint
    for it in range(args.iterations):
        if args.train_steps:
            out = str(work / f"robust{it}.safetensors")
            finetune(current, out, args.train_steps, args.keep_prob, args)
            current, pipe = out, load_pipeline(out)
        predicted = table.predict(pipe.unet.spec)
        rows = score_actions(pipe, clip, table, args)
        chosen: list[tuple[Action, dict]] = []
        spec = pipe.unet.spec
        if predicted > target_ms:  # remove the lowest-value blocks until the target is met
            for row in rows:
                if len(chosen) == args.actions or predicted <= target_ms:
                    break
                try:
                    spec = apply(spec, row["action"])[0]
                except ValueError:
                    continue  # invalidated by an earlier action of this step
                chosen.append((row["action"], row))
                predicted = table.predict(spec)
        else:  # copy the highest-value blocks while the target holds
            for row in reversed(rows):
                if len(chosen) == args.actions:
                    break
                copy = Action("+", row["action"].addresses)
                try:
                    trial = apply(spec, copy)[0]
                    cost = table.predict(trial)
                except (ValueError, KeyError):  # invalid, or a configuration the table has not timed
                    continue
                if cost <= target_ms:
                    spec, predicted = trial, cost
                    chosen.append((copy, row))
        if not chosen:
            break
        for action, row in chosen:
            pipe.unet = evolve_unet(pipe.unet, action)
            entry = {"iteration": it, "action": str(action), "d_clip": row["d_clip"],
                     "d_latency_ms": row["d_latency_ms"], "value": row["value"],
                     "predicted_ms_after": table.predict(pipe.unet.spec)}
            log.append(entry)
            print(f"  step {it}: {entry['action']:28s} dCLIP {row['d_clip']:+.4f}  "
                  f"dLatency {row['d_latency_ms']:.3f} ms  value {row['value']:+.5f}  "
                  f"-> predicted {entry['predicted_ms_after']:.2f} ms", flush=True)
        current = str(work / f"evolved{it}.safetensors")
        pipe.save(current)
    return pipe


def baseline(pipe, table, target_ms: float, rule: str, seed: int, log: list) -> object:  # noqa: ANN001
    """Remove blocks by a fixed rule down to the target: 'random' valid removals, or 'uniform' (stage by stage in
    turn, the first removable block of each)."""
    from snapfusion_min.arch import STAGES
    from snapfusion_min.evolve import candidate_actions, evolve_unet

    rng, turn = random.Random(seed), 0
    while table.predict(pipe.unet.spec) > target_ms:
        actions = candidate_actions(pipe.unet.spec, "-")
        if not actions:
            raise ValueError("no removable block left before reaching the target")
        if rule == "random":
            action = rng.choice(actions)
        else:
            for k in range(len(STAGES)):
                stage = STAGES[(turn + k) % len(STAGES)]
                found = [a for a in actions if a.addresses[0].startswith(stage + ".")]
                if found:
                    action, turn = found[0], turn + k + 1
                    break
        pipe.unet = evolve_unet(pipe.unet, action)
        log.append({"action": str(action), "predicted_ms_after": table.predict(pipe.unet.spec)})
        print(f"  {rule}: {action}  -> predicted {table.predict(pipe.unet.spec):.2f} ms", flush=True)
    return pipe


def minimum_latency(spec, table) -> float:  # noqa: ANN001
    """Predicted latency with every removable block removed, greedily (a bound for the target check)."""
    from snapfusion_min.evolve import apply, candidate_actions

    while True:
        actions = candidate_actions(spec, "-")
        if not actions:
            return table.predict(spec)
        spec = apply(spec, actions[0])[0]


def report(name: str, pipe, clip, table, args: argparse.Namespace) -> dict:  # noqa: ANN001
    from snapfusion_min.cost import count_params, threads
    from snapfusion_min.evolve import measure_unet
    from snapfusion_min.toyclip import evaluate_generation

    latent = pipe.sampler["resolution"] // pipe.vae.cfg.factor
    with threads(args.threads):
        measured = measure_unet(pipe.unet, latent, args.batch, pipe.text_encoder.cfg.context_length)
    r = evaluate_generation(pipe, clip, n=args.eval_n, seed=1234)
    return {"name": name, "measured_ms": measured, "predicted_ms": table.predict(pipe.unet.spec),
            "params": count_params(pipe.unet), "clip": r["clip_score"], "fid": r["fid"],
            "color": r["accuracy"]["color"], "shape": r["accuracy"]["shape"], "blocks": pipe.unet.spec.summary()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from snapfusion_min import load_pipeline
    from snapfusion_min.toyclip import load_toy_clip

    torch.manual_seed(args.seed)
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"no such checkpoint: {args.checkpoint}")
    pipe = load_pipeline(args.checkpoint)
    table = build_table(pipe, args)
    start_ms = table.predict(pipe.unet.spec)
    print(f"lookup table: {len(table.ms)} block configurations; predicted {start_ms:.2f} ms per step, measured "
          f"{table.measured_ms[next(reversed(table.measured_ms))]:.2f} ms (batch {table.batch}, {table.device})")
    if args.figure:
        fig2(pipe, table, args.figure)
    if args.table_only:
        return
    target_ms = args.target * start_ms
    floor = minimum_latency(pipe.unet.spec, table)
    if target_ms < floor:
        raise ValueError(f"target {target_ms:.2f} ms is below {floor:.2f} ms, the latency with every removable block "
                         "removed")
    clip = load_toy_clip(str(ROOT / "models" / "toy" / "clip.safetensors"))
    start = report("start", pipe, clip, table, args)
    log: list = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.baseline:
            pipe = baseline(pipe, table, target_ms, args.baseline, args.seed, log)
        else:
            pipe = evolve(pipe, clip, table, target_ms, args, work, log)
        if table.predict(pipe.unet.spec) > target_ms:
            print(f"warning: {args.iterations} evolving steps did not reach the target; raise --iterations or "
                  "--actions", file=sys.stderr)
        before = report("evolved, before fine-tuning", pipe, clip, table, args)
        pipe.save(work / "final.safetensors")
        # the baseline gets the evolved run's whole training budget (robust steps between evolving steps included)
        steps = args.finetune_steps + (args.iterations * args.train_steps if args.baseline else 0)
        if steps:
            finetune(str(work / "final.safetensors"), args.out, steps, 1.0, args)
        else:
            pipe.save(args.out)
    final = report(args.baseline or "evolved", load_pipeline(args.out), clip, table, args)
    rows = [start, before, final]
    print("\n| model | latency / step measured (predicted) | params | CLIP | FID | color | shape |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['measured_ms']:.2f} ms ({r['predicted_ms']:.2f}) | {r['params'] / 1e6:.2f}M | "
              f"{r['clip']:.4f} | {r['fid']:.2f} | {r['color']:.0%} | {r['shape']:.0%} |")
    print(f"\nlatency ratio evolved / start (measured): {final['measured_ms'] / start['measured_ms']:.3f}; "
          f"CLIP change {final['clip'] - start['clip']:+.4f}\n{final['blocks']}")
    Path(args.out + ".log.json").write_text(json.dumps({"args": vars(args), "actions": log, "rows": rows}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"evolve.py: error: {e}")
