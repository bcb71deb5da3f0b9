"""Is Alg. 1 worth it? Architecture evolving (§3.1) against the baselines a practitioner would try first, at the
evolved UNet's latency, with the same training, and with error bars (``python recipe.py --bundled --arms``).

From the recipe's robust-trained UNet each arm removes work, then trains for Alg. 1's whole budget (its robust
training between evolving steps and its fine-tuning: ``iterations x robust_steps + finetune_steps`` steps):

    alg1     Alg. 1: remove the blocks of lowest dCLIP / dLatency, robust training (Eq. 5) between steps
    dclip    the same loop ordered by dCLIP alone: the criterion without its latency term
    random   random valid removals down to the same predicted latency
    slim     every layer keeps the same fraction of its channels by L1 norm (``slim.py``): the "conventional pruning"
             §3.1 argues against; the largest fraction that meets Alg. 1's measured latency, or where none does,
             the one of Alg. 1's parameter count
    scratch  Alg. 1's architecture (of the same seed) from random weights

Seed s of an arm draws everything random in it from s (training batches, Eq. 5's drops, random removals, initial
weights); Alg. 1's seed 0 is the recipe's own evolved UNet. Every UNet, and the teacher it came from, is judged on
the same held-out prompts with the same noise, at 50 steps and the working guidance G0 (``budget.G0``). A number's
interval is the 95% bootstrap over prompts and training seeds (``eval/bootstrap.py``: the same draws for every
model) of the mean over seeds; a difference between arms is "beyond the noise" when its paired interval lies wholly
on one side of 0.

The run is long (hours on two cores), so what the page is drawn from is kept beside it, in ``<report>/arms/``: the
lookup table Alg. 1 evolved with (``lut.json``), per model its run's log with its architecture (``<arm><seed>.json``)
and its judging (``<arm><seed>.judged.pt``), and the record of what is done (``arms.json``). Latency and size are
the architecture's, timed on fresh weights, so the trained models need not be kept: a run stopped on one machine
goes on on another from that folder (re-making only the robust UNet, and the evolved one until Alg. 1's seed 0 is
judged), and the page is redrawn from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch import ArchSpec
from ..cost import count_params, threads
from ..eval import bootstrap
from ..eval.metrics import fid
from ..evolve import EvolveConfig, Scorer, evolve_and_finetune, train
from ..formats.checkpoint import atomic_write
from ..formats.figures import arms_plot
from ..latency import LatencyTable, build_table, measure_unet
from ..pipeline import Pipeline, read_pipeline
from ..toy import BUNDLED
from ..toy.clip import load_toy_clip, per_prompt, real_heldout, toy_judge
from ..unet import UNet
from .budget import G0, Budget
from .channel_slimming import choose_ratio, slim_sweep, slim_unet
from .stages import alg1_scorer, evolve_config, run_stages

ARMS = {"alg1": "Alg. 1 (dCLIP / dLatency)", "dclip": "dCLIP alone (no latency term)",
        "random": "random removals", "slim": "uniform channel slimming (L1)",
        "scratch": "Alg. 1's architecture from scratch"}


@dataclass(frozen=True)
class ArmsConfig:
    seeds: tuple[int, ...] = (0, 1, 2)
    n: int = 300  # held-out prompts per model
    steps: int = 50
    guidance: float = G0
    draws: int = 1000  # bootstrap resamples of the prompts and seeds
    clip_margin: float = 0.01  # "as good as the original": Alg. 1's CLIP interval lies above the teacher's - this
    fid_margin: float = 0.1  # ... and its FID interval below the teacher's FID x (1 + this)


QUICK_ARMS = ArmsConfig(seeds=(0,), n=4, steps=4, draws=50)  # a smoke run (the tests): one seed per arm


def run_arm(arm: str, seed: int, start: str, alg1: dict | None, table: LatencyTable, cfg: EvolveConfig,
            score: Scorer, out: str) -> dict:
    """Train arm ``arm`` of seed ``seed`` from the robust-trained ``start`` into ``out``; returns its log.
    ``alg1``: the record of Alg. 1's run of the same seed (``record``; None for Alg. 1 itself): its architecture
    ('spec': that of 'scratch', the latency and size 'slim' aims at) and how many steps it trained in all
    ('train_steps': every other arm trains for as many)."""

    torch.manual_seed(seed)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed),
                              criterion="d_clip" if arm == "dclip" else "value",
                              baseline="random" if arm == "random" else None)
    budget = None if alg1 is None else alg1["train_steps"]
    if arm in ("alg1", "dclip", "random"):
        return evolve_and_finetune(start, table, cfg, score, None, out, budget=budget)
    pipe, log = read_pipeline(start), {"config": dataclasses.asdict(cfg), "train_steps": budget}
    spec = ArchSpec.from_json(alg1["spec"])
    if arm == "scratch":
        pipe.unet = UNet(spec).to(next(pipe.unet.parameters()).device)
    else:
        target, latent = fresh_unet(spec), pipe.sampler.resolution // pipe.vae.cfg.factor
        context_len = pipe.text_encoder.cfg.context_length
        with threads(cfg.threads):
            target_ms = measure_unet(target, latent, table.batch, context_len)
        sweep = slim_sweep(pipe.unet, latent, table.batch, context_len, n_threads=cfg.threads)
        chosen = choose_ratio(sweep, target_ms, count_params(target))
        pipe.unet = slim_unet(pipe.unet, chosen["ratio"])
        log |= {"target_ms": target_ms, "target_params": count_params(target), "sweep": sweep, "chosen": chosen}
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save(f"{tmp}/start.safetensors")
        del pipe
        train(f"{tmp}/start.safetensors", out, budget, 1.0, cfg, figures=True)
    return log


def fresh_unet(spec: ArchSpec) -> UNet:
    """A UNet of ``spec`` for its latency and size (which its weights do not change), drawn without touching the
    random numbers the run goes on with."""
    with torch.random.fork_rng(devices=[]):
        return UNet(spec)


def judge(pipe: Pipeline, clip: torch.nn.Module, cfg: ArmsConfig) -> dict[str, torch.Tensor]:
    """Per held-out prompt: the generated image's CLIP cosine with its caption, and its image features (for FID)."""
    return per_prompt(pipe, clip, cfg.n, cfg.steps, cfg.guidance, progress=True)


