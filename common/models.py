"""Models: which family a base model is, how to load it, how it reads a prompt, and what it is trained to predict.

Used by every script that loads a model. How the families differ is one table, FAMILIES, read by the functions
below, so no script asks `if family == ...`:
    resolve_model     find the model (folder, hub id or single file), read its configs, detect its family
    load_component    one part (UNet, VAE, text encoder, tokenizer), no pickles; load_text_encoders, load_pipeline
    encode_prompt     prompt embeddings exactly as the family's diffusers pipeline computes them
    conditioning      the UNet's text (and SDXL size / aesthetic) conditioning for a batch, from cached embeddings
    training_target   the objective: the noise, or the velocity for v-prediction
"""

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from common import files, quantise


@dataclass(frozen=True)
class Family:
    """What sets one model family apart, as a row of FAMILIES."""

    text_parts: tuple  # (tokenizer, text encoder) subfolders it encodes prompts with, in pipeline order
    hidden_state: str  # "last": the text encoder's output (SD 1/2); "penultimate", plus a pooled vector (SDXL)
    time_ids: str  # SDXL micro-conditioning: "size" (original size, crop, target size), "aesthetic", or None
    pipeline: str  # the diffusers pipeline that draws with it (and converts its single-file checkpoints)
    pipeline_options: dict  # what that pipeline is built with besides the components
    single_file_options: dict  # ... and what its from_single_file needs
    preview_vae: str  # the Tiny AutoEncoder that previews its latents
    refines: bool = False  # an img2img refiner: trained on the low-noise end; it refines pictures, cannot draw them


