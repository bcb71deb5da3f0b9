"""The whole SnapFusion recipe at toy scale: every stage in order, each a package call with its config.

toy CLIP -> autoencoder -> v-prediction teacher, the baseline (Eq. 6) -> robust training (Eq. 5) and its plain
control -> evolving to 50% of the latency (Alg. 1) -> 32->16 distillation of the teacher and of the evolved UNet ->
16->8 CFG-aware distillation of the evolved UNet by the 16-step teacher (§4.1, App. D) and Meng et al.'s w-conditioned
student (Table 2, Fig. 6b) -> the 8-step student distilled directly to the few-step count where DDIM breaks (1 step in
the toy world), by the mixed loss and its ablations: vanilla, p = 0.5, CFG only, the paper's w range (Fig. 6c-d) ->
50% pruned decoder by data distillation (§3.2) -> the final pipeline -> Core ML -> report (``report.py``). Each stage
is skipped once done, as recorded in <work>/recipe.json; the training stages resume exactly after a crash, the others
start over.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import autoencoder, decoder_distill, distill, unet_training
from .checkpoint import atomic_write
from .evolve import EvolveConfig
from .pipeline import load_pipeline, pick_device
from .training import Dist, TrainConfig

TOY = Path(__file__).resolve().parent.parent / "models" / "toy"  # the bundled toy models
NAMES = ["clip", "autoencoder", "teacher", "robust", "plain", "evolved", "teacher16", "evolved16", "student8",
         "wcond8", "few_mixed", "few_vanilla", "few_half", "few_cfg", "few_paper_range", "pruned0", "pruned",
         "final"]  # the checkpoints, in stage order
STAGES = (*NAMES, "coreml")
FEW_STUDENTS = [("few_mixed", 0.1, None), ("few_vanilla", 0.0, None), ("few_half", 0.5, None),
                ("few_cfg", 1.0, None), ("few_paper_range", 0.1, (2.0, 14.0))]  # (name, p, w range or the budget's)


@dataclass(frozen=True)
class Budget:
    """Steps and sample counts of every stage."""

    clip: int = 1000
    autoencoder: int = 3000
    unet: int = 3500
    robust: int = 500
    evolve_target: float = 0.5  # of the start's predicted latency per step
    evolve_iterations: int = 4
    evolve_actions: int = 6
    evolve_train: int = 150
    evolve_finetune: int = 300
    evolve_n: int = 64
    distill: int = 600
    cfg_range: tuple[float, float] = (1.5, 4.0)  # Eq. 10's w range, around the toy world's best guidance (2)
    few_steps: int = 1  # where the toy teacher's DDIM breaks (FID 39 at 1 step vs 7 at 2, trailing grid)
    few_distill: int = 300  # steps of each 8 -> few_steps distillation
    few_guidance: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 5.0)
    ddim_steps: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 16, 50)  # the teacher's DDIM over steps (Fig. 4, right)
    decoder_latents: int = 1024
    decoder_steps: int = 2500
    eval_n: int = 200
    guidance: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0)
    repeat: int = 7


QUICK = Budget(clip=20, autoencoder=20, unet=40, robust=8, evolve_iterations=1, evolve_actions=3, evolve_train=4,
               evolve_finetune=4, evolve_n=8, distill=6, decoder_latents=16, decoder_steps=4, eval_n=16,
               guidance=(2.0,), repeat=1, few_distill=2, few_guidance=(2.0,), ddim_steps=(1, 2))


def few_students(b: Budget) -> list[tuple[str, float, tuple[float, float]]]:
    """The few-step students as (stage, p of Eq. 11, w range of Eq. 10), the budget's range where none is given."""
    return [(name, prob, w_range or b.cfg_range) for name, prob, w_range in FEW_STUDENTS]


def paths(work: Path, bundled: bool) -> dict[str, Path]:
    p = {n: work / f"{n}.safetensors" for n in NAMES} | {"lut": work / "lut.json"}
    if bundled:
        p.update(clip=TOY / "clip.safetensors", autoencoder=TOY / "autoencoder.safetensors",
                 teacher=TOY / "model.safetensors")
    return p


def stages(b: Budget, p: dict[str, Path], work: Path, bundled: bool) -> list[tuple[str, Callable]]:
    """(name, run) in order, each run a package call with the settings of the budget."""
    from .toyclip import ClipConfig, train_clip_stage

    d = Dist(device=pick_device("auto"))

    def resumable(name: str) -> bool:
        return Path(f"{p[name]}.state.pt").is_file()

    def unet(name: str, keep: float) -> Callable:
        t = TrainConfig(train_steps=b.robust, lr=3e-4, warmup=unet_training.warmup_for(b.robust), save_every=250,
                        resume=resumable(name))
        return lambda: unet_training.train_unet(unet_training.UNetConfig(init=str(p["teacher"]), keep_prob=keep,
                                                                         train=t), str(p[name]), d)

    def distil(name: str, teacher: str, init: str, chain: tuple[int, int], cfg_prob: float = 0.1,
               cfg_range: tuple[float, float] = b.cfg_range, w_conditioned: bool = False,
               steps: int = b.distill) -> Callable:
        loss = distill.DistillConfig(w_min=cfg_range[0], w_max=cfg_range[1], cfg_prob=cfg_prob,
                                     w_conditioned=w_conditioned)
        run = distill.DistillRun(chain=chain, loss=loss, guidance=2.0, train=replace(
            distill.TRAIN, train_steps=steps, save_every=200, resume=resumable(name)))
        return lambda: distill.distill(str(p[teacher]), str(p[init]), run, str(p[name]), d)

    def decoder(name: str, steps: int) -> Callable:
        cfg = decoder_distill.DecoderConfig(latents=b.decoder_latents, teacher_steps=25, latent_cache=str(
            work / "latents.pt"), train=replace(decoder_distill.TRAIN, train_steps=steps, lr=2e-3))
        return lambda: decoder_distill.distill_decoder(str(p["teacher"]), cfg, str(p[name]), d)

    run: list[tuple[str, Callable]] = []
    if not bundled:
        teacher = unet_training.UNetConfig(clip=str(p["clip"]), autoencoder=str(p["autoencoder"]), train=replace(
            unet_training.TRAIN, train_steps=b.unet, warmup=unet_training.warmup_for(b.unet),
            resume=resumable("teacher")))
        run += [("clip", lambda: train_clip_stage(ClipConfig(train_steps=b.clip), p["clip"])),
                ("autoencoder", lambda: autoencoder.train_autoencoder(autoencoder.AutoencoderConfig(
                    train=replace(autoencoder.TRAIN, train_steps=b.autoencoder)), str(p["autoencoder"]), d)),
                ("teacher", lambda: unet_training.train_unet(teacher, str(p["teacher"]), d))]
    run += [("robust", unet("robust", 0.8)), ("plain", unet("plain", 1.0)),
            ("evolved", lambda: evolve_stage(b, p)),
            ("teacher16", distil("teacher16", "teacher", "teacher", (32, 16))),
            ("evolved16", distil("evolved16", "evolved", "evolved", (32, 16))),
            ("student8", distil("student8", "teacher16", "evolved16", (16, 8))),
            ("wcond8", distil("wcond8", "teacher16", "evolved16", (16, 8), 1.0, w_conditioned=True)),
            *[(name, distil(name, "student8", "student8", (8, b.few_steps), prob, w_range, steps=b.few_distill))
              for name, prob, w_range in few_students(b)],
            ("pruned0", decoder("pruned0", 0)), ("pruned", decoder("pruned", b.decoder_steps)),
            ("final", lambda: final_pipeline(p)), ("coreml", lambda: coreml_stage(p["final"], work / "coreml"))]
    return run


def evolve_stage(b: Budget, p: dict[str, Path]) -> None:
    """Alg. 1 on the robust-trained UNet, with its lookup table (the report draws it: Fig. 2) and the toy CLIP as
    the scorer."""
    from .evaluation import judge_on_heldout
    from .evolve import evolve_and_finetune
    from .latency import build_table
    from .toyclip import load_toy_clip, toy_clip_scorer

    torch.manual_seed(0)
    pipe = load_pipeline(p["robust"])
    context_len, latent = pipe.text_encoder.cfg.context_length, pipe.sampler.resolution // pipe.vae.cfg.factor
    table = build_table(pipe.unet, latent, 2, context_len, str(p["lut"]))
    clip = load_toy_clip(TOY / "clip.safetensors")
    judge = judge_on_heldout(clip, b.eval_n)
    log = evolve_and_finetune(str(p["robust"]), table, evolve_config(b), toy_clip_scorer(clip, n=b.evolve_n),
                              lambda pipe: judge(pipe, None, None), str(p["evolved"]))
    atomic_write(f"{p['evolved']}.log.json", lambda tmp: Path(tmp).write_text(json.dumps(log, indent=1)))


def evolve_config(b: Budget) -> EvolveConfig:
    """Alg. 1's settings in the budget (the recipe's evolving, and the arms of ``evolve_arms`` compared with it)."""
    return EvolveConfig(target=b.evolve_target, iterations=b.evolve_iterations, actions=b.evolve_actions,
                        robust_steps=b.evolve_train, finetune_steps=b.evolve_finetune)


def final_pipeline(p: dict[str, Path]) -> None:
    """The evolved, distilled 8-step UNet with the pruned decoder."""
    pipe, pruned = load_pipeline(p["student8"]), load_pipeline(p["pruned"])
    pipe.set_decoder(pruned.vae, pruned.latent_scale)
    pipe.save(p["final"])


def coreml_stage(checkpoint: Path, out: Path) -> None:
    from .coreml import PARTS, export

    pipe = load_pipeline(checkpoint)
    export(pipe, out, list(PARTS), resolution=pipe.sampler.resolution, batch=2)


def run_stages(todo: list[tuple[str, Callable]], record_path: Path, settings: dict,
               redo: tuple[str, ...] = ()) -> dict:
    """Run each stage not yet done, as recorded (wall and CPU seconds) in ``record_path``, a JSON file made for
    ``settings`` (a record of other settings is refused); returns the record."""
    unknown = set(redo) - {name for name, _ in todo}
    if unknown:
        raise ValueError(f"--redo: no such stage {sorted(unknown)}; stages are {[name for name, _ in todo]}")
    settings = json.loads(json.dumps(settings))
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"done": {}, "budget": settings}
    if record["budget"] != settings:
        raise ValueError(f"{record_path.parent} holds a run with another budget (--quick or not); use another "
                         "--work-dir")
    for name, run in todo:
        if name in record["done"] and name not in redo:
            print(f"[recipe] {name}: done ({record['done'][name] / 60:.1f} min), skipped")
            continue
        print(f"[recipe] {name} ...", flush=True)
        start, cpu = time.perf_counter(), time.process_time()
        run()
        record["done"][name] = time.perf_counter() - start
        record.setdefault("cpu", {})[name] = time.process_time() - cpu  # all threads of this process
        atomic_write(record_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


def run_recipe(b: Budget, work: Path, report: Path, bundled: bool = False, redo: tuple[str, ...] = (),
               quick: bool = False, arms: bool = False) -> dict:
    """Every stage not yet done, then the report; returns the report's verdict (speed-up, CLIP, FID ratio).
    With ``arms``: the stages up to evolving, then Alg. 1 against its baselines (``evolve_arms``: report/evolving.md,
    whose lines are returned as 'page')."""
    work.mkdir(parents=True, exist_ok=True)
    report.mkdir(parents=True, exist_ok=True)
    p = paths(work, bundled)
    todo = stages(b, p, work, bundled)
    if arms:
        from .evolve_arms import QUICK_ARMS, ArmsConfig, run_arms

        todo = todo[:[name for name, _ in todo].index("evolved") + 1]
        run_stages(todo, work / "recipe.json", dataclasses.asdict(b), redo)
        return {"page": run_arms(b, QUICK_ARMS if quick else ArmsConfig(), p, work / "arms", report)}
    from .report import write_report

    record = run_stages(todo, work / "recipe.json", dataclasses.asdict(b), redo)
    return write_report(b, p, report, dict(record["done"]), quick, record.get("cpu", {}))
