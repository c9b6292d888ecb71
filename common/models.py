"""Models: find a base model, detect its family, load its parts and build its pipeline.

Used by every script that loads a model. What sets a family apart (how it reads a prompt, how its denoiser is
called, what it draws with) lives in its own file in common/families/; the object resolve_model returns is of that
family's class, so scripts ask it (`info.encode_prompt(...)`, `info.predict(...)`) and never which family it is.
    resolve_model     find the model (folder, hub id or single file), read its configs, detect its family
    load_component    one part (UNet / transformer, VAE, text encoder, tokenizer), no pickles; load_pipeline,
                      build_pipeline (the family's diffusers pipeline from parts in memory)
    sampler           a diffusers sampler by its flag name
"""

import hashlib
import os
import re

import torch

from common import families, files, hub, quantise, single_file

# Sampler names of the flags (make_regularisation.py --scheduler, --scheduled_sampling_sampler): diffusers classes.
SAMPLERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
            "dpm": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler"}


# ---------------------------------------------------------------------------------------------------------------------
# Finding the model and its family


def resolve_model(args):
    """Find the model (folder, hub id or single file), read its configs and detect its family. Loads no weights."""
    ref = args.pretrained_model_name_or_path
    if not ref:
        raise SystemExit("--pretrained_model_name_or_path is required: a diffusers folder, a hub id or a .safetensors file")
    if os.path.isfile(ref):
        folder = single_file.convert_single_file(ref, args, args.cache_dir or os.path.join(args.output_dir, "cache"))
    elif os.path.isdir(ref):
        folder = ref
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith("."):  # owner/name: a hub id
        folder = hub.download_model(ref, args)
    else:
        raise SystemExit(f"--pretrained_model_name_or_path {ref}: no such folder or file (nor a hub id owner/name)")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise SystemExit(f"{ref}: not a diffusers model folder (no model_index.json). Point at the folder that holds "
                         "model_index.json, or at a single .safetensors checkpoint.")
    model_index = files.read_json(os.path.join(folder, "model_index.json"))
    denoiser = "transformer" if "transformer" in model_index else "unet"
    for part in (f"{denoiser}/config.json", "scheduler/scheduler_config.json"):
        if not os.path.isfile(os.path.join(folder, part)):
            raise SystemExit(f"{ref}: the model folder has no {part}; it is incomplete or not a text-to-image model")
    allow_pickle = bool(getattr(args, "allow_pickle", False))
    if not allow_pickle:
        files.refuse_pickle_only_weights(ref, folder, model_index)
    model_config = files.read_json(os.path.join(folder, denoiser, "config.json"))
    scheduler_config = files.read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    family = families.detect(model_index, model_config, ref)
    if family.pixels and getattr(args, "pretrained_vae_model_name_or_path", None):
        raise SystemExit(f"--pretrained_vae_model_name_or_path: {ref} is {family.family}, which works on pixels and "
                         "has no VAE; leave the flag out")
    vae_folder = find_vae(args)
    if not (family.pixels or vae_folder or os.path.isfile(os.path.join(folder, "vae", "config.json"))):
        raise SystemExit(f"{ref}: the model folder has no vae/config.json; it is incomplete or not a text-to-image "
                         "model")
    info = family(
        ref=ref, folder=folder, variant=args.variant, model_index=model_index, model_config=model_config,
        scheduler_config=scheduler_config,
        text_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(getattr(args, "mixed_precision", None),
                                                                      torch.float32),
        vae_config=None if family.pixels else
        files.read_json(os.path.join(vae_folder or os.path.join(folder, "vae"), "config.json")),
        vae_folder=vae_folder,
        text_encoder_precisions={name: getattr(args, f"text_encoder_{i}_precision", "no_change") or "no_change"
                                 for i, name in enumerate(("text_encoder", "text_encoder_2", "text_encoder_3"), 1)},
        allow_pickle=allow_pickle,
    )
    present = {encoder for _, encoder in info.text_parts}
    for name, precision in info.text_encoder_precisions.items():
        if precision != "no_change" and name not in present:
            number = name[len("text_encoder"):].lstrip("_") or "1"
            raise SystemExit(f"--text_encoder_{number}_precision {precision}: {ref} ({family.family}) has no {name}; "
                             f"its text encoders are {', '.join(sorted(present))} (--text_encoder_1_precision is "
                             "text_encoder, 2 text_encoder_2, 3 text_encoder_3)")
    info.configure(args)
    return info


def find_vae(args):
    """--pretrained_vae_model_name_or_path as a local folder holding the VAE's config.json (a hub id is fetched;
    a pipeline folder's vae/ is used), or None."""
    ref = getattr(args, "pretrained_vae_model_name_or_path", None)
    if ref and not os.path.isdir(ref) and re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
        ref = hub.download_vae(ref, args)
    folder = ref and (os.path.join(ref, "vae") if os.path.isdir(os.path.join(ref, "vae")) else ref)
    if folder and not os.path.isfile(os.path.join(folder, "config.json")):
        raise SystemExit(f"--pretrained_vae_model_name_or_path {ref}: no config.json there (nor in vae/); give a "
                         "folder holding a diffusers VAE, or its hub id")
    return folder


