"""Back to diffusers: a pipeline written as a diffusers folder (``StableDiffusionPipeline.from_pretrained``).

The weights go through the key tables of ``weights`` backwards (``to_diffusers``), so a checkpoint made here -- a
v-prediction fine-tune, a distilled SD-v1.5 student, a decoder fine-tune -- can be used by diffusers' tools. Only what
diffusers' classes can express is written:
  * each stage of the UNet must have SD-v1.5's blocks or its ResNets alone (any widths): ``UNet2DConditionModel``
    builds a stage as a cross-attention block (``CrossAttn{Down,Up}Block2D``: R A R A down, R A R A R A up) or a
    plain one (``{Down,Up}Block2D``: R R, R R R) and its middle as SD's R A R, so the toy world's UNet (``arch.toy``)
    is written, and an evolved spec such as Table 3's has no diffusers config;
  * the VAE decoder must mirror the encoder: ``AutoencoderKL`` has one ``block_out_channels`` for both, so a pruned
    decoder (§3.2) cannot be written;
  * the scheduler is DDIM (Eq. 2) with the checkpoint's grid and prediction type; the number of steps and the guidance
    scale are arguments of the call in diffusers (``num_inference_steps``, ``guidance_scale``), not of the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file

from ..arch import DOWN_STAGES, STAGES, UP_STAGES, ArchSpec
from ..formats.checkpoint import full_disk_said, umask
from ..formats.weights import to_diffusers, unet_block_types
from ..text_encoder import EOT, SOT, write_bpe_files

if TYPE_CHECKING:
    from ..pipeline import Pipeline

DIFFUSERS_VERSION = "0.42.1"  # the version whose folder layout this writes (and the tests load it with)


class NotExpressible(ValueError):
    """A pipeline part that diffusers' classes cannot represent."""


def block_types(spec: ArchSpec) -> tuple[list[str], list[str]]:
    """diffusers' ``down_block_types`` and ``up_block_types`` of ``spec``; NotExpressible naming the stages that have
    none."""
    kinds = unet_block_types(spec)
    differ = [f"{s} is {' '.join(spec.stages[s]) or 'empty'}" for s in STAGES if kinds[s] is None]
    if differ:
        raise NotExpressible("diffusers' UNet2DConditionModel has SD-v1.5's blocks or its ResNets alone in each stage "
                             f"and cannot express this architecture spec ({'; '.join(differ[:3])}"
                             f"{'; ...' if len(differ) > 3 else ''})")
    return [kinds[s] for s in DOWN_STAGES], [kinds[s] for s in UP_STAGES]


def check_expressible(pipe: Pipeline) -> None:
    """NotExpressible, saying why, unless every part has a diffusers equivalent."""
    block_types(pipe.unet.spec)
    if pipe.unet.removed:
        raise NotExpressible(f"blocks {sorted(pipe.unet.removed)} are switched off (run as the identity); diffusers' "
                             "UNet has no such switch")
    cfg = pipe.vae.cfg
    if tuple(reversed(cfg.channels)) != cfg.decoder_channels or cfg.decoder_groups != cfg.groups:
        raise NotExpressible("diffusers' AutoencoderKL has one width per level for encoder and decoder; this "
                             f"decoder's widths {list(cfg.decoder_channels)} (groups {cfg.decoder_groups}) do not "
                             f"mirror the encoder's {list(cfg.channels)} (groups {cfg.groups}): pruned (§3.2)")


def configs(pipe: Pipeline) -> dict[str, dict]:
    """config.json of each part, scheduler_config.json and the tokenizer's files, as diffusers' classes read them."""
    spec, v, t, s = pipe.unet.spec, pipe.vae.cfg, pipe.text_encoder.cfg, pipe.sampler
    levels, (down, up) = len(v.channels), block_types(spec)
    unet = {"_class_name": "UNet2DConditionModel", "sample_size": s.resolution // 2 ** (levels - 1),
            "in_channels": spec.in_channels, "out_channels": spec.out_channels, "layers_per_block": 2,
            "block_out_channels": list(spec.channels), "cross_attention_dim": spec.context_dim,
            "attention_head_dim": spec.heads,  # SD-v1's name for the number of heads
            "time_cond_proj_dim": spec.guidance_embed or None,  # a w-conditioned UNet's w input (LCM's name)
            "norm_num_groups": spec.groups, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
            "down_block_types": down, "up_block_types": up}
    vae = {"_class_name": "AutoencoderKL", "sample_size": s.resolution, "in_channels": v.image_channels,
           "out_channels": v.image_channels, "latent_channels": v.latent_channels,
           "block_out_channels": list(v.channels), "layers_per_block": v.layers,
           "norm_num_groups": v.groups, "act_fn": "silu",
           "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
           "scaling_factor": pipe.latent_scale}
    text = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": t.width,
            "intermediate_size": 4 * t.width, "num_attention_heads": t.heads, "num_hidden_layers": t.layers,
            "max_position_embeddings": t.context_length, "vocab_size": t.vocab_size, "layer_norm_eps": 1e-5,
            "hidden_act": "quick_gelu" if t.quick_gelu else "gelu", "bos_token_id": SOT, "eos_token_id": EOT}
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False, "steps_offset": 1,
                 "prediction_type": {"eps": "epsilon", "v": "v_prediction"}[pipe.prediction],
                 "timestep_spacing": s.spacing,
                 "set_alpha_to_one": s.spacing == "trailing"}  # the trailing grid's last step lands on clean data
    tokens = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>"}  # SD pads with EOT (see text_encoder.Tokenizer)
    tokenizer = {"tokenizer_class": "CLIPTokenizer", "model_max_length": t.context_length, "do_lower_case": True,
                 **tokens}
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    return {"model_index.json": index, "unet/config.json": unet, "vae/config.json": vae,
            "text_encoder/config.json": text, "scheduler/scheduler_config.json": scheduler,
            "tokenizer/tokenizer_config.json": tokenizer, "tokenizer/special_tokens_map.json": tokens}


def save_diffusers(pipe: Pipeline, folder: str | Path) -> Path:
    """Write ``pipe`` as a diffusers folder (float32 weights); NotExpressible if a part has no diffusers equivalent.

    The folder must not exist yet or be empty (nothing is overwritten); it is filled beside it and renamed into place,
    so a crash leaves no half-written folder.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not an empty folder; choose a new one")
    check_expressible(pipe)
    unet, vae, text = ({k: v.float() for k, v in part.items()} for part in to_diffusers(pipe.unet, pipe.vae,
                                                                                        pipe.text_encoder))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        for name, config in configs(pipe).items():
            (tmp / name).parent.mkdir(exist_ok=True)
            (tmp / name).write_text(json.dumps(config, indent=2) + "\n")
        with full_disk_said(folder.parent, folder.name):
            save_file(unet, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
            save_file(vae, str(tmp / "vae" / "diffusion_pytorch_model.safetensors"))
            save_file(text, str(tmp / "text_encoder" / "model.safetensors"))
            write_bpe_files(tmp / "tokenizer")
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700; a new folder's usual mode
        if folder.is_dir():
            folder.rmdir()  # empty, checked above
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder

