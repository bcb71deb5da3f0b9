"""Published SD-v1.5 weights -> our modules, by one key-mapping table per model.

Formats: the original LDM single file (``.safetensors`` / ``.ckpt``: ``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``) and a diffusers folder (``unet/``, ``vae/``,
``text_encoder/``). Each of our parameter keys is translated to its source key by a block-prefix table plus a
short table of inner renames; ``apply_map`` then checks that every source key was used and every target filled,
with the shapes right, and names the offending keys in one error. The listed exceptions are:
  * VAE mid-block attention: LDM stores q, k, v, proj_out as 1x1 convs [C, C, 1, 1]; we use linears [C, C];
  * CLIP attention: transformers has separate q/k/v projections, open_clip one fused ``in_proj`` (q; k; v);
  * ignored source keys: CLIP's ``position_ids`` buffer, LDM's schedule buffers and (unless asked for) EMA copies.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from ..arch import DOWN_STAGES, LEVEL, STAGES, UP_STAGES, ArchSpec, sd15


class CheckpointError(ValueError):
    """A weights file that cannot be used: missing / unexpected / mis-shaped keys, corrupt or unsafe file."""


# ---- UNet -------------------------------------------------------------------------------------------------------
DIFFUSERS_STAGE = {
    "down1": "down_blocks.0", "down2": "down_blocks.1", "down3": "down_blocks.2", "mid_down": "down_blocks.3",
    "mid": "mid_block", "mid_up": "up_blocks.0", "up1": "up_blocks.1", "up2": "up_blocks.2", "up3": "up_blocks.3",
}


def _block_kinds(stage: str) -> dict[tuple[str, ...], str]:
    """diffusers' block type of a stage by its blocks: SD-v1.5's (with cross-attention), or its ResNets alone."""
    full = sd15().stages[stage]
    plain = tuple(b for b in full if b[0] == "R")
    if stage not in DOWN_STAGES + UP_STAGES:
        return {full: "UNetMidBlock2DCrossAttn"}
    cross, bare = ("CrossAttnDownBlock2D", "DownBlock2D") if stage in DOWN_STAGES else ("CrossAttnUpBlock2D",
                                                                                       "UpBlock2D")
    return {full: cross if full != plain else bare, plain: bare}


def unet_block_types(spec: ArchSpec) -> dict[str, str | None]:
    """Each stage's block type in diffusers' ``UNet2DConditionModel`` (``down_block_types``, ``up_block_types``, the
    mid block), None where it has none: diffusers builds a stage with SD-v1.5's blocks or with its ResNets alone."""
    return {s: _block_kinds(s).get(spec.stages[s]) for s in STAGES}


def unet_stages(down_block_types: list[str] | None, up_block_types: list[str] | None) -> dict[str, tuple | None]:
    """The stages of a diffusers UNet config's block types (None: SD-v1.5's), None for a type it cannot be: the
    inverse of ``unet_block_types``."""
    sd = unet_block_types(sd15())
    down, up = down_block_types or [sd[s] for s in DOWN_STAGES], up_block_types or [sd[s] for s in UP_STAGES]
    if len(down) != len(DOWN_STAGES) or len(up) != len(UP_STAGES):
        return dict.fromkeys(STAGES)
    types = {**sd, **dict(zip(DOWN_STAGES, down)), **dict(zip(UP_STAGES, up))}
    return {s: next((blocks for blocks, kind in _block_kinds(s).items() if kind == types[s]), None) for s in STAGES}


UNET_TOP = {  # ours -> (diffusers, LDM)
    "conv_in": ("conv_in", "input_blocks.0.0"),
    "time_embed.0": ("time_embedding.linear_1", "time_embed.0"),
    "time_embed.2": ("time_embedding.linear_2", "time_embed.2"),
    "w_proj": ("time_embedding.cond_proj", None),  # a w-conditioned UNet (LCM's time_cond_proj_dim); not in SD-v1 files
    "norm_out": ("conv_norm_out", "out.0"),
    "conv_out": ("conv_out", "out.2"),
}
RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# Our cross-attention block flattens SD's single BasicTransformerBlock; the names are otherwise diffusers'/LDM's.
ATTN_INNER = {"attn1.to_out": "attn1.to_out.0", "attn2.to_out": "attn2.to_out.0",
              "ff_in": "ff.net.0.proj", "ff_out": "ff.net.2"}
