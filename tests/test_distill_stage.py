"""The distillation stage in-process on tiny models (fast): a progressive chain, what the student keeps, and the
refusals of ``DistillRun`` and ``check_pair`` with their exact messages."""

import dataclasses
import hashlib
import json
import re

import pytest
import torch
from helpers import randomize, tiny_pipeline

from snapfusion_min import distill as distill_module
from snapfusion_min.distill import TRAIN, DistillConfig, DistillRun, check_pair, distill
from snapfusion_min.pipeline import SamplerConfig, read_pipeline
from snapfusion_min.text_encoder import TextConfig, TextEncoder

FAST = dataclasses.replace(TRAIN, train_steps=2, batch_size=2, lr=1e-3, warmup=0, ema_decay=None, save_every=10**6)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(pipe) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in pipe.unet.parameters()])


def test_progressive_chain_saves_each_student_with_its_own_sampler(tmp_path):
    teacher_path, out = tmp_path / "teacher.safetensors", tmp_path / "student.safetensors"
    tiny_pipeline(sampler=SamplerConfig(steps=50, guidance=3.0, spacing="leading", resolution=64)).save(teacher_path)
    before = digest(teacher_path)
    run = DistillRun(chain=(8, 4, 2), loss=DistillConfig(w_min=1.5, w_max=3.0, cfg_prob=0.5), guidance=2.5,
                     train=FAST)
    returned = distill(str(teacher_path), str(teacher_path), run, str(out))
    stage = tmp_path / "student.safetensors.stage4.safetensors"
    final, middle, teacher = read_pipeline(out), read_pipeline(stage), read_pipeline(teacher_path)
    assert digest(teacher_path) == before  # the teacher is read, never written
    assert final.sampler == SamplerConfig(steps=2, guidance=2.5, spacing="trailing", resolution=64, distilled=True)
    assert middle.sampler == dataclasses.replace(final.sampler, steps=4)
    assert final.training == json.loads(json.dumps(dataclasses.asdict(run) | {"stage": "DistillRun"}))
    assert final.prediction == "v" and final.unet.spec == teacher.unet.spec
    w_teacher, w_middle, w_final = weights(teacher), weights(middle), weights(final)
    assert not torch.equal(w_middle, w_teacher) and not torch.equal(w_final, w_middle)
    assert torch.equal(weights(returned), w_final)


def test_guidance_defaults_to_the_teachers_and_stop_after_returns_early(tmp_path):
    teacher_path, out = tmp_path / "teacher.safetensors", tmp_path / "student.safetensors"
    tiny_pipeline().save(teacher_path)  # its sampler's guidance: 3.0
    student = distill(str(teacher_path), str(teacher_path), DistillRun(chain=(8, 4), train=FAST), str(out))
    assert student.sampler.guidance == 3.0 and read_pipeline(out).sampler.guidance == 3.0
    out.unlink()
    run = DistillRun(chain=(8, 4, 2), train=dataclasses.replace(FAST, stop_after=1))
    distill(str(teacher_path), str(teacher_path), run, str(out))
    assert not out.exists()  # stopped inside the first stage: only its (resumable) checkpoint is written
    assert (tmp_path / "student.safetensors.stage4.safetensors").is_file()


