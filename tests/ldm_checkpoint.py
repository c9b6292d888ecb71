"""Write a diffusers SD 1.x / SDXL pipeline as one original-format (LDM / "A1111") .safetensors checkpoint.

The tests need a single-file checkpoint to load through models.resolve_model -> diffusers' from_single_file, and
nothing may be downloaded, so the tiny random models are written out in the original key layout here. The mapping
is the inverse of diffusers' own converters in diffusers/loaders/single_file_utils.py:

    UNet            model.diffusion_model.                 convert_ldm_unet_checkpoint
    VAE             first_stage_model.                     convert_ldm_vae_checkpoint
    SD 1.x CLIP     cond_stage_model.transformer.          convert_ldm_clip_checkpoint
    SDXL CLIP-L     conditioner.embedders.0.transformer.   convert_ldm_clip_checkpoint
    SDXL OpenCLIP   conditioner.embedders.1.model.         convert_open_clip_checkpoint
    SD3 MMDiT       model.diffusion_model.                 convert_sd3_transformer_checkpoint_to_diffusers

It follows the component configs (layers_per_block, number of blocks, transformer_layers_per_block, which blocks
have attention), not the real models' fixed sizes. Every diffusers tensor is mapped exactly once; a name it does
not know is an error rather than a silently missing weight (diffusers leaves missing weights uninitialised)."""

import re

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# (component subfolder, diffusers class) of each weight component per family.
COMPONENTS = {
    "sd1": [("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"), ("text_encoder", "CLIPTextModel")],
    "sdxl": [("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"), ("text_encoder", "CLIPTextModel"),
             ("text_encoder_2", "CLIPTextModelWithProjection")],
}


def load_components(diffusers_folder, family):
    """{subfolder: model} of the weight components of a diffusers pipeline folder, in float32, eval mode."""
    import diffusers
    import transformers

    if family not in COMPONENTS:
        raise ValueError(f"family {family!r}: only {', '.join(COMPONENTS)} can be written as an LDM checkpoint")
    models = {}
    for subfolder, class_name in COMPONENTS[family]:
        cls = getattr(diffusers, class_name, None) or getattr(transformers, class_name)
        models[subfolder] = cls.from_pretrained(diffusers_folder, subfolder=subfolder, local_files_only=True).eval()
    return models


# ---------------------------------------------------------------------------------------------------------------------
# UNet (inverse of convert_ldm_unet_checkpoint)

UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL text_time conditioning
    "add_embedding.linear_2": "label_emb.0.2",
}
UNET_RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                     "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def unet_resnet_rest(rest, key):
    part, _, param = rest.partition(".")
    if part not in UNET_RESNET_PARTS:
        raise KeyError(f"UNet resnet tensor {key!r}: unknown part {part!r}")
    return f"{UNET_RESNET_PARTS[part]}.{param}"


def unet_to_ldm(state_dict, config):
    """Diffusers UNet2DConditionModel tensors -> original names (without the model.diffusion_model. prefix).

    Original layout: input_blocks.0 is conv_in; then per down block, `layers_per_block` entries of [resnet,
    attention?] and (all but the last block) one downsampler entry; middle_block is resnet, attention, resnet;
    output_blocks hold per up block `layers_per_block + 1` entries of [resnet, attention?, upsampler?]."""
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):  # the forward converter only reads one int
        if len(set(lpb)) != 1:
            raise ValueError(f"per-block layers_per_block {lpb} has no original single-file layout")
        lpb = lpb[0]
    per_block = lpb + 1
    up_with_attention = {int(m.group(1)) for key in state_dict
                         if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", key))}
    out = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        if module in UNET_FIXED:
            new = f"{UNET_FIXED[module]}.{param}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = 1 + block * per_block + layer
            new = (f"input_blocks.{index}.0.{unet_resnet_rest(rest, key)}" if kind == "resnets"
                   else f"input_blocks.{index}.1.{rest}")
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
            new = f"input_blocks.{1 + int(m.group(1)) * per_block + lpb}.0.op.{m.group(2)}"
        elif m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
            new = f"middle_block.{2 * int(m.group(1))}.{unet_resnet_rest(m.group(2), key)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            new = f"middle_block.1.{m.group(1)}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            index = block * per_block + layer
            new = (f"output_blocks.{index}.0.{unet_resnet_rest(rest, key)}" if kind == "resnets"
                   else f"output_blocks.{index}.1.{rest}")
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
            block = int(m.group(1))
            slot = 2 if block in up_with_attention else 1  # after the attention entry when there is one
            new = f"output_blocks.{block * per_block + lpb}.{slot}.conv.{m.group(2)}"
        else:
            raise KeyError(f"UNet tensor {key!r} has no known original-format name")
        # Attention internals (norm, proj_in, transformer_blocks.N.attn1/attn2/ff/norm1-3, proj_out) keep their names.
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
# VAE (inverse of convert_ldm_vae_checkpoint)

VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state_dict, config):
    """Diffusers AutoencoderKL tensors -> original names (without first_stage_model.).

    Encoder down blocks keep their order (down.i.block.j, down.i.downsample); decoder up blocks are numbered in
    reverse (diffusers up_blocks.i is original up.{n-1-i}); mid-block resnets are block_1/block_2 and the attention
    is attn_1 with 1x1-conv weights, as the original stores them."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state_dict.items():
        if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key):
            new = f"{m.group(1)}.norm_out.{m.group(2)}"
        elif re.fullmatch(r"((en|de)coder\.conv_(in|out)|(post_)?quant_conv)\.(weight|bias)", key):
            new = key
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            new = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
            new = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            block = n_up - 1 - int(m.group(1))
            new = f"decoder.up.{block}.block.{m.group(2)}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
            new = f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3).replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\."
                               r"(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key):
            new = f"{m.group(1)}.mid.attn_1.{VAE_ATTENTION_PARTS[m.group(2)]}.{m.group(3)}"
            if m.group(3) == "weight" and value.ndim == 2:  # the original attention projections are 1x1 convs
                value = value[:, :, None, None]
        else:
            raise KeyError(f"VAE tensor {key!r} has no known original-format name")
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Text encoders (inverses of convert_ldm_clip_checkpoint and convert_open_clip_checkpoint)


def clip_to_ldm(state_dict):
    """Hugging Face CLIP text model tensors -> the original CLIP-L layout: the transformers names under text_model.
    (transformers >= 5.6 dropped the text_model. level from CLIPTextModel; the original files have it)."""
    return {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state_dict.items()}


OPEN_CLIP_FIXED = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                         "self_attn.out_proj": "attn.out_proj"}


def open_clip_to_ldm(state_dict):
    """CLIPTextModelWithProjection tensors -> the OpenCLIP layout of SDXL's second encoder.

    OpenCLIP fuses q, k, v into attn.in_proj_weight / in_proj_bias (stacked q, k, v along dim 0), names the MLP
    c_fc / c_proj, and stores text_projection as a bare [hidden, projection] matrix (the transpose of the Linear)."""
    out, fused = {}, {}
    for key, value in state_dict.items():
        if key in OPEN_CLIP_FIXED:
            out[OPEN_CLIP_FIXED[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if m.group(2) not in OPEN_CLIP_LAYER_PARTS:
                raise KeyError(f"text encoder tensor {key!r} has no known OpenCLIP name")
            out[f"transformer.resblocks.{m.group(1)}.{OPEN_CLIP_LAYER_PARTS[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise KeyError(f"text encoder tensor {key!r} has no known OpenCLIP name")
    for (layer, param), parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"text encoder layer {layer}: {param} of q/k/v incomplete ({sorted(parts)})")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# SD3's transformer (inverse of convert_sd3_transformer_checkpoint_to_diffusers)


def mmdit_to_original(model, weights):
    """SD3Transformer2DModel tensors -> the original (Stability MMDiT) names, without model.diffusion_model.: the
    Linear layers fused and named by the family's original_layout (which the tests prove against diffusers' converter
    convert_sd3_transformer_checkpoint_to_diffusers), the patch embedding and SD3.5's query / key norms here."""
    from diffusers.models.normalization import AdaLayerNormContinuous

    from common import families

    modules = dict(model.named_modules())
    original = {"pos_embed": weights["pos_embed.pos_embed"], "x_embedder.proj.weight": weights["pos_embed.proj.weight"],
                "x_embedder.proj.bias": weights["pos_embed.proj.bias"]}
    for name, parts in families.SD3.original_layout(model):
        if parts[0] in modules:  # the last block's text stream has no output projection or MLP
            for kind in ("weight", "bias"):
                tensor = torch.cat([weights[f"{part}.{kind}"] for part in parts])
                if isinstance(modules[parts[0].rsplit(".", 1)[0]], AdaLayerNormContinuous):
                    tensor = torch.cat(tensor.chunk(2)[::-1])
                original[f"{name}.{kind}"] = tensor
    norms = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
             "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
    for key, value in weights.items():  # SD3.5's query / key norms
        block, rest = key.split(".")[1], ".".join(key.split(".")[2:]).rsplit(".", 1)[0]
        if key.startswith("transformer_blocks.") and rest in norms:
            original[f"joint_blocks.{block}.{norms[rest]}.weight"] = value
    return original


