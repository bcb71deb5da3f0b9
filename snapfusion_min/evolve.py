"""Architecture evolving (§3.1, Alg. 1): evolving actions on the spec, their values, and the loop itself.

* Latency comes from the lookup table of ``latency.py`` (§2.2).
* Actions: A- removes a block, A+ copies one (the copy starts from its source's weights, right after it). A block
  may be acted on only if every other block keeps its shapes, so weights carry over. Cross-attention blocks can be
  removed or copied anywhere; a ResNet of the skip-free ``mid`` stage likewise; a ResNet of a down stage goes
  together with the up-stage ResNet that consumes its skip connection (one action, two blocks), else the U breaks.
* Value of an action (Alg. 1): dCLIP / dLatency, with dCLIP = CLIP(with block) - CLIP(without) (the block's
  contribution) and dLatency its latency from the table. Low value: removed first; high value: copied.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .arch import DOWN_STAGES, STAGES, UP_STAGES, ArchSpec, walk
from .cost import count_params, threads
from .formats.checkpoint import atomic_write, read_meta
from .latency import LatencyTable, measure_unet
from .pipeline import Pipeline, read_pipeline
from .training import LOCAL, Dist, TrainConfig, barrier, on_main
from .unet import UNet
from .unet_training import UNetConfig, train_unet, warmup_for

Scorer = Callable[[Pipeline], float]  # a pipeline -> its quality (the toy CLIP score; a real CLIP at SD scale)
BASELINES = ("random", "uniform")
CRITERIA = ("value", "d_clip")  # Alg. 1's dCLIP / dLatency, or dCLIP alone (the latency-free ablation)

PAIRS = {"down1": "up3", "down2": "up2", "down3": "up1", "mid_down": "mid_up"}


# ---- the spec edits ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    """Remove ('-') or copy ('+') the blocks at ``addresses`` (two for a down/up ResNet pair)."""

    kind: str
    addresses: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.kind}{'+'.join(self.addresses)}"


def _shapes(spec: ArchSpec) -> dict[str, tuple[int, int, int]]:
    return {f"{b.stage}.{b.name}": (b.c_in, b.c_skip, b.c_out) for b in walk(spec)[0]}


def _next_name(blocks: tuple[str, ...], kind: str) -> str:
    return f"{kind}{1 + max([int(b[1:]) for b in blocks if b[0] == kind], default=-1)}"


def apply(spec: ArchSpec, action: Action) -> tuple[ArchSpec, dict[str, str]]:
    """The evolved spec and, for copies, {new address: source address}. Raises ValueError for an invalid action."""
    stages = {s: list(b) for s, b in spec.stages.items()}
    copies = {}
    for address in action.addresses:
        stage, _, name = address.partition(".")
        if stage not in stages or name not in stages[stage]:
            raise ValueError(f"unknown block address {address!r}; blocks are {spec.addresses()}")
        i = stages[stage].index(name)
        if action.kind == "-":
            del stages[stage][i]
        else:
            new = _next_name(tuple(stages[stage]), name[0])
            stages[stage].insert(i + 1, new)
            copies[f"{stage}.{new}"] = address
    try:
        evolved = dataclasses.replace(spec, stages={s: tuple(b) for s, b in stages.items()})
    except ValueError as e:
        raise ValueError(f"action {action} breaks the architecture: {e}") from None
    before, after = _shapes(spec), _shapes(evolved)
    for address, shape in after.items():
        if before.get(copies.get(address, address)) != shape:
            raise ValueError(f"action {action} would change the shapes of {address}; its weights would not carry over")
    return evolved, copies


def candidate_actions(spec: ArchSpec, kind: str) -> list[Action]:
    """Every valid single action of ``kind`` ('-' or '+') on ``spec``: A blocks, mid ResNets, down/up ResNet pairs."""
    found = []
    for stage in STAGES:
        for name in spec.stages[stage]:
            groups = [(f"{stage}.{name}",)]
            if name[0] == "R" and stage in DOWN_STAGES:  # pair with the up ResNet popping this R-layer's skip
                up = PAIRS[stage]
                r_down = [b for b in spec.stages[stage] if b[0] == "R"]
                r_up = [b for b in spec.stages[up] if b[0] == "R"]
                k = r_down.index(name)
                groups = [(f"{stage}.{name}", f"{up}.{r_up[len(r_down) - 1 - k]}")]
            elif name[0] == "R" and stage in UP_STAGES:
                continue  # only as part of a pair
            if kind == "+" and name[0] == "R" and stage != "mid":
                continue  # a copied down-stage R would split its R-layer from its A blocks: not offered
            for addresses in groups:
                try:
                    apply(spec, Action(kind, addresses))
                except ValueError:
                    continue
                found.append(Action(kind, addresses))
    return found


def evolve_unet(unet: UNet, action: Action) -> UNet:
    """A new UNet of the evolved spec: kept blocks keep their weights, a copy starts as its source."""
    spec, copies = apply(unet.spec, action)
    p = next(unet.parameters())
    new = UNet(spec).to(p.device, p.dtype)
    old = unet.state_dict()
    state = {}
    for key in new.state_dict():
        parts = key.split(".")
        if parts[0] == "stages" and f"{parts[1]}.{parts[2]}" in copies:
            src_stage, src_name = copies[f"{parts[1]}.{parts[2]}"].split(".")
            parts[1:3] = [src_stage, src_name]
        state[key] = old[".".join(parts)].clone()
    new.load_state_dict(state)
    new.keep_prob = unet.keep_prob
    new.train(unet.training)
    return new.to(memory_format=unet.memory_format())




# ---- Algorithm 1 ------------------------------------------------------------------------------------------------
TRAIN = TrainConfig(batch_size=32, lr=3e-4, save_every=10**9, ema_decay=0.999,
                    save_state=False)  # no resume inside Alg. 1: no state to keep; one checkpoint, at the end


@dataclass(frozen=True)
class EvolveConfig:
    target: float = 0.6  # latency target, a fraction of the start's predicted latency per step
    iterations: int = 4  # evolving steps at most
    actions: int = 3  # actions per evolving step
    robust_steps: int = 150  # robust training (Eq. 5) steps before each evolving step
    finetune_steps: int = 300  # plain fine-tuning of the final architecture
    keep_prob: float = 0.9  # p of Eq. 5 in the robust training
    baseline: str | None = None  # instead of Alg. 1: 'random' valid removals or 'uniform' (stage by stage)
    criterion: str = "value"  # the order of actions: Alg. 1's 'value' (dCLIP / dLatency) or 'd_clip' alone
    threads: int = 1  # CPU threads while timing (one gives stable medians)
    data: str = "toy"  # robust training and fine-tuning data: 'toy' or a folder of captioned images
    train: TrainConfig = TRAIN  # the loop of robust training and fine-tuning (its steps and warm-up are set per run)

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target must be in (0, 1], got {self.target}")
        if not 0.0 < self.keep_prob <= 1.0:
            raise ValueError(f"keep-prob must be in (0, 1], got {self.keep_prob}")
        if min(self.iterations, self.actions, self.threads) < 1 or min(self.robust_steps, self.finetune_steps) < 0:
            raise ValueError("iterations, actions and threads must be >= 1, robust and fine-tuning steps >= 0")
        if self.baseline not in (None, *BASELINES):
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")


@dataclass(frozen=True)
class Place:
    """Where Alg. 1 runs: the training loop's ranks and device (``d``), and the dtype the UNet is scored and timed
    in (training keeps float32 weights; ``TrainConfig.amp`` for mixed precision)."""

    d: Dist = LOCAL
    dtype: torch.dtype = torch.float32

    def load(self, path: str | Path) -> Pipeline:
        return read_pipeline(path).to(self.d.device, self.dtype)

    def save(self, pipe: Pipeline, path: str | Path) -> None:
        """Rank 0 writes ``path``; every rank returns once it is there."""
        if self.d.main:
            pipe.save(path)
        barrier(self.d)


def train(path: str, out: str, steps: int, keep_prob: float, cfg: EvolveConfig, figures: bool = False,
          where: Place = Place()) -> Pipeline:
    """Robust training (keep_prob < 1) or fine-tuning of the checkpoint ``path``, in its own prediction type, by the
    one training loop on ``where``'s ranks."""
    prediction = (read_meta(path) or {}).get("prediction", "v")  # from the metadata: no second load of the weights
    unet_cfg = UNetConfig(init=path, prediction=prediction, keep_prob=keep_prob, data=cfg.data,
                          train=dataclasses.replace(cfg.train, train_steps=steps, warmup=warmup_for(steps)))
    train_unet(unet_cfg, out, where.d, figures=figures)
    barrier(where.d)
    return where.load(out)


def score_actions(pipe: Pipeline, table: LatencyTable, score: Scorer, criterion: str = "value") -> list[dict]:
    """Every removal action's dCLIP (score lost without its blocks), dLatency and value, lowest ``criterion`` first
    (Alg. 1: the value; 'd_clip': dCLIP alone, the ablation without the latency term).

    Each action is scored on the network it would build, ``evolve_unet(unet, action)``: for a down/up ResNet pair
    that is not Eq. 5's identity of both blocks (which keeps the up block's 1x1 projection over [h; skip] and the
    skip itself) but the U without the pair and without the skip between them.
    """
    unet, base = pipe.unet, score(pipe)
    ms, rows = table.block_ms(unet.spec), []
    for action in tqdm(candidate_actions(unet.spec, "-"), desc="scoring actions", leave=False):
        d_clip = base - score(pipe.with_parts(unet=evolve_unet(unet, action)))
        d_lat = sum(ms[a] for a in action.addresses)
        rows.append({"action": action, "d_clip": d_clip, "d_latency_ms": d_lat, "value": d_clip / d_lat})
    return sorted(rows, key=lambda r: r[criterion])


def choose(spec: ArchSpec, rows: list[dict], table: LatencyTable, target_ms: float, n: int) -> list[tuple[Action,
                                                                                                          dict]]:
    """Alg. 1's choice: above the target, remove the lowest-value blocks until it is met; at or below it, copy the
    highest-value ones while the target still holds. At most ``n`` actions, each valid after the ones before it."""
    chosen: list[tuple[Action, dict]] = []
    predicted = table.predict(spec)
    if predicted > target_ms:
        for row in rows:
            if len(chosen) == n or predicted <= target_ms:
                break
            try:
                spec = apply(spec, row["action"])[0]
            except ValueError:
                continue  # invalidated by an earlier action of this step
            chosen.append((row["action"], row))
            predicted = table.predict(spec)
        return chosen
    for row in reversed(rows):
        if len(chosen) == n:
            break
        copy = Action("+", row["action"].addresses)
        if copy not in candidate_actions(spec, "+"):  # e.g. a down/up ResNet pair: never copied
            continue
        try:
            cost = table.predict(trial := apply(spec, copy)[0])
        except KeyError:  # a configuration the table has not timed
            continue
        if cost <= target_ms:
            spec = trial
            chosen.append((copy, row))
    return chosen