ATTN_OUTER = ("norm", "proj_in", "proj_out")  # these stay outside transformer_blocks.0


def _attn_inner(name: str) -> str:
    return name if name in ATTN_OUTER else "transformer_blocks.0." + ATTN_INNER.get(name, name)


def _ldm_block(stage: str, name: str) -> str:
    """LDM's input_blocks / middle_block / output_blocks address of one SD-v1.5 block (R_j, A_j, or a resampler)."""
    if stage == "mid":
        return f"middle_block.{ {'R0': 0, 'A0': 1, 'R1': 2}[name] }"
    if stage in DOWN_STAGES:
        first = 1 + 3 * LEVEL[stage]  # input_blocks.0 is conv_in; each level has 2 layers + a downsampler
        if name == "downsample":
            return f"input_blocks.{first + 2}.0.op"
        return f"input_blocks.{first + int(name[1:])}.{0 if name[0] == 'R' else 1}"
    first = 3 * UP_STAGES.index(stage)  # output_blocks: 3 layers per level; R at .0, A at .1, upsampler last
    if name == "upsample":
        return f"output_blocks.{first + 2}.{2 if stage != 'mid_up' else 1}.conv"
    return f"output_blocks.{first + int(name[1:])}.{0 if name[0] == 'R' else 1}"


def unet_source_key(key: str, fmt: str) -> str:
    """Our UNet parameter key -> its name in 'diffusers' or 'ldm' format (SD-v1.5 layout)."""
    module, param = key.rsplit(".", 1)
    for ours, theirs in UNET_TOP.items():
        if module == ours:
            name = theirs[0] if fmt == "diffusers" else theirs[1]
            if name is None:
                raise CheckpointError(f"{key}: the SD-v1 single-file format has no such weight")
            return f"{name}.{param}"
    _, stage, block, *rest = module.split(".")
    inner = ".".join(rest)
    if fmt == "diffusers":
        if block in ("downsample", "upsample"):
            return f"{DIFFUSERS_STAGE[stage]}.{block}rs.0.conv.{param}"
        group = "resnets" if block[0] == "R" else "attentions"
        prefix = f"{DIFFUSERS_STAGE[stage]}.{group}.{block[1:]}"
    else:
        prefix = _ldm_block(stage, block)
        if block in ("downsample", "upsample"):
            return f"{prefix}.{param}"
    inner = RESNET_LDM.get(inner, inner) if (block[0] == "R" and fmt == "ldm") else inner
    inner = _attn_inner(inner) if block[0] == "A" else inner
    return f"{prefix}.{inner}.{param}"


# ---- VAE --------------------------------------------------------------------------------------------------------
def _ldm_up(m: re.Match) -> str:  # LDM numbers the decoder's levels from the finest (up.3 runs first)
    return f"decoder.up.{3 - int(m[1])}.{'block.' + m[3] if m[2] == 'res' else 'upsample.conv'}"


VAE_RULES = [  # (our module path, diffusers' AutoencoderKL, LDM's first_stage_model); SD-v1's 4 levels
    (r"decoder\.post_quant_conv", "post_quant_conv", "post_quant_conv"),
    (r"encoder\.quant_conv", "quant_conv", "quant_conv"),
    (r"(\w+)\.norm_out", r"\1.conv_norm_out", r"\1.norm_out"),
    (r"(\w+)\.mid\.res1", r"\1.mid_block.resnets.0", r"\1.mid.block_1"),
    (r"(\w+)\.mid\.res2", r"\1.mid_block.resnets.1", r"\1.mid.block_2"),
    (r"(\w+)\.mid\.attn\.norm", r"\1.mid_block.attentions.0.group_norm", r"\1.mid.attn_1.norm"),
    (r"(\w+)\.mid\.attn\.to_(q|k|v)", r"\1.mid_block.attentions.0.to_\2", r"\1.mid.attn_1.\2"),
    (r"(\w+)\.mid\.attn\.to_out", r"\1.mid_block.attentions.0.to_out.0", r"\1.mid.attn_1.proj_out"),
    (r"encoder\.levels\.(\d)\.res\.(\d)", r"encoder.down_blocks.\1.resnets.\2", r"encoder.down.\1.block.\2"),
    (r"encoder\.levels\.(\d)\.downsample", r"encoder.down_blocks.\1.downsamplers.0.conv",
     r"encoder.down.\1.downsample.conv"),
    (r"decoder\.levels\.(\d)\.(res)\.(\d)", r"decoder.up_blocks.\1.resnets.\3", _ldm_up),
    (r"decoder\.levels\.(\d)\.(upsample)()", r"decoder.up_blocks.\1.upsamplers.0.conv", _ldm_up),
    (r"(\w+)\.conv_(in|out)", r"\1.conv_\2", r"\1.conv_\2"),
]