def component_location(info, subfolder):
    """(folder, subfolder) from_pretrained loads a component from: the model's, or the VAE given instead."""
    return (info.vae_folder, None) if subfolder == "vae" and info.vae_folder else (info.folder, subfolder)


def component_identity(info, subfolder):
    """A fingerprint of one model component (configs hashed whole, weight files sampled), for cache validity."""
    digest = hashlib.sha256(f"{subfolder}|{info.variant}".encode())
    folder, inside = component_location(info, subfolder)
    root = os.path.join(folder, inside or "")
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith((".json", ".txt")):
            with open(path, "rb") as handle:
                digest.update(name.encode() + handle.read())
        elif name.endswith(".safetensors"):
            digest.update(name.encode() + files.sampled_digest(path).encode())
    return digest.hexdigest()[:24]


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_component(info, subfolder, dtype=torch.float32):
    """Load one pipeline component by the class its model_index.json names (UNet, VAE, text encoder, tokenizer)."""
    import diffusers
    import transformers

    library, class_name = info.model_index[subfolder]
    module = diffusers if library == "diffusers" else transformers
    kwargs = {}
    if not subfolder.startswith(("tokenizer", "scheduler")):  # weights: dtype and variant apply; no pickles
        kwargs = {"torch_dtype" if library == "diffusers" else "dtype": dtype, "variant": info.variant,
                  "use_safetensors": None if info.allow_pickle else True}
    try:
        folder, inside = component_location(info, subfolder)
        if inside is None:  # a VAE given on its own: its files have their own names (no --variant)
            kwargs["variant"] = None
        return getattr(module, class_name).from_pretrained(folder, subfolder=inside, **kwargs)
    except (OSError, ValueError) as err:
        raise SystemExit(f"{info.ref}: cannot load {subfolder} ({err})") from None


def load_vae(info, device="cpu", dtype=torch.float32):
    """The frozen VAE, or None for a family without one (IF works on pixels)."""
    return None if info.pixels else load_component(info, "vae", dtype).to(device).requires_grad_(False)


def load_text_encoders(info, device="cpu", dtype=torch.float32):
    """The family's tokenizers and frozen text encoders: loaded in `dtype`, then quantised as
    --text_encoder_N_precision asks (a quantised weight's dtype cannot change afterwards)."""
    tokenizers, encoders = [], []
    for tokenizer_name, encoder_name in info.text_parts:
        tokenizers.append(load_component(info, tokenizer_name))
        encoder = quantise.quantize_model(load_component(info, encoder_name, dtype),
                                          info.text_encoder_precisions.get(encoder_name), dtype)
        encoder.to(device).requires_grad_(False).eval()
        encoders.append(encoder)
    return tokenizers, encoders


def load_pipeline(info, device="cpu", dtype=torch.float32):
    """The model's own inference pipeline (its scheduler included), every component loaded from the folder."""
    tokenizers, text_encoders = load_text_encoders(info, device, dtype)
    denoiser = load_component(info, info.denoiser, dtype).to(device)
    vae = load_vae(info, device, dtype)  # SDXL's pipeline upcasts its VAE itself (force_upcast)
    return build_pipeline(info, denoiser, vae, tokenizers, text_encoders)


def build_pipeline(info, denoiser, vae, tokenizers, text_encoders, scheduler=None):
    """The family's diffusers inference pipeline from components already in memory (for validation images)."""
    import diffusers

    parts = {info.denoiser: denoiser, "scheduler": scheduler or drawing_scheduler(info), **info.pipeline_options,
             **info.pipeline_components()}
    if not info.pixels:
        parts["vae"] = vae
    for tokenizer_name, encoder_name in info.text_encoders:  # an optional part it lacks (SD3's T5): None
        parts[tokenizer_name], parts[encoder_name] = None, None
    for (tokenizer_name, encoder_name), tokenizer, encoder in zip(info.text_parts, tokenizers, text_encoders):
        parts[tokenizer_name], parts[encoder_name] = tokenizer, encoder
    return getattr(diffusers, info.pipeline)(**parts)


def denoiser_of(pipe):
    """A pipeline's trained model: its UNet or its transformer."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def drawing_scheduler(info):
    """The model's own scheduler, as its pipeline draws with it. IF's predicts a learned variance that training
    leaves as it was (only the noise half is trained: see families/deepfloyd.py), so a trained IF draws with the
    fixed variance instead, as diffusers' DreamBooth guide runs an IF LoRA."""
    scheduler = load_component(info, "scheduler")
    if scheduler.config.get("variance_type") in ("learned", "learned_range"):
        scheduler = type(scheduler).from_config(scheduler.config, variance_type="fixed_small")
    return scheduler


def sampler(name, scheduler_config, **overrides):
    """A fresh diffusers sampler by its flag name (SAMPLERS), configured like the model's own scheduler."""
    import diffusers

    return getattr(diffusers, SAMPLERS[name]).from_config(scheduler_config, **overrides)