def evolve(checkpoint: str, pipe: Pipeline | None, table: LatencyTable, target_ms: float, score: Scorer,
           cfg: EvolveConfig, work: Path, log: list, where: Place = Place()) -> tuple[Pipeline, int]:
    """Algorithm 1: alternate robust training (Eq. 5) with evolving steps; every action is appended to ``log``.
    ``pipe`` is the checkpoint, already loaded (None: load it if it is needed before the first training). On
    several ranks, they train together and rank 0 scores and chooses the actions, which every rank then applies.
    Returns the evolved pipeline and the robust steps it trained (fewer than ``iterations x robust_steps`` when
    an iteration finds nothing left to do)."""
    current, trained = checkpoint, 0
    if pipe is None and not cfg.robust_steps:
        pipe = where.load(checkpoint)
    for it in range(cfg.iterations):
        if cfg.robust_steps:
            out = str(work / f"robust{it}.safetensors")
            current, pipe = out, train(current, out, cfg.robust_steps, cfg.keep_prob, cfg, where=where)
            trained += cfg.robust_steps
        chosen = on_main(where.d, lambda p=pipe: choose(p.unet.spec, score_actions(p, table, score, cfg.criterion),
                                                        table, target_ms, cfg.actions))
        if not chosen:
            break
        for action, row in chosen:
            pipe.unet = evolve_unet(pipe.unet, action)
            log.append({"iteration": it, "action": str(action), "d_clip": row["d_clip"],
                        "d_latency_ms": row["d_latency_ms"], "value": row["value"],
                        "predicted_ms_after": table.predict(pipe.unet.spec)})
            if where.d.main:
                print(f"  step {it}: {log[-1]['action']:28s} dCLIP {row['d_clip']:+.4f}  dLatency "
                      f"{row['d_latency_ms']:.3f} ms  value {row['value']:+.5f}  -> predicted "
                      f"{log[-1]['predicted_ms_after']:.2f} ms", flush=True)
        current = str(work / f"evolved{it}.safetensors")
        where.save(pipe, current)
    return pipe, trained


def baseline(pipe: Pipeline, table: LatencyTable, target_ms: float, rule: str, seed: int, log: list,
             quiet: bool = False) -> Pipeline:
    """Remove blocks by a fixed rule down to the target: 'random' valid removals, or 'uniform' (stage by stage in
    turn, the first removable block of each). Seeded: every rank removes the same blocks."""
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
        if not quiet:
            print(f"  {rule}: {action}  -> predicted {log[-1]['predicted_ms_after']:.2f} ms", flush=True)
    return pipe


def minimum_latency(spec: ArchSpec, table: LatencyTable) -> float:
    """Predicted latency with every removable block removed, greedily (a bound for the target check)."""
    while actions := candidate_actions(spec, "-"):
        spec = apply(spec, actions[0])[0]
    return table.predict(spec)