def vae_source_key(key: str, fmt: str) -> str:
    """Our VAE parameter key -> diffusers' AutoencoderKL ('diffusers') or LDM's first_stage_model ('ldm') name."""
    for pattern, diffusers, ldm in VAE_RULES:
        new, n = re.subn(f"^{pattern}(?=\\.)", diffusers if fmt == "diffusers" else ldm, key, count=1)
        if n:
            return new.replace(".conv_shortcut.", ".nin_shortcut.") if fmt == "ldm" else new
    raise KeyError(key)


# ---- CLIP text encoder ------------------------------------------------------------------------------------------
CLIP_RENAMES = [  # open_clip text tower (ours) -> transformers' CLIPTextModel (after `clip_state`), regex on the key
    (r"^tower\.token_embedding\.weight$", "embeddings.token_embedding.weight"),
    (r"^tower\.positional_embedding$", "embeddings.position_embedding.weight"),
    (r"^tower\.ln_final\.", "final_layer_norm."),
    (r"^tower\.transformer\.resblocks\.(\d+)\.ln_1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^tower\.transformer\.resblocks\.(\d+)\.ln_2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^tower\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"^tower\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"encoder.layers.\1.mlp.fc1."),
    (r"^tower\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"encoder.layers.\1.mlp.fc2."),
]
_FUSED_QKV = re.compile(r"^tower\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel keys without the optional 'text_model.' prefix (older files and SD have it)."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def clip_source_keys(key: str) -> list[str]:
    """Our text-encoder key -> the transformers key(s) it is made of (three for the fused q, k, v projection)."""
    m = _FUSED_QKV.match(key)
    if m:
        return [f"encoder.layers.{m[1]}.self_attn.{p}_proj.{m[2]}" for p in "qkv"]
    for pattern, repl in CLIP_RENAMES:
        if re.match(pattern, key):
            return [re.sub(pattern, repl, key)]
    raise KeyError(key)


# ---- applying a map ---------------------------------------------------------------------------------------------
IGNORED = re.compile(r"(^|\.)position_ids$")


def apply_map(model: torch.nn.Module, source: dict[str, torch.Tensor], sources_of: Callable[[str], list[str]],
              what: str) -> None:
    """Fill every parameter of ``model`` from ``source`` via ``sources_of(our_key) -> [source keys]``.

    Several source keys are concatenated along dim 0 (fused qkv); 1x1-conv weights fill linears by reshaping.
    Raises CheckpointError naming every missing, unexpected or mis-shaped key.
    """
    target = model.state_dict()
    used, missing, bad_shape, filled = set(), [], [], {}
    for key, tensor in target.items():
        names = sources_of(key)
        if not all(n in source for n in names):
            missing += [n for n in names if n not in source]
            continue
        used.update(names)
        value = torch.cat([source[n] for n in names]) if len(names) > 1 else source[names[0]]
        if value.shape != tensor.shape and value.numel() == tensor.numel() and value.dim() == 4 and tensor.dim() == 2:
            value = value.reshape(tensor.shape)  # LDM's VAE attention: 1x1 conv [C, C, 1, 1] -> linear [C, C]
        if value.shape != tensor.shape:
            bad_shape.append(f"{names[0]} {tuple(value.shape)} vs expected {tuple(tensor.shape)}")
            continue
        filled[key] = value.to(tensor.dtype)
    unexpected = sorted(k for k in source if k not in used and not IGNORED.search(k))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad_shape)):
        if keys:
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}")
    if problems:
        raise CheckpointError(f"{what} weights do not fit this model ({'; '.join(problems)})")
    model.load_state_dict(filled, strict=True, assign=True)  # assign: works for models built on the meta device


def invert_map(model: torch.nn.Module, sources_of: Callable[[str], list[str]]) -> dict[str, torch.Tensor]:
    """``apply_map`` backwards: our parameters under their source names (a fused q, k, v split into three, each with
    its own storage: safetensors refuses views of one tensor). Like ``state_dict()``, an unsplit contiguous tensor
    shares its storage with the model."""
    out = {}
    for key, tensor in model.state_dict().items():
        names = sources_of(key)
        parts = tensor.detach().cpu().chunk(len(names))
        for name, part in zip(names, parts):
            out[name] = part.clone(memory_format=torch.contiguous_format) if len(parts) > 1 else part.contiguous()
    return out


def to_diffusers(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> tuple[dict, dict, dict]:
    """State dicts of a diffusers folder's unet/, vae/ and text_encoder/ (transformers' keys, 'text_model.' prefix)
    from our three models: ``load_diffusers`` inverted, by the same tables."""
    return (invert_map(unet, lambda k: [unet_source_key(k, "diffusers")]),
            invert_map(vae, lambda k: [vae_source_key(k, "diffusers")]),
            {"text_model." + k: v for k, v in invert_map(text_encoder, clip_source_keys).items()})


def to_ldm(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """One state dict in the original single-file layout (SD-v1.5's ``v1-5-pruned-emaonly.safetensors``):
    ``load_ldm`` inverted, VAE attention weights as LDM's 1x1 convs."""
    unet_sd = invert_map(unet, lambda k: [unet_source_key(k, "ldm")])
    state = {"model.diffusion_model." + k: v for k, v in unet_sd.items()}
    for k, v in invert_map(vae, lambda k: [vae_source_key(k, "ldm")]).items():
        conv = re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", k) is not None
        state["first_stage_model." + k] = v[:, :, None, None] if conv else v
    text = invert_map(text_encoder, clip_source_keys)
    return state | {"cond_stage_model.transformer.text_model." + k: v for k, v in text.items()}


def split_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with it removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_ldm(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, state: dict[str, torch.Tensor],
             ema: bool = False) -> None:
    """Fill our three models from an SD-v1 LDM state dict (the single-file release)."""
    unet_sd = split_prefix(state, "model.diffusion_model.")
    if not unet_sd:
        example = next(iter(state), "nothing")
        raise CheckpointError(f"not a Stable Diffusion v1 checkpoint: no model.diffusion_model.* keys (has {example})")
    if ema:  # LDM keeps EMA weights as 'model_ema.' + the key without 'model.' and without dots
        missing = [k for k in unet_sd if "model_ema." + ("diffusion_model." + k).replace(".", "") not in state]
        if missing:
            raise CheckpointError(f"no EMA weights in this file (e.g. for model.diffusion_model.{missing[0]})")
        unet_sd = {k: state["model_ema." + ("diffusion_model." + k).replace(".", "")] for k in unet_sd}
    apply_map(unet, unet_sd, lambda k: [unet_source_key(k, "ldm")], "UNet (model.diffusion_model)")
    apply_map(vae, split_prefix(state, "first_stage_model."), lambda k: [vae_source_key(k, "ldm")],
              "VAE (first_stage_model)")
    apply_map(text_encoder, clip_state(split_prefix(state, "cond_stage_model.transformer.")), clip_source_keys,
              "text encoder (cond_stage_model.transformer)")


def load_diffusers(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, unet_sd: dict, vae_sd: dict,
                   text_sd: dict) -> None:
    """Fill our three models from the state dicts of a diffusers folder's unet/, vae/ and text_encoder/."""
    apply_map(unet, unet_sd, lambda k: [unet_source_key(k, "diffusers")], "UNet (unet/)")
    apply_map(vae, vae_sd, lambda k: [vae_source_key(k, "diffusers")], "VAE (vae/)")
    apply_map(text_encoder, clip_state(text_sd), clip_source_keys, "text encoder (text_encoder/)")


def sd15_layout(spec: ArchSpec) -> bool:
    """Published SD weights only fit the SD-v1.5 block layout (any widths)."""
    return all(spec.stages[s] == sd15().stages[s] for s in STAGES)
