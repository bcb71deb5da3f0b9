"""Meng et al.'s w-conditioned student (arXiv 2210.03142; the paper's Table 2 and Fig. 6b comparator): the guidance
scale as a UNet input, against diffusers' UNet2DConditionModel with ``time_cond_proj_dim`` (LCM's w input), and what
the student is before training, how it samples, how it is distilled."""

import dataclasses

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel
from helpers import max_rel_err, randomize, tiny_pipeline

from snapfusion_min import diffusion as D
from snapfusion_min.arch import ArchSpec, tiny
from snapfusion_min.distill import TRAIN, DistillConfig, DistillRun, check_pair, distill
from snapfusion_min.export.diffusers_folder import save_diffusers
from snapfusion_min.formats.weights import apply_map, unet_source_key
from snapfusion_min.pipeline import read_pipeline
from snapfusion_min.unet import UNet, with_guidance_input

FAST = dataclasses.replace(TRAIN, train_steps=3, batch_size=2, lr=1e-3, warmup=0, ema_decay=None, save_every=10**6)


def test_w_input_equals_diffusers_time_cond_proj():
    """Our w embedding + projection = diffusers' cond_proj fed LCM's get_guidance_scale_embedding(w - 1)."""
    spec = dataclasses.replace(tiny(), guidance_embed=32)
    ref = randomize(UNet2DConditionModel(block_out_channels=spec.channels, cross_attention_dim=spec.context_dim,
                                         attention_head_dim=spec.heads, norm_num_groups=spec.groups,
                                         layers_per_block=2, time_cond_proj_dim=32), seed=2).eval()
    ours = UNet(spec).eval()
    apply_map(ours, ref.state_dict(), lambda k: [unet_source_key(k, "diffusers")], "UNet")
    z, c, w = torch.randn(3, 4, 16, 16), torch.randn(3, 77, spec.context_dim), torch.tensor([1.0, 2.5, 8.0])
    cond = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=32)
    with torch.no_grad():
        want = ref(z, 321, c, timestep_cond=cond).sample
        assert max_rel_err(ours(z, 321, c, w=w), want) < 1e-5
        assert max_rel_err(ours(z, 321, c, w=2.0), want) > 1e-3  # w matters
    assert ArchSpec.from_json(spec.to_json()) == spec


def test_zero_initialised_student_is_the_teacher_at_every_w():
    teacher = randomize(UNet(tiny()), seed=1).eval()
    student = with_guidance_input(teacher).eval()
    assert student.spec.guidance_embed == 256 and student.w_proj.weight.abs().max() == 0
    z, c = torch.randn(2, 4, 8, 8), torch.randn(2, 16, tiny().context_dim)
    with torch.no_grad():
        for w in (1.0, 2.0, torch.tensor([3.0, 14.0])):
            assert torch.equal(student(z, 500, c, w=w), teacher(z, 500, c))
    student.w_proj.weight.data.normal_()  # once trained, w changes the output
    with torch.no_grad():
        assert not torch.allclose(student(z, 500, c, w=4.0), teacher(z, 500, c))


class Counting(torch.nn.Module):
    def __init__(self, unet: UNet):
        super().__init__()
        self.unet, self.spec, self.calls = unet, unet.spec, []

    def forward(self, z, t, context, w=None):
        self.calls.append((z.shape[0], w))
        return self.unet(z, t, context, w=w)


def test_sampling_is_one_conditional_pass_per_step():
    """No CFG batch: each step is one UNet call on B latents with w = the guidance scale (half of CFG's work)."""
    pipe = tiny_pipeline()
    unet = with_guidance_input(pipe.unet)
    unet.w_proj.weight.data.normal_(std=0.1)
    counting = Counting(unet)
    wpipe = pipe.with_parts(unet=counting)
    z = torch.randn(2, 4, 8, 8)
    images = wpipe(["a red circle", "a blue square"], steps=4, guidance=3.0, latents=z, output_type="pt")
    assert counting.calls == [(2, 3.0)] * 4
    with pytest.warns(UserWarning, match="the negative prompt is not used"):
        wpipe(["a red circle"], steps=1, guidance=3.0, negative_prompt="blue", output_type="pt")
    context, grid = pipe.encode_prompts(["a red circle", "a blue square"]), D.timesteps(4, "trailing")
    solver = D.Solver("ddim", grid, pipe.schedule, "v")
    with torch.no_grad():
        for i, t in enumerate(grid[:-1]):
            z = solver.step(i, z, unet(z, t, context, w=3.0))
    torch.testing.assert_close(images, pipe.decode(z), rtol=0, atol=1e-6)


def test_distill_makes_a_w_conditioned_student_that_reloads(tmp_path):
    teacher_path, out = tmp_path / "teacher.safetensors", tmp_path / "student.safetensors"
    tiny_pipeline().save(teacher_path)
    run = DistillRun(chain=(8, 4), loss=DistillConfig(w_min=1.5, w_max=4.0, cfg_prob=1.0, w_conditioned=True),
                     train=FAST)
    distill(str(teacher_path), str(teacher_path), run, str(out))
    student = read_pipeline(out)
    assert student.unet.spec.guidance_embed == 256 and student.unet.w_proj.weight.abs().max() > 0  # it learned w
    assert student.training["loss"]["w_conditioned"] is True
    z, c = torch.randn(1, 4, 8, 8), student.encode_prompts(["a red circle"])
    with torch.no_grad():
        assert not torch.allclose(student.unet(z, 900, c, w=1.5), student.unet(z, 900, c, w=4.0))
    with pytest.raises(ValueError, match="distil it with --w-conditioned"):
        check_pair(tiny_pipeline(), student)
    with pytest.raises(ValueError, match="the teacher takes w as an input"):
        check_pair(student, tiny_pipeline(), True)
    with pytest.raises(ValueError, match="distilled in one stage"):
        DistillRun(chain=(8, 4, 2), loss=DistillConfig(w_conditioned=True)).stages()


def test_diffusers_folder_round_trip_keeps_the_w_input(tmp_path):
    """Saved as a diffusers folder, the w-conditioned UNet is diffusers' UNet2DConditionModel with time_cond_proj_dim
    (fed LCM's embedding of w - 1) and loads back as itself."""
    pipe = tiny_pipeline()
    pipe = pipe.with_parts(unet=with_guidance_input(pipe.unet, 32))
    pipe.unet.w_proj.weight.data.normal_(std=0.1)
    save_diffusers(pipe, tmp_path / "w")
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "w" / "unet").eval()
    again = read_pipeline(tmp_path / "w")
    assert theirs.config.time_cond_proj_dim == 32 and again.unet.spec.guidance_embed == 32
    z, c, w = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32), torch.tensor([2.0, 6.0])
    cond = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=32)
    with torch.no_grad():
        want = pipe.unet(z, 400, c, w=w)
        assert max_rel_err(theirs(z, 400, c, timestep_cond=cond).sample, want) < 1e-5
        assert max_rel_err(again.unet(z, 400, c, w=w), want) < 1e-5
    assert torch.equal(again.unet.w_proj.weight, pipe.unet.w_proj.weight)