def test_distill_run_stages_and_refusals():
    loss = DistillConfig(w_min=1.5, w_max=4.0, cfg_prob=0.3, gamma=0.1)
    stages = DistillRun(chain=(64, 32, 16, 8), loss=loss).stages()
    assert stages == [dataclasses.replace(loss, teacher_steps=a, student_steps=b)
                      for a, b in ((64, 32), (32, 16), (16, 8))]
    assert [s.k for s in stages] == [2, 2, 2] and DistillConfig(teacher_steps=32, student_steps=8).k == 4
    for run, message in (
        (DistillRun(train=dataclasses.replace(FAST, train_steps=0)), "train-steps must be >= 1, got 0"),
        (DistillRun(guidance=0.5), "guidance must be a finite number >= 1, got 0.5"),
        (DistillRun(guidance=float("nan")), "guidance must be a finite number >= 1, got nan"),
        (DistillRun(chain=(8,)), "a distillation chain needs at least two step counts, got (8,)"),
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            run.stages()
    assert DistillRun(guidance=1.0).stages() and DistillRun(train=dataclasses.replace(FAST, train_steps=1)).stages()


@pytest.mark.parametrize("cfg,message", [
    (dict(teacher_steps=16, student_steps=6), "the student's steps (6) must divide the teacher's (16)"),
    (dict(teacher_steps=16, student_steps=0), "the student's steps (0) must divide the teacher's (16)"),
    (dict(teacher_steps=8, student_steps=8), "the teacher needs more steps than the student"),
    (dict(teacher_steps=2000, student_steps=8), "the teacher's steps must be at most 1000, got 2000"),
    (dict(w_min=0.5), "CFG range must satisfy 1 <= w_min <= w_max < inf, got [0.5, 14.0]"),
    (dict(w_min=5.0, w_max=4.0), "CFG range must satisfy 1 <= w_min <= w_max < inf, got [5.0, 4.0]"),
    (dict(w_max=float("inf")), "CFG range must satisfy 1 <= w_min <= w_max < inf, got [2.0, inf]"),
    (dict(cfg_prob=1.5), "cfg_prob must be in [0, 1], got 1.5"),
    (dict(cfg_prob=-0.1), "cfg_prob must be in [0, 1], got -0.1"),
    (dict(gamma=-1.0), "gamma must be a finite number >= 0, got -1.0"),
    (dict(gamma=float("inf")), "gamma must be a finite number >= 0, got inf"),
])
def test_distill_config_refusals(cfg, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        DistillConfig(**cfg)


def test_distill_config_edges_are_accepted():
    for cfg in (dict(w_min=1.0, w_max=1.0), dict(cfg_prob=0.0), dict(cfg_prob=1.0), dict(gamma=0.0),
                dict(teacher_steps=1000, student_steps=500), dict(teacher_steps=2, student_steps=1)):
        DistillConfig(**cfg)


def test_check_pair_refuses_what_cannot_be_distilled():
    v, eps = tiny_pipeline(), tiny_pipeline(prediction="eps")
    check_pair(v, tiny_pipeline(seed=3))  # same shapes, other weights: fine
    text = randomize(TextEncoder(TextConfig(width=32, layers=2, heads=2, context_length=16)), 5)
    for teacher, student, message in (
        (eps, v, "teacher and student must both be v-prediction models (§4.1), got teacher 'eps' and student 'v'; "
                 "fine-tune to v with train.py"),
        (v, eps, "teacher and student must both be v-prediction models (§4.1), got teacher 'v' and student 'eps'; "
                 "fine-tune to v with train.py"),
        (v, tiny_pipeline(context=64), "text-encoder widths differ: teacher 32, student 64"),
        (v, v.with_parts(text_encoder=text), "teacher and student must share the text encoder and the latent space"),
        (v, tiny_pipeline(latent_scale=0.3), "teacher and student must share the text encoder and the latent space"),
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            check_pair(teacher, student)


def test_each_iteration_gets_the_empty_prompt_as_uncond_and_its_stage_config(tmp_path, monkeypatch):
    teacher_path = tmp_path / "teacher.safetensors"
    teacher = tiny_pipeline()
    teacher.save(teacher_path)
    calls, original = [], distill_module.distill_loss

    def spy(student, teacher_unet, x0, context, uncond, cfg, schedule, **kw):
        calls.append((uncond, cfg))
        return original(student, teacher_unet, x0, context, uncond, cfg, schedule, **kw)

    monkeypatch.setattr(distill_module, "distill_loss", spy)
    run = DistillRun(chain=(8, 4), loss=DistillConfig(cfg_prob=0.7, w_max=5.0), train=FAST)
    distill(str(teacher_path), str(teacher_path), run, str(tmp_path / "s.safetensors"))
    with torch.no_grad():
        empty = teacher.encode_prompts([""])
    assert len(calls) == 2
    for uncond, cfg in calls:
        assert uncond.shape == (2, *empty.shape[1:]) and torch.equal(uncond, empty.expand_as(uncond))
        assert cfg == run.stages()[0]


def test_resume_refuses_a_state_of_another_configuration(tmp_path):
    teacher_path, out = tmp_path / "teacher.safetensors", tmp_path / "s.safetensors"
    tiny_pipeline().save(teacher_path)
    first = DistillRun(chain=(8, 4), train=dataclasses.replace(FAST, stop_after=1))
    distill(str(teacher_path), str(teacher_path), first, str(out))
    other = DistillRun(chain=(8, 4), loss=DistillConfig(cfg_prob=0.5), train=dataclasses.replace(FAST, resume=True))
    with pytest.raises(ValueError, match=r"is of another run \(loss.cfg_prob 0.1 -> 0.5\); refusing to resume"):
        distill(str(teacher_path), str(teacher_path), other, str(out))
    same = DistillRun(chain=(8, 4), train=dataclasses.replace(FAST, resume=True))
    distill(str(teacher_path), str(teacher_path), same, str(out))
    assert read_pipeline(out).sampler.steps == 4