def save_sd3_checkpoint(diffusers_folder, path):
    """An SD3 pipeline folder's transformer and VAE as one original-format file, without text encoders (as Stability
    ships some SD3 / SD3.5 files): they come from the diffusers folder when loading."""
    import diffusers

    transformer = diffusers.SD3Transformer2DModel.from_pretrained(diffusers_folder, subfolder="transformer")
    vae = diffusers.AutoencoderKL.from_pretrained(diffusers_folder, subfolder="vae")
    tensors = {UNET_PREFIX + key: value for key, value in mmdit_to_original(transformer,
                                                                             transformer.state_dict()).items()}
    tensors.update({VAE_PREFIX + key: value for key, value in vae_to_ldm(vae.state_dict(), vae.config).items()})
    save_file({key: value.detach().contiguous().clone() for key, value in tensors.items()}, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------


def ldm_state_dict(models, family):
    """The original-format state dict of loaded components ({subfolder: model}, as load_components returns)."""

    def prefixed(prefix, tensors):
        return {prefix + key: value for key, value in tensors.items()}

    unet, vae = models["unet"], models["vae"]
    tensors = {**prefixed(UNET_PREFIX, unet_to_ldm(unet.state_dict(), unet.config)),
               **prefixed(VAE_PREFIX, vae_to_ldm(vae.state_dict(), vae.config))}
    if family == "sd1":
        tensors.update(prefixed(SD1_CLIP_PREFIX, clip_to_ldm(models["text_encoder"].state_dict())))
    elif family == "sdxl":
        tensors.update(prefixed(SDXL_CLIP_PREFIX, clip_to_ldm(models["text_encoder"].state_dict())))
        tensors.update(prefixed(SDXL_OPEN_CLIP_PREFIX, open_clip_to_ldm(models["text_encoder_2"].state_dict())))
    else:
        raise ValueError(f"family {family!r}: only sd1 and sdxl can be written as an LDM checkpoint")
    expected = sum(len(model.state_dict()) for model in models.values())
    # Two diffusers tensors mapped to one name would silently drop one; q/k/v fusing is the only intended merge.
    fused = 2 * sum(1 for key in tensors if key.endswith((".in_proj_weight", ".in_proj_bias")))
    if len(tensors) + fused != expected:
        raise AssertionError(f"{expected} diffusers tensors became {len(tensors)} original ones (+{fused} fused)")
    return tensors


def save_ldm_checkpoint(diffusers_folder, path, family):
    """Write the pipeline in `diffusers_folder` (family sd1 or sdxl) to `path` as an original-format .safetensors."""
    tensors = ldm_state_dict(load_components(diffusers_folder, family), family)
    # clone: safetensors refuses tensors that share storage (views such as the 1x1-conv reshapes).
    save_file({key: value.detach().to(torch.float32).contiguous().clone() for key, value in tensors.items()}, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# FLUX.1's transformer (inverse of convert_flux_transformer_checkpoint_to_diffusers)


def flux_to_original(model, weights):
    """FluxTransformer2DModel tensors -> Black Forest Labs' names: the Linear layers fused and named by
    original_layout (proved against diffusers' kohya LoRA converter), the query / key norms here."""
    from diffusers.models.normalization import AdaLayerNormContinuous

    from common import families

    modules, original = dict(model.named_modules()), {}
    for name, parts in families.Flux.original_layout(model):
        if parts[0] in modules:  # a model without guidance embedding has no guidance_in
            for kind in ("weight", "bias"):
                tensor = torch.cat([weights[f"{part}.{kind}"] for part in parts])
                if isinstance(modules[parts[0].rsplit(".", 1)[0]], AdaLayerNormContinuous):
                    tensor = torch.cat(tensor.chunk(2)[::-1])
                original[f"{name}.{kind}"] = tensor
    norms = {"transformer_blocks": ("double_blocks", {"norm_q": "img_attn.norm.query_norm",
                                                      "norm_k": "img_attn.norm.key_norm",
                                                      "norm_added_q": "txt_attn.norm.query_norm",
                                                      "norm_added_k": "txt_attn.norm.key_norm"}),
             "single_transformer_blocks": ("single_blocks", {"norm_q": "norm.query_norm", "norm_k": "norm.key_norm"})}
    for key, value in weights.items():
        blocks, index, rest = key.split(".", 2)[0], key.split(".")[1] if "." in key else "", key.split(".", 2)[-1]
        if blocks in norms and rest.startswith("attn.norm_") and rest.endswith(".weight"):
            original_blocks, table = norms[blocks]
            original[f"{original_blocks}.{index}.{table[rest[len('attn.'):-len('.weight')]]}.scale"] = value
    return original