def record(log: dict, checkpoint: Path, start: Path) -> dict:
    """What the page needs of a run besides its judging: its log, its UNet's architecture ('spec') and a checksum
    of the UNet it started from ('start': runs resumed on another machine re-make it, and the page says whether
    every run started from the same weights)."""
    return log | {"spec": dataclasses.asdict(read_pipeline(checkpoint).unet.spec), "start": unet_sum(start)}


def unet_sum(checkpoint: Path) -> str:
    """The first 12 hex digits of the SHA-256 of a checkpoint's UNet weights, in key order."""
    h = hashlib.sha256()
    for key, value in sorted(read_pipeline(checkpoint).unet.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


# ---- the stages -------------------------------------------------------------------------------------------------
def model_path(p: dict[str, Path], work: Path, arm: str, seed: int) -> Path:
    return p["evolved"] if (arm, seed) == ("alg1", 0) else work / f"{arm}{seed}.safetensors"


def stages(b: Budget, cfg: ArmsConfig, p: dict[str, Path], work: Path, raw: Path,
           clip: torch.nn.Module) -> list[tuple[str, Callable]]:
    """(name, run): the teacher judged, then every arm and seed trained into ``work`` (Alg. 1's seed 0 is the
    recipe's evolved UNet), recorded into ``<raw>/<arm><seed>.json`` and judged into ``<raw>/<arm><seed>.judged.pt``.
    The arms of seed s read Alg. 1's record of seed s (it comes first)."""

    def judged(name: str, checkpoint: Path) -> None:
        out = judge(read_pipeline(checkpoint), clip, cfg)
        atomic_write(raw / f"{name}.judged.pt", lambda tmp: torch.save(out, tmp))

    def arm(name: str, seed: int) -> Callable:
        def run() -> None:
            out = model_path(p, work, name, seed)
            if out == p["evolved"]:
                log = json.loads(Path(f"{out}.log.json").read_text())
            else:
                start = read_pipeline(p["robust"])
                latent = start.sampler.resolution // start.vae.cfg.factor
                table = build_table(start.unet, latent, 2, start.text_encoder.cfg.context_length, str(p["lut"]))
                del start
                alg1 = None if name == "alg1" else json.loads((raw / f"alg1{seed}.json").read_text())
                log = run_arm(name, seed, str(p["robust"]), alg1, table, evolve_config(b), alg1_scorer(b, clip),
                              str(out))
                atomic_write(f"{out}.log.json", lambda tmp: Path(tmp).write_text(json.dumps(log, indent=1)))
            kept = record(log, out, p["robust"])
            atomic_write(raw / f"{name}{seed}.json", lambda tmp: Path(tmp).write_text(json.dumps(kept, indent=1)))
            judged(f"{name}{seed}", out)
        return run

    def teacher() -> None:
        kept = {"spec": dataclasses.asdict(read_pipeline(p["teacher"]).unet.spec)}
        atomic_write(raw / "teacher.json", lambda tmp: Path(tmp).write_text(json.dumps(kept, indent=1)))
        judged("teacher", p["teacher"])

    return [("teacher", teacher), *[(f"{name}{seed}", arm(name, seed)) for name in ARMS for seed in cfg.seeds]]


def kept_folder(report: Path) -> Path:
    """Where an --arms run keeps what its page is drawn from (committed beside the page): the evolving table
    lut.json, per run its log and judged features, and arms.json, the record of the runs done."""
    return report / "arms"


def arms_table(report: Path, given: Path | None) -> Path | None:
    """The lookup table the recipe evolves with before the arms: the one a run kept in ``<report>/arms`` goes on
    (``given`` beside it is refused), else ``given``."""
    kept = kept_folder(report) / "lut.json"
    if not kept.is_file():
        return given
    if given is not None:
        raise ValueError(f"{kept.parent} holds a run that evolved with its own lookup table: drop --latency-table, "
                         "or give another --report-dir")
    return kept


def needs_evolved(report: Path) -> bool:
    """Whether the arms still need the recipe's evolved UNet (Alg. 1's seed 0), or have it judged in
    ``<report>/arms``."""
    done = kept_folder(report) / "arms.json"
    return not done.is_file() or "alg10" not in json.loads(done.read_text())["done"]


def run_arms(b: Budget, cfg: ArmsConfig, p: dict[str, Path], work: Path, report: Path) -> list[str]:
    """Every arm and seed not yet done (recorded in <report>/arms/arms.json), then the page report/evolving.md.
    The arms evolve with ``<report>/arms/lut.json``, the table of the recipe's evolving (copied there first)."""

    work.mkdir(parents=True, exist_ok=True)
    raw = kept_folder(report)
    raw.mkdir(parents=True, exist_ok=True)
    if (raw / "lut.json").is_file():
        shutil.copyfile(raw / "lut.json", p["lut"])
    else:
        shutil.copyfile(p["lut"], raw / "lut.json")
    clip = load_toy_clip(BUNDLED / "clip.safetensors")
    settings = {"budget": dataclasses.asdict(b), "arms": dataclasses.asdict(cfg)}
    todo = stages(b, cfg, p, work, raw, clip)
    done = run_stages(todo, raw / "arms.json", settings)["done"]
    start = time.perf_counter()
    names = {"teacher": ["teacher"]} | {arm: [f"{arm}{s}" for s in cfg.seeds] for arm in ARMS}
    robust = read_pipeline(p["robust"])
    latent, context_len = robust.sampler.resolution // robust.vae.cfg.factor, robust.text_encoder.cfg.context_length
    facts = measure(cfg, raw, names, clip, latent, context_len)
    block_ms = LatencyTable.load(raw / "lut.json").block_ms(robust.unet.spec).values()
    sweep = slim_sweep(robust.unet, latent, 2, context_len)  # side by side with the models' latencies
    done = {name: done[name] for name, _ in todo}  # in stage order
    return write_page(cfg, facts, done, time.perf_counter() - start, raw, report,
                      (min(block_ms), max(block_ms)), sweep)


# ---- the page ---------------------------------------------------------------------------------------------------
def measure(cfg: ArmsConfig, raw: Path, names: dict[str, list[str]], clip: torch.nn.Module, latent: int,
            context_len: int) -> dict:
    """Per model (label -> its runs' names in ``raw``): bootstrap draws of the seed-mean CLIP score and FID, each
    seed's own values, and each seed's architecture, its latency per step (one thread, batch 2, side by side, on
    fresh weights) and parameters, and the checksums of the UNets its runs started from."""

    real = toy_judge(clip).image_features(real_heldout(cfg.n)[0], normalize=False).cpu()
    timed: dict[str, float] = {}  # one timing per architecture: the same one (scratch is Alg. 1's) runs as fast
    d = bootstrap.draws(cfg.n, len(cfg.seeds), cfg.draws)
    facts = {}
    loaded = {name: [torch.load(raw / f"{run}.judged.pt", weights_only=True) for run in runs]
              for name, runs in names.items()}
    fids = bootstrap.fid_draws_all({name: [s["features"] for s in seeds] for name, seeds in loaded.items()}, real, d)
    for name, seeds in loaded.items():
        facts[name] = {"draws": {"clip": bootstrap.mean_draws([s["cos"] for s in seeds], d), "fid": fids[name]},
                       "seeds": [{"clip": s["cos"].double().mean().item(), "fid": fid(s["features"], real)}
                                 for s in seeds],
                       "ms": [], "params": [], "specs": [], "copies": [], "starts": []}
        for run in names[name]:
            log = json.loads((raw / f"{run}.json").read_text())
            facts[name]["copies"].append([a["action"] for a in log.get("actions", []) if a["action"].startswith("+")])
            facts[name]["starts"] += [log["start"]] if "start" in log else []
            unet, key = fresh_unet(ArchSpec.from_json(log["spec"])), json.dumps(log["spec"], sort_keys=True)
            facts[name]["specs"].append(unet.spec)
            if key not in timed:
                with threads(1):
                    timed[key] = measure_unet(unet, latent, 2, context_len)
            facts[name]["ms"].append(timed[key])
            facts[name]["params"].append(count_params(unet))
    return facts


def difference(facts: dict, mine: str, theirs: str, key: str) -> dict:
    """``mine - theirs`` in ``key``: its paired bootstrap interval over prompts and seeds, and the verdict for
    ``mine`` read from that interval alone (``eval.bootstrap.verdict``; CLIP: higher is better, FID: lower)."""
    a, b = facts[mine]["draws"][key], facts[theirs]["draws"][key]
    return {"d": bootstrap.interval(a - b), "verdict": bootstrap.verdict(bootstrap.gain(a, b, key == "clip"))}


def keeps(facts: dict, mine: str, theirs: str, margins: dict[str, float]) -> dict[str, bool]:
    """Per metric, whether ``mine`` keeps ``theirs``' quality: its interval lies above minus the margin (FID's
    margin a fraction of ``theirs``' FID)."""
    out = {}
    for key, margin in margins.items():
        out[key] = bootstrap.keeps_quality(facts[mine]["draws"][key], facts[theirs]["draws"][key], key, margin)
    return out


def spread(values: list[float], fmt: str) -> str:
    """'12.0' or '11.1-12.3' (seeds whose values differ)."""
    lo, hi = f"{min(values):{fmt}}", f"{max(values):{fmt}}"
    return lo if lo == hi else f"{lo}-{hi}"


def write_page(cfg: ArmsConfig, facts: dict, done: dict, page_s: float, raw: Path, report: Path,
               block_ms: tuple[float, float], sweep: list[dict]) -> list[str]:
    """report/evolving.md and its figure: the arms with their intervals, each arm and the teacher against Alg. 1,
    how often dCLIP alone chose Alg. 1's blocks (``block_ms``: the range of the start's block latencies), the
    slimming ``sweep`` (``slim.slim_sweep`` of the start; the slimming runs' logs are in ``raw``), what the toy
    world supports and what this cost; returns the page's lines."""

    label = {"teacher": "teacher (the original UNet)"} | ARMS
    k, ci = len(cfg.seeds), {name: {key: bootstrap.interval(f["draws"][key]) for key in ("clip", "fid")}
                             for name, f in facts.items()}
    starts = sorted({s for f in facts.values() for s in f["starts"]})
    lines = ["# Is Alg. 1 worth it? Evolving against the baselines", "",
             f"From the recipe's robust-trained UNet (`robust.safetensors`; {start_line(starts)}), each arm removes "
             f"work down to Alg. 1's latency or size and trains for as many steps as Alg. 1 of its seed did in all; "
             f"{k} seeds each (`snapfusion_min/experiments/alg1_baselines.py` says what each arm does). "
             f"{latency_line(facts, label)}"
             f" Every model draws {cfg.n} held-out prompts with the same noise, {cfg.steps} DDIM steps, "
             f"guidance {cfg.guidance:g}. Intervals: 95% bootstrap over the prompts *and* the training seeds "
             f"({cfg.draws} draws of both, the same for every model: `eval/bootstrap.py`) of the mean over seeds "
             "(FID's draws repeat images, which raises FID: its intervals lie mostly above its estimate); latency: "
             "one UNet step with CFG (batch 2) of each architecture, measured side by side on one CPU thread.",
             "",
             "| model | latency / step (ms) | parameters | CLIP score (95%) | per seed | FID (95%) | per seed |",
             "|---|---|---|---|---|---|---|"]
    for name, f in facts.items():
        c, d = ci[name]["clip"], ci[name]["fid"]
        each = {key: ", ".join(f"{s[key]:{fmt}}" for s in f["seeds"]) for key, fmt in (("clip", ".4f"),
                                                                                         ("fid", ".2f"))}
        lines.append(f"| {label[name]} | {spread(f['ms'], '.1f')} | {spread([n / 1e6 for n in f['params']], '.2f')}"
                     f"M | {c[0]:.4f} ({c[1]:.4f} to {c[2]:.4f}) | {each['clip']} | "
                     f"{d[0]:.2f} ({d[1]:.2f} to {d[2]:.2f}) | {each['fid']} |")
    versus = {name: {key: difference(facts, "alg1", name, key) for key in ("clip", "fid")}
              for name in facts if name != "alg1"}
    lines += ["", "Alg. 1 against each: the difference Alg. 1 minus the other (CLIP: higher is better, FID: lower), "
              "its paired 95% interval over prompts and seeds, and the verdict for Alg. 1, read from the interval "
              "alone: better or worse when it lies wholly on one side of 0, else a tie.", "",
              "| Alg. 1 minus | CLIP score (95%) | verdict | FID (95%) | verdict |", "|---|---|---|---|---|"]
    for name, v in versus.items():
        cells = [f"{v[key]['d'][0]:+.4f} ({v[key]['d'][1]:+.4f} to {v[key]['d'][2]:+.4f}) | {v[key]['verdict']}"
                 for key in ("clip", "fid")]
        lines.append(f"| {label[name]} | {' | '.join(cells)} |")
    same = sum(a == b for a, b in zip(facts["dclip"]["specs"], facts["alg1"]["specs"]))
    lines += ["", f"dCLIP alone removed the same blocks as Alg. 1 of the same seed in {same} of {k} seeds; the "
              f"start's blocks take {block_ms[0]:.2f} to {block_ms[1]:.2f} ms each (lookup table)" + (
                  ", too alike for the latency term to change which blocks go." if same == k else "."),
              "Copies (Alg. 1's A+, made by an evolving step that starts at or below the target): " + (", ".join(
                  f"{label[name]}, seed {s}: {' '.join(c)}" for name, f in facts.items()
                  for s, c in zip(cfg.seeds, f["copies"]) if c) or "none") + ".", "",
              *slim_lines(raw, cfg.seeds, sweep, facts["alg1"]),
              *supported(versus, keeps(facts, "alg1", "teacher", {"clip": cfg.clip_margin, "fid": cfg.fid_margin}),
                         facts, label, cfg), "",
              "![quality against latency](fig_evolving.png)", "", *cost_lines(done, page_s)]
    arms_plot({label[name]: {"ms": f["ms"], "clip": [s["clip"] for s in f["seeds"]],
                             "fid": [s["fid"] for s in f["seeds"]], "clip_ci": ci[name]["clip"],
                             "fid_ci": ci[name]["fid"]} for name, f in facts.items()},
              report / "fig_evolving.png", f"Alg. 1 and its baselines, {k} seeds each (mean, 95% interval)")
    atomic_write(report / "evolving.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return lines


def cost_lines(done: dict[str, float], page_s: float) -> list[str]:
    """Where the page comes from, and what each run (``done``: seconds, as arms.json records them) and the page cost."""
    return ["What this page is drawn from is in `arms/` beside it (each run's log, architecture and judging; the "
            "lookup table): `python recipe.py --bundled --arms` redraws the page from it and trains only the runs it "
            "lacks, on any machine.", "",
            f"Cost, as `arms/arms.json` records it: {sum(done.values()) / 60:.1f} min for {len(done)} runs (each arm "
            "and seed trained and judged, the teacher judged; "
            f"{', '.join(f'{n} {t / 60:.1f}' for n, t in done.items())} min) and {page_s / 60:.1f} min for this "
            "page (wall time on 2-core CPUs; a busy machine takes longer); it is not part of the recipe's 90 "
            "minutes."]


def slim_lines(raw: Path, seeds: tuple[int, ...], sweep: list[dict], alg1: dict) -> list[str]:
    """The slimming sweep (widths, parameters, latency measured beside the table's), and the fraction each seed's
    run chose, and why."""
    ms, params = sum(alg1["ms"]) / len(alg1["ms"]), sum(alg1["params"]) / len(alg1["params"])
    out = [f"Uniform slimming of the robust-trained UNet, timed with the table above (Alg. 1: {ms:.1f} ms, "
           f"{params / 1e6:.2f}M parameters):", "",
           "| kept fraction | widths | parameters | latency / step (ms) |", "|---|---|---|---|"]
    out += [f"| {r['ratio']:g} | {tuple(r['channels'])} | {r['params'] / 1e6:.2f}M | {r['measured_ms']:.1f} |"
            for r in sweep]
    logs = [json.loads((raw / f"slim{s}.json").read_text()) for s in seeds]
    chosen = sorted({f"{log['chosen']['ratio']:g} {tuple(log['chosen']['channels'])}" for log in logs})
    met = [log["chosen"]["measured_ms"] <= log["target_ms"] for log in logs]
    reason = ("the largest fraction that meets Alg. 1's latency" if all(met) else
              "the fraction of Alg. 1's parameter count: no fraction meets Alg. 1's latency — at this size a step's "
              "latency is mostly per-layer overhead, which narrower layers do not remove, while removing blocks "
              "does" if not any(met) else "by latency in some seeds and by parameter count in others")
    return out + ["", f"Chosen in the runs ({len(seeds)} seeds, each against its own Alg. 1): {', '.join(chosen)}, "
                  f"{reason}.", ""]


def start_line(starts: list[str]) -> str:
    """Whether every run started from the same weights (``starts``: the checksums of their start UNets)."""
    if len(starts) <= 1:
        return f"UNet checksum {starts[0]}, the same for every run" if starts else "no checksum recorded"
    return (f"{len(starts)} makings of it, UNet checksums {', '.join(starts)}: runs resumed elsewhere re-made it "
            "with the same code and seed, and its weights differ in rounding")


def latency_line(facts: dict, label: dict) -> str:
    """Which arms run at Alg. 1's latency (within 10% of its mean) and which do not: the headline's claim, row by
    row."""
    ms = lambda name: sum(facts[name]["ms"]) / len(facts[name]["ms"])  # noqa: E731
    ref = ms("alg1")
    near = [label[n] for n in facts if n not in ("alg1", "teacher") and abs(ms(n) / ref - 1) <= 0.1]
    off = [f"{label[n]} ({ms(n):.1f} ms)" for n in facts if n not in ("alg1", "teacher") and abs(ms(n) / ref - 1) > 0.1]
    return (f"Within 10% of Alg. 1's latency ({ref:.1f} ms a step): {', '.join(near) or 'none'}; further from it: "
            f"{', '.join(off) or 'none'}.")


def supported(versus: dict, kept: dict[str, bool], facts: dict, label: dict, cfg: ArmsConfig) -> list[str]:
    """The plain sentence: what the toy world supports about Alg. 1, from the verdicts and whether Alg. 1 keeps the
    teacher's quality (``kept``: per metric, ``keeps``)."""
    def names(key: str, verdict: str) -> str:
        found = [label[n] for n, v in versus.items() if n != "teacher" and v[key]["verdict"] == verdict]
        return ", ".join(found) or "none"

    teacher, word = versus["teacher"], {"better": "better", "worse": "worse", "tie": "tied (within the noise)"}
    speed = sum(facts["teacher"]["ms"]) / len(facts["teacher"]["ms"]) / (sum(facts["alg1"]["ms"]) /
                                                                        len(facts["alg1"]["ms"]))
    return [f"What the toy world supports. Beyond the noise, Alg. 1 beats in CLIP score: {names('clip', 'better')}; "
            f"in FID: {names('fid', 'better')}. It ties in CLIP score: {names('clip', 'tie')}; in FID: "
            f"{names('fid', 'tie')}. It loses in CLIP score to: {names('clip', 'worse')}; in FID to: "
            f"{names('fid', 'worse')}. Against the teacher it came from, at {speed:.1f}x lower latency, Alg. 1 is "
            f"{word[teacher['clip']['verdict']]} in CLIP score and {word[teacher['fid']['verdict']]} in FID. The "
            "paper's \"as good as the original\" (read as: Alg. 1's interval lies within a stated margin of the "
            f"teacher, CLIP {cfg.clip_margin:g} below it, FID {cfg.fid_margin:.0%} above it; a tie alone shows "
            f"nothing) {'holds' if all(kept.values()) else 'does not hold'} here (CLIP: "
            f"{'kept' if kept['clip'] else 'not shown'}, FID: {'kept' if kept['fid'] else 'not shown'}). What it "
            "does not support: anything about SD-v1.5's size, its latency (an iPhone's, for a UNet of 860M "
            f"parameters, not a CPU's for {facts['teacher']['params'][0] / 1e6:.1f}M) or its data; and "
            "differences smaller than the intervals above."]
