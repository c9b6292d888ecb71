"""Single-file checkpoints: which family an original-format (LDM / A1111, BFL) .safetensors file holds, and its
one-time conversion to a diffusers folder with diffusers' from_single_file (models.resolve_model then loads the
folder like any other).
"""

import os
import shutil

import torch
from safetensors import safe_open

from common import files


def single_file_family(path):
    """The family of an original-format (LDM / A1111) checkpoint, from its tensor names."""
    with safe_open(path, framework="pt") as handle:
        keys = set(handle.keys())
    if any(k.split("model.diffusion_model.")[-1].startswith("double_blocks.") for k in keys):
        return "flux"
    if any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys):
        return "sd3"
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl-refiner"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise SystemExit(f"{path}: not a Stable Diffusion checkpoint this tool recognises (no text-encoder tensors found)")


# Text encoders an SD3 single file may leave out (Stability ships some files without them): (key prefix, class).
SINGLE_FILE_TEXT_ENCODERS = {"sd3": {"text_encoder": ("text_encoders.clip_l.", "CLIPTextModelWithProjection"),
                                     "text_encoder_2": ("text_encoders.clip_g.", "CLIPTextModelWithProjection"),
                                     "text_encoder_3": ("text_encoders.t5xxl.", "T5EncoderModel")}}


def missing_text_encoders(path, family, args):
    """The text encoders a single file lacks, loaded from --single_file_config (None where that model has none
    either: SD3 without T5), as from_single_file takes them."""
    import transformers

    parts = SINGLE_FILE_TEXT_ENCODERS.get(family, {})
    with safe_open(path, framework="pt") as handle:
        missing = [name for name, (prefix, _) in parts.items() if not any(k.startswith(prefix) for k in handle.keys())]
    if missing and not args.single_file_config:
        raise SystemExit(f"{path} holds no {', '.join(missing)}: give --single_file_config the diffusers folder or hub "
                         "id of the same model to take them from")
    loaded = {}
    for name in missing:
        try:
            loaded[name] = getattr(transformers, parts[name][1]).from_pretrained(
                args.single_file_config, subfolder=name, local_files_only=args.local_files_only)
        except OSError:  # the model has none (SD3 without its optional T5)
            loaded[name] = loaded[name.replace("text_encoder", "tokenizer")] = None
    return loaded


def flux_single_file(path, args):
    """A FLUX.1 file in Black Forest Labs' layout holds the transformer alone (in its own precision, kept: bf16 for
    the released models; an fp8 file is widened to bf16, for training); the VAE, text encoders and scheduler come
    from --single_file_config, in the same precision."""
    import diffusers

    with safe_open(path, framework="pt") as handle:
        key = next(k for k in handle.keys() if k.endswith("img_in.weight"))
        width, dtype = handle.get_slice(key).get_shape()[0], handle.get_tensor(key).dtype
    dtype = {torch.float32: torch.float32, torch.float16: torch.float16}.get(dtype, torch.bfloat16)  # fp8 -> bf16
    if width != 3072:  # diffusers' converter fixes every FLUX.1's width, 3072
        raise SystemExit(f"{path}: a FLUX transformer {width} wide; diffusers' converter reads the FLUX.1 width (3072) "
                         "only. Convert it to a diffusers folder with the tool that made it, and pass the folder")
    if not args.single_file_config:
        raise SystemExit(f"{path} holds the FLUX transformer alone: give --single_file_config the diffusers folder or "
                         "hub id of the same model (black-forest-labs/FLUX.1-dev or FLUX.1-schnell) for the VAE, text "
                         "encoders and scheduler")
    transformer = diffusers.FluxTransformer2DModel.from_single_file(
        path, config=args.single_file_config, subfolder="transformer", torch_dtype=dtype,
        local_files_only=args.local_files_only)
    return diffusers.FluxPipeline.from_pretrained(args.single_file_config, transformer=transformer, torch_dtype=dtype,
                                                  local_files_only=args.local_files_only)


def convert_single_file(path, args, cache_root):
    """Load a single-file checkpoint with diffusers' from_single_file once and keep it as a diffusers folder.

    Later runs (and caching) then load the folder directly; the folder name carries the file's fingerprint, so an
    edited checkpoint is converted again."""
    import diffusers

    from common import models  # models imports this module to resolve a file it is given

    if not path.endswith(".safetensors"):
        raise SystemExit(f"{path}: only .safetensors single-file checkpoints are loaded (a .ckpt file is a pickle "
                         "that can run code); convert it to safetensors first")
    family = single_file_family(path)
    folder = os.path.join(cache_root, "converted",
                          f"{files.safe_folder_name(os.path.basename(path))}-{files.sampled_digest(path)[:12]}")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    print(f"converting single-file checkpoint {path} ({family}) to a diffusers folder in {folder}")
    try:
        if family == "flux":
            pipe = flux_single_file(path, args)
        else:
            pipe = getattr(diffusers, models.FAMILIES[family].pipeline).from_single_file(
                path, config=args.single_file_config, local_files_only=args.local_files_only,
                **models.FAMILIES[family].single_file_options, **missing_text_encoders(path, family, args))
    except SystemExit:
        raise
    except Exception as err:  # diffusers raises many kinds here; all mean the same to the user
        raise SystemExit(f"{path}: from_single_file failed ({err}). Offline, pass --single_file_config with a diffusers "
                         "folder (or cached hub id) of the same architecture.") from None
    unloaded = [f"{name}.{key}" for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)
                for key, value in part.state_dict().items() if value.device.type == "meta"]
    if unloaded:  # diffusers leaves weights it found no tensor for uninitialised instead of failing
        raise SystemExit(f"{path}: from_single_file left {len(unloaded)} weights unloaded (e.g. {unloaded[0]}); the "
                         "checkpoint does not match the architecture of --single_file_config")
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