_SD = dict(text_parts=(("tokenizer", "text_encoder"),), hidden_state="last", time_ids=None,
           pipeline="StableDiffusionPipeline", preview_vae="madebyollin/taesd",
           pipeline_options={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
           single_file_options={"safety_checker": None, "requires_safety_checker": False})
FAMILIES = {
    "sd1": Family(**_SD),
    "sd2": Family(**_SD),  # SD 2.x: its shipped text encoder is already cut to the penultimate layer
    "sdxl": Family(text_parts=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
                   hidden_state="penultimate", time_ids="size", pipeline="StableDiffusionXLPipeline",
                   pipeline_options={}, single_file_options={}, preview_vae="madebyollin/taesdxl"),
    "sdxl-refiner": Family(text_parts=(("tokenizer_2", "text_encoder_2"),), hidden_state="penultimate",
                           time_ids="aesthetic", pipeline="StableDiffusionXLImg2ImgPipeline",
                           pipeline_options={"tokenizer": None, "text_encoder": None,
                                             "requires_aesthetics_score": True},
                           single_file_options={}, preview_vae="madebyollin/taesdxl", refines=True),
}
# Sampler names of the flags (make_regularisation.py --scheduler, --scheduled_sampling_sampler): diffusers classes.
SAMPLERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
            "dpm": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler"}


@dataclass
class ModelInfo:
    """What the scripts need to know about a base model, read from its configs (never guessed from its name)."""

    ref: str  # what the user gave: folder, hub id or file
    folder: str  # a local diffusers folder holding it
    family: str  # a key of FAMILIES
    prediction_type: str  # epsilon | v_prediction
    variant: str = None
    model_index: dict = None
    unet_config: dict = None
    vae_config: dict = None
    text_encoder_precisions: dict = field(default_factory=dict)  # {"text_encoder_2": "int8-quanto", ...}
    num_train_timesteps: int = 1000
    allow_pickle: bool = False  # --allow_pickle: load .bin/.pt weights (a pickle can run code) where no safetensors

    @property
    def spec(self):
        return FAMILIES[self.family]

    @property
    def text_parts(self):
        return list(self.spec.text_parts)

    @property
    def vae_scale_factor(self):
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def native_resolution(self):
        return self.unet_config["sample_size"] * self.vae_scale_factor


# ---------------------------------------------------------------------------------------------------------------------
# Finding the model and its family


def detect_family(model_index, unet_config, where):
    """The model family from its own configs, so tiny test models are detected like real ones.

    SDXL: the UNet takes 'text_time' added conditioning; the refiner has no first text encoder and scores
    aesthetics. SD 2.x: 1024-wide cross-attention (OpenCLIP-H) or, for small models, linear attention
    projections (an SD 2 trait SD 1 UNets lack). Everything else with a CLIP text encoder is SD 1.x."""
    if unet_config.get("addition_embed_type") == "text_time":
        has_te1 = (model_index.get("text_encoder") or [None])[0] is not None
        if model_index.get("requires_aesthetics_score") or not has_te1:
            return "sdxl-refiner"
        return "sdxl"
    if unet_config.get("addition_embed_type") is not None or unet_config.get("in_channels", 4) != 4:
        raise SystemExit(f"{where}: this UNet (addition_embed_type={unet_config.get('addition_embed_type')}, "
                         f"in_channels={unet_config.get('in_channels')}) is not an SD 1.x/2.x/SDXL text-to-image model; "
                         "inpainting and other variants are not supported")
    if unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def single_file_family(path):
    """The family of an original-format (LDM / A1111) checkpoint, from its tensor names."""
    with safe_open(path, framework="pt") as handle:
        keys = set(handle.keys())
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "sdxl-refiner"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise SystemExit(f"{path}: not a Stable Diffusion checkpoint this tool recognises (no text-encoder tensors found)")


def convert_single_file(path, args, cache_root):
    """Load a single-file checkpoint with diffusers' from_single_file once and keep it as a diffusers folder.

    Later runs (and caching) then load the folder directly; the folder name carries the file's fingerprint, so an
    edited checkpoint is converted again."""
    import diffusers

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
        pipe = getattr(diffusers, FAMILIES[family].pipeline).from_single_file(
            path, config=args.single_file_config, local_files_only=args.local_files_only,
            **FAMILIES[family].single_file_options)
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


def download_model(ref, args):
    """A hub id -> the local snapshot folder diffusers would load from (only the parts training needs)."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.download(
            ref, revision=args.revision, variant=args.variant, local_files_only=args.local_files_only,
            use_safetensors=None if getattr(args, "allow_pickle", False) else True, safety_checker=None,
            feature_extractor=None, image_encoder=None,
        )
    except Exception as err:
        offline = " (offline: HF_HUB_OFFLINE or --local_files_only is set)" if args.local_files_only or \
            os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise SystemExit(f"could not get model {ref!r} from the hub{offline}: {err}. Check the id, or give a local "
                         "diffusers folder.") from None


def resolve_model(args):
    """Find the model (folder, hub id or single file), read its configs and detect its family. Loads no weights."""
    ref = args.pretrained_model_name_or_path
    if not ref:
        raise SystemExit("--pretrained_model_name_or_path is required: a diffusers folder, a hub id or a .safetensors file")
    if os.path.isfile(ref):
        folder = convert_single_file(ref, args, args.cache_dir or os.path.join(args.output_dir, "cache"))
    elif os.path.isdir(ref):
        folder = ref
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith("."):  # owner/name: a hub id
        folder = download_model(ref, args)
    else:
        raise SystemExit(f"--pretrained_model_name_or_path {ref}: no such folder or file (nor a hub id owner/name)")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise SystemExit(f"{ref}: not a diffusers model folder (no model_index.json). Point at the folder that holds "
                         "model_index.json, or at a single .safetensors checkpoint.")
    model_index = files.read_json(os.path.join(folder, "model_index.json"))
    for part in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        if not os.path.isfile(os.path.join(folder, part)):
            raise SystemExit(f"{ref}: the model folder has no {part}; it is incomplete or not a text-to-image model")
    allow_pickle = bool(getattr(args, "allow_pickle", False))
    if not allow_pickle:
        files.refuse_pickle_only_weights(ref, folder, model_index)
    unet_config = files.read_json(os.path.join(folder, "unet", "config.json"))
    scheduler_config = files.read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    return ModelInfo(
        ref=ref, folder=folder, family=detect_family(model_index, unet_config, ref), variant=args.variant,
        model_index=model_index, unet_config=unet_config,
        prediction_type=scheduler_config.get("prediction_type", "epsilon"),
        num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
        vae_config=files.read_json(os.path.join(folder, "vae", "config.json")),
        text_encoder_precisions={name: getattr(args, f"text_encoder_{i}_precision", "no_change") or "no_change"
                                 for i, name in enumerate(("text_encoder", "text_encoder_2", "text_encoder_3"), 1)},
        allow_pickle=allow_pickle,
    )


def component_identity(info, subfolder):
    """A fingerprint of one model component (configs hashed whole, weight files sampled), for cache validity."""
    digest = hashlib.sha256(f"{subfolder}|{info.variant}".encode())
    root = os.path.join(info.folder, subfolder)
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
        return getattr(module, class_name).from_pretrained(info.folder, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        raise SystemExit(f"{info.ref}: cannot load {subfolder} ({err})") from None


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
    unet = load_component(info, "unet", dtype).to(device)
    vae = load_component(info, "vae", dtype).to(device)  # SDXL's pipeline upcasts its VAE itself (force_upcast)
    return build_pipeline(info, unet, vae, tokenizers, text_encoders)


def build_pipeline(info, unet, vae, tokenizers, text_encoders, scheduler=None):
    """The family's diffusers inference pipeline from components already in memory (for validation images)."""
    import diffusers

    parts = {"unet": unet, "vae": vae, "scheduler": scheduler or load_component(info, "scheduler"),
             **info.spec.pipeline_options}
    for (tokenizer_name, encoder_name), tokenizer, encoder in zip(info.text_parts, tokenizers, text_encoders):
        parts[tokenizer_name], parts[encoder_name] = tokenizer, encoder
    return getattr(diffusers, info.spec.pipeline)(**parts)


def sampler(name, scheduler_config, **overrides):
    """A fresh diffusers sampler by its flag name (SAMPLERS), configured like the model's own scheduler."""
    import diffusers

    return getattr(diffusers, SAMPLERS[name]).from_config(scheduler_config, **overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Text encoding and conditioning


@torch.no_grad()
def encode_prompt(info, tokenizers, text_encoders, prompts):
    """Prompt embeddings exactly as the family's diffusers pipeline computes them in encode_prompt.

    SD 1.x / 2.x: the text encoder's last hidden state (SD 2's shipped encoder is already cut to the penultimate
    layer). SDXL: penultimate hidden states of both encoders concatenated, pooled output of the second.
    Returns {"prompt_embeds": (B, 77, D)} plus "pooled_prompt_embeds": (B, D') for SDXL."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        ids = tokens.input_ids.to(encoder.device)
        if info.spec.hidden_state == "last":
            mask = tokens.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
            hidden.append(encoder(ids, attention_mask=mask)[0])
        else:
            output = encoder(ids, output_hidden_states=True)
            if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds, the pooled vector SDXL uses
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
    result = {"prompt_embeds": torch.cat(hidden, dim=-1).float()}
    if pooled is not None:
        result["pooled_prompt_embeds"] = pooled.float()
    return result


def sdxl_time_ids(transform, aesthetic_score=None):
    """SDXL's micro-conditioning: original size, crop top-left, target size, each as (height, width). The refiner
    (give `aesthetic_score`) takes original size, crop top-left and the aesthetic score instead: 5 values."""
    width, height = transform["original_size"]
    left, top = transform["crop_box"][:2]
    if aesthetic_score is not None:
        return torch.tensor([height, width, top, left, aesthetic_score], dtype=torch.float32)
    target_w, target_h = transform["target_size"]
    return torch.tensor([height, width, top, left, target_h, target_w], dtype=torch.float32)


def conditioning(info, texts, transforms, aesthetic_score=None):
    """The UNet's keyword arguments besides the noisy latents and timesteps, for a batch: each sample's cached
    text embeddings (`texts`: {"prompt_embeds", "pooled_prompt_embeds"} each) as encoder_hidden_states, and for
    SDXL added_cond_kwargs: the pooled text and the time ids of each sample's crop (`transforms`)."""
    cond = {"encoder_hidden_states": torch.stack([text["prompt_embeds"] for text in texts])}
    if info.spec.time_ids:
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.stack([text["pooled_prompt_embeds"] for text in texts]),
            "time_ids": torch.stack([sdxl_time_ids(transform, aesthetic_score) for transform in transforms]),
        }
    return cond


def map_conditioning(function, cond):
    """`function` applied to every tensor of a conditioning dict (to slice, expand or move it)."""
    return {key: map_conditioning(function, value) if isinstance(value, dict) else function(value)
            for key, value in cond.items()}


def conditioning_on(cond, device, dtype):
    """A batch's conditioning on `device`: the text states in the compute dtype, SDXL's pooled text and time ids
    as they are (the UNet embeds them itself)."""
    moved = map_conditioning(lambda tensor: tensor.to(device), cond)
    moved["encoder_hidden_states"] = cond["encoder_hidden_states"].to(device, dtype)
    return moved


def refiner_conditioning(info, args):
    """The aesthetic score sdxl_time_ids needs for a refiner, None for every other family."""
    return args.data_aesthetic_score if info.spec.time_ids == "aesthetic" else None


# ---------------------------------------------------------------------------------------------------------------------
# The training objective


def latent_scaling(info):
    """(shift, scale): the UNet sees (vae latent - shift) * scale."""
    return info.vae_config.get("shift_factor") or 0.0, info.vae_config.get("scaling_factor", 0.18215)


def timestep_range(info, args):
    """Training timesteps are drawn from [0, this): the whole schedule, or for the refiner the low-noise end it
    serves (its img2img strength)."""
    if not info.spec.refines:
        return info.num_train_timesteps
    return max(2, round(info.num_train_timesteps * args.refiner_training_strength))


def training_target(noise_scheduler, prediction_type, latents, noise, timesteps):
    """What the UNet learns to predict from x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps: the noise eps, or for
    v-prediction the velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)."""
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise
