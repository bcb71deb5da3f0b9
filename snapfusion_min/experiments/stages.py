"""The recipe's stages in order, each a package call with the settings of the budget (``budget.py``).

toy CLIP -> autoencoder -> v-prediction teacher, the baseline (Eq. 6) -> robust training (Eq. 5) and its plain
control -> evolving to 50% of the latency (Alg. 1) -> 32->16 distillation of the teacher and of the evolved UNet ->
16->8 CFG-aware distillation of the evolved UNet by the 16-step teacher (§4.1, App. D) -> 50% pruned decoder by
data distillation (§3.2) -> the final pipeline -> Core ML. Each stage is skipped once done, as recorded in
<work>/recipe.json; the training stages resume exactly after a crash, the others start over. The students that
the paper's distillation claims compare (the loss ablations, Meng et al.'s, 3 seeds each) are trained outside it
(``distillation_claims``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from open_clip.model import CustomTextCLIP

from .. import decoder_distill, distill, unet_training
from ..evolve import TRAIN as ALG1_TRAIN
from ..evolve import EvolveConfig, evolve_and_finetune
from ..export.coreml import PARTS, export
from ..formats.checkpoint import atomic_write
from ..latency import LatencyTable, build_table
from ..pipeline import Pipeline, pick_device, read_pipeline
from ..toy import BUNDLED, autoencoder
from ..toy.clip import ClipConfig, load_toy_clip, toy_clip_scorer, train_clip_stage
from ..toy.tables import judge_on_heldout
from ..toy.teacher import fresh_pipeline
from ..training import Dist, TrainConfig
from .budget import G0, Budget

NAMES = ["clip", "autoencoder", "teacher", "robust", "plain", "evolved", "teacher16", "evolved16", "student8",
         "pruned0", "pruned", "final"]  # the checkpoints, in stage order
STAGES = (*NAMES, "coreml")


def paths(work: Path, bundled: bool) -> dict[str, Path]:
    p = {n: work / f"{n}.safetensors" for n in NAMES} | {"lut": work / "lut.json"}
    if bundled:
        p.update(clip=BUNDLED / "clip.safetensors", autoencoder=BUNDLED / "autoencoder.safetensors",
                 teacher=BUNDLED / "model.safetensors")
    return p


def stages(b: Budget, p: dict[str, Path], work: Path, bundled: bool,
           latency_table: Path | None = None) -> list[tuple[str, Callable]]:
    """(name, run) in order, each run a package call with the settings of the budget; ``latency_table``: a measured
    lookup table that evolving uses as is, not timed again (``evolve_stage``)."""
    d = Dist(device=pick_device("auto"))

    def resumable(name: str) -> bool:
        return Path(f"{p[name]}.state.pt").is_file()

    def unet(name: str, keep: float) -> Callable:
        t = b.batched(TrainConfig(train_steps=b.robust, lr=3e-4, warmup=unet_training.warmup_for(b.robust),
                                  save_every=250, resume=resumable(name)))
        return lambda: unet_training.train_unet(unet_training.UNetConfig(init=str(p["teacher"]), keep_prob=keep,
                                                                         train=t), str(p[name]), d)

    def distil(name: str, teacher: str, init: str, chain: tuple[int, int]) -> Callable:
        return lambda: distil_stage(b, p[teacher], p[init], p[name], chain, d)

    def decoder(name: str, steps: int) -> Callable:
        cfg = decoder_distill.DecoderConfig(latents=b.decoder.latents, teacher_steps=25, latent_cache=str(
            work / "latents.pt"), train=b.batched(replace(decoder_distill.TRAIN, train_steps=steps, lr=2e-3)))
        return lambda: decoder_distill.distill_decoder(str(p["teacher"]), cfg, str(p[name]), d)

    run: list[tuple[str, Callable]] = []
    if not bundled:
        teacher = unet_training.UNetConfig(clip=str(p["clip"]), autoencoder=str(p["autoencoder"]), train=b.batched(
            replace(unet_training.TRAIN, train_steps=b.scratch.teacher,
                    warmup=unet_training.warmup_for(b.scratch.teacher), resume=resumable("teacher"))))
        clip = ClipConfig(train_steps=b.scratch.clip, batch_size=b.batch or ClipConfig.batch_size)
        ae = autoencoder.AutoencoderConfig(train=b.batched(replace(autoencoder.TRAIN,
                                                                   train_steps=b.scratch.autoencoder)))
        run += [("clip", lambda: train_clip_stage(clip, p["clip"])),
                ("autoencoder", lambda: autoencoder.train_autoencoder(ae, str(p["autoencoder"]), d)),
                ("teacher", lambda: unet_training.train_unet(teacher, str(p["teacher"]), d, fresh=fresh_pipeline))]
    run += [("robust", unet("robust", 0.8)), ("plain", unet("plain", 1.0)),
            ("evolved", lambda: evolve_stage(b, p, latency_table)),
            ("teacher16", distil("teacher16", "teacher", "teacher", (32, 16))),
            ("evolved16", distil("evolved16", "evolved", "evolved", (32, 16))),
            ("student8", distil("student8", "teacher16", "evolved16", (16, 8))),
            ("pruned0", decoder("pruned0", 0)), ("pruned", decoder("pruned", b.decoder.steps)),
            ("final", lambda: final_pipeline(p)), ("coreml", lambda: coreml_stage(p["final"], work / "coreml"))]
    return run


def distil_stage(b: Budget, teacher: Path, init: Path, out: Path, chain: tuple[int, int], d: Dist,
                 cfg_prob: float = 0.1, cfg_range: tuple[float, float] | None = None, w_conditioned: bool = False,
                 seed: int = 0) -> None:
    """Distil ``teacher`` (its steps: ``chain[0]``) into ``init`` (at ``chain[1]``) by Eq. 11's loss with CFG
    probability ``cfg_prob`` and Eq. 10's w range (the budget's unless given); the student samples at G0 by default.
    ``seed`` draws every batch, timestep and w; a stopped run resumes."""
    lo, hi = cfg_range or b.distill.cfg_range
    loss = distill.DistillConfig(w_min=lo, w_max=hi, cfg_prob=cfg_prob, w_conditioned=w_conditioned)
    run = distill.DistillRun(chain=chain, loss=loss, guidance=G0, train=b.batched(replace(
        distill.TRAIN, train_steps=b.distill.steps, save_every=200, seed=seed,
        resume=Path(f"{out}.state.pt").is_file())))
    distill.distill(str(teacher), str(init), run, str(out), d)


def evolve_stage(b: Budget, p: dict[str, Path], frozen: Path | None = None) -> None:
    """Alg. 1 on the robust-trained UNet, with its lookup table (the report draws it: Fig. 2) and the toy CLIP as
    the scorer. The table is timed here, or is ``frozen``: read as it is, so that two runs evolve alike."""
    torch.manual_seed(0)
    pipe = read_pipeline(p["robust"])
    context_len, latent = pipe.text_encoder.cfg.context_length, pipe.sampler.resolution // pipe.vae.cfg.factor
    if frozen is None:
        table = build_table(pipe.unet, latent, 2, context_len, str(p["lut"]))
    else:
        table = LatencyTable.load(frozen)
        table.block_ms(pipe.unet.spec)  # KeyError here, before any work, if it lacks one of this UNet's blocks
        table.save(p["lut"])
    clip = load_toy_clip(BUNDLED / "clip.safetensors")
    judge = judge_on_heldout(clip, b.judge.prompts)
    log = evolve_and_finetune(str(p["robust"]), table, evolve_config(b), alg1_scorer(b, clip),
                              lambda pipe: judge(pipe, None, None), str(p["evolved"]))
    atomic_write(f"{p['evolved']}.log.json", lambda tmp: Path(tmp).write_text(json.dumps(log, indent=1)))


def evolve_config(b: Budget) -> EvolveConfig:
    """Alg. 1's settings in the budget (the recipe's evolving, and the arms of ``alg1_baselines`` compared with it)."""
    return EvolveConfig(target=b.evolve.target, iterations=b.evolve.iterations, actions=b.evolve.actions,
                        robust_steps=b.evolve.train, finetune_steps=b.evolve.finetune, train=b.batched(ALG1_TRAIN))


def alg1_scorer(b: Budget, clip: CustomTextCLIP) -> Callable[[Pipeline], float]:
    """Alg. 1's dCLIP scorer in the budget: the toy CLIP's score on its held-out prompts at its DDIM steps."""
    return toy_clip_scorer(clip, n=b.evolve.prompts, steps=b.evolve.score_steps)


def final_pipeline(p: dict[str, Path]) -> None:
    """The evolved, distilled 8-step UNet with the pruned decoder."""
    pipe, pruned = read_pipeline(p["student8"]), read_pipeline(p["pruned"])
    pipe.set_decoder(pruned.vae, pruned.latent_scale)
    pipe.save(p["final"])


def coreml_stage(checkpoint: Path, out: Path) -> None:
    pipe = read_pipeline(checkpoint)
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