def row(name: str, pipe: Pipeline, table: LatencyTable, evaluate: Callable[[Pipeline], dict] | None,
        cfg: EvolveConfig, batch: int) -> dict:
    """One line of the result table: measured and predicted latency per step, parameters, quality (``evaluate``
    gives 'clip_score', and where it has them 'fid' and the toy world's per-attribute 'accuracy' (the toy CLIP's
    zero-shot) and 'judged' (the pixel judge's), each kept as its mean over attributes; None: no quality)."""
    latent = pipe.sampler.resolution // pipe.vae.cfg.factor
    with threads(cfg.threads):
        measured = measure_unet(pipe.unet, latent, batch, pipe.text_encoder.cfg.context_length)
    r = evaluate(pipe) if evaluate else {"clip_score": None}
    return {"name": name, "measured_ms": measured, "predicted_ms": table.predict(pipe.unet.spec),
            "params": count_params(pipe.unet), "clip": r["clip_score"], "fid": r.get("fid"),
            "zero_shot": _mean(r.get("accuracy")), "judged": _mean(r.get("judged")),
            "blocks": pipe.unet.spec.summary()}


def _mean(accuracy: dict[str, float] | None) -> float | None:
    """The mean over attributes of a per-attribute accuracy (None: not judged)."""
    return sum(accuracy.values()) / len(accuracy) if accuracy else None


def evolve_and_finetune(checkpoint: str, table: LatencyTable, cfg: EvolveConfig, score: Scorer,
                        evaluate: Callable[[Pipeline], dict] | None, out: str, where: Place = Place(),
                        budget: int | None = None) -> dict:
    """Evolve (or a baseline) to ``cfg.target`` of the start's latency, fine-tune, save ``out``; returns the log:
    every action, the steps trained in all (``train_steps``) and a row (latency, parameters, quality unless
    ``evaluate`` is None) for the start, the evolved UNet and the fine-tuned one (rows on rank 0 only). Its
    checkpoints in between go to the folder <out>.work/, which every rank reads (removed at the end).

    ``budget``: the training steps in all, robust ones included (an evolved run's ``train_steps``, so that a
    comparison trains every arm equally); fine-tuning takes what the robust steps leave. None: a baseline gets
    ``iterations x robust_steps + finetune_steps``, an evolving run its robust steps + ``finetune_steps``.
    """
    pipe = where.load(checkpoint)
    target_ms = cfg.target * table.predict(pipe.unet.spec)
    floor = minimum_latency(pipe.unet.spec, table)
    if target_ms < floor:
        raise ValueError(f"target {target_ms:.2f} ms is below {floor:.2f} ms, the latency with every removable block "
                         "removed")
    rows, log = ([row("start", pipe, table, evaluate, cfg, table.batch)] if where.d.main else []), []
    work = Path(f"{out}.work")
    if where.d.main:
        shutil.rmtree(work, ignore_errors=True)  # what a killed run left
        work.mkdir(parents=True)
    barrier(where.d)
    if cfg.baseline:
        pipe, robust = baseline(pipe, table, target_ms, cfg.baseline, cfg.train.seed, log, quiet=not where.d.main), 0
        nominal = cfg.iterations * cfg.robust_steps + cfg.finetune_steps
    else:
        loaded = None if cfg.robust_steps else pipe  # robust training comes first: no copy kept meanwhile
        pipe = None
        pipe, robust = evolve(checkpoint, loaded, table, target_ms, score, cfg, work, log, where)
        nominal = robust + cfg.finetune_steps
    if table.predict(pipe.unet.spec) > target_ms and where.d.main:
        print(f"warning: {cfg.iterations} evolving steps did not reach the target; raise --iterations or "
              "--actions", file=sys.stderr)
    if where.d.main:
        rows.append(row("evolved, before fine-tuning", pipe, table, evaluate, cfg, table.batch))
    where.save(pipe, work / "final.safetensors")
    pipe = None  # the fine-tuning reads it from there: one copy of the weights in memory, not two
    steps = max(0, (nominal if budget is None else budget) - robust)
    if steps:
        train(str(work / "final.safetensors"), out, steps, 1.0, cfg, figures=True, where=where)
    elif where.d.main:
        atomic_write(out, lambda tmp: shutil.copyfile(work / "final.safetensors", tmp))
    barrier(where.d)
    if where.d.main:
        shutil.rmtree(work)
        rows.append(row(cfg.baseline or "evolved", where.load(out), table, evaluate, cfg, table.batch))
    return {"config": dataclasses.asdict(cfg), "actions": log, "train_steps": robust + steps, "rows": rows}
