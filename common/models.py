"""Models: which family a base model is, how to load it, how it reads a prompt, and how it is called.

Used by every script that loads a model. How the families differ is one table, FAMILIES, read by the functions
below, so no script asks `if family == ...`:
    resolve_model     find the model (folder, hub id or single file), read its configs, detect its family
    load_component    one part (UNet / transformer, VAE, text encoder, tokenizer), no pickles; load_pipeline
    encode_prompt     prompt embeddings exactly as the family's diffusers pipeline computes them
    conditioning      the denoiser's text (SDXL: size / aesthetic; FLUX.1-dev: guidance; IF stage II: the low-resolution
                      picture) conditioning for a batch
    predict           the denoiser's prediction for a noisy latent: the UNet, or the transformer (FLUX: packed)
What each family is trained to predict lives in objectives.py.
"""

import hashlib
import os
import re
from dataclasses import dataclass, field

import torch

from common import files, hub, quantise, single_file


@dataclass(frozen=True)
class Family:
    """What sets one model family apart, as a row of FAMILIES."""

    # (tokenizer, text encoder, what is read from it) in pipeline order: "last" hidden state (SD 1/2),
    # "penultimate" hidden state plus the projected pooled vector if it has one (SDXL, SD3), "pooled" output only
    # (FLUX's CLIP), "t5" (its last hidden state, --t5_max_sequence_length tokens; optional for SD3), "t5 masked"
    # (DeepFloyd IF: the caption lower-cased, 77 tokens, read with their attention mask)
    text_parts: tuple
    time_ids: str  # SDXL micro-conditioning: "size" (original size, crop, target size), "aesthetic", or None
    pipeline: str  # the diffusers pipeline that draws with it (and converts its single-file checkpoints)
    pipeline_options: dict  # what that pipeline is built with besides the components
    single_file_options: dict  # ... and what its from_single_file needs
    preview_vae: str  # the Tiny AutoEncoder that previews its latents (None: the latents are the picture)
    refines: bool = False  # an img2img refiner: trained on the low-noise end; it refines pictures, cannot draw them
    denoiser: str = "unet"  # the trained model's subfolder: "unet" or "transformer"
    objective: str = "noise"  # objectives.py: "noise" (DDPM, eps / v) or "flow" (flow matching, velocity)
    timestep_scale: float = 1.0  # a flow model is called with noise level x this (SD3: 1000; FLUX: 1)
    packed: bool = False  # FLUX: latents enter as 2x2 patches (tokens), with position ids
    bucket_step: int = 64  # bucket sides are multiples of this: VAE factor x the denoiser's total downsampling
    size_multiple: int = 8  # what its pipeline draws: width and height multiples of this (FLUX / SD3: 16)
    t5_max_length: int = 0  # default --t5_max_sequence_length (0: no T5)
    guidance_scale: float = 7.5  # default validation / evaluation guidance
    pixels: bool = False  # DeepFloyd IF: no VAE; the denoiser works on the picture itself, in [-1, 1]
    upscales: int = 1  # IF stage II: enlarges the picture it is given this many times, guided by the prompt

    @property
    def draws_from_pictures(self):
        """A refiner or an upscaler: its validation starts from the subject's own pictures, not from a prompt alone."""
        return self.refines or self.upscales > 1


_SD = dict(text_parts=(("tokenizer", "text_encoder", "last"),), time_ids=None,
           pipeline="StableDiffusionPipeline", preview_vae="madebyollin/taesd",
           pipeline_options={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
           single_file_options={"safety_checker": None, "requires_safety_checker": False})
FAMILIES = {
    "sd1": Family(**_SD),
    "sd2": Family(**_SD),  # SD 2.x: its shipped text encoder is already cut to the penultimate layer
    "sdxl": Family(text_parts=(("tokenizer", "text_encoder", "penultimate"),
                               ("tokenizer_2", "text_encoder_2", "penultimate")),
                   time_ids="size", pipeline="StableDiffusionXLPipeline",
                   pipeline_options={}, single_file_options={}, preview_vae="madebyollin/taesdxl"),
    "sdxl-refiner": Family(text_parts=(("tokenizer_2", "text_encoder_2", "penultimate"),),
                           time_ids="aesthetic", pipeline="StableDiffusionXLImg2ImgPipeline",
                           pipeline_options={"tokenizer": None, "text_encoder": None,
                                             "requires_aesthetics_score": True},
                           single_file_options={}, preview_vae="madebyollin/taesdxl", refines=True),
    # SD3 / SD3.5: MMDiT on 16-channel latents in 2x2 patches, called with timestep = noise level x 1000
    "sd3": Family(text_parts=(("tokenizer", "text_encoder", "penultimate"),
                              ("tokenizer_2", "text_encoder_2", "penultimate"), ("tokenizer_3", "text_encoder_3", "t5")),
                  time_ids=None, pipeline="StableDiffusion3Pipeline", pipeline_options={}, single_file_options={},
                  preview_vae="madebyollin/taesd3", denoiser="transformer", objective="flow", timestep_scale=1000.0,
                  bucket_step=16, size_multiple=16, t5_max_length=77, guidance_scale=7.0),
    # FLUX.1 dev / schnell: latents packed into tokens; dev embeds its (distilled) guidance, schnell has none
    "flux": Family(text_parts=(("tokenizer", "text_encoder", "pooled"), ("tokenizer_2", "text_encoder_2", "t5")),
                   time_ids=None, pipeline="FluxPipeline", pipeline_options={}, single_file_options={},
                   preview_vae="madebyollin/taef1", denoiser="transformer", objective="flow", packed=True,
                   bucket_step=16, size_multiple=16, t5_max_length=512, guidance_scale=3.5),
    # DeepFloyd IF stage I: a pixel-space UNet (64 px) that predicts the noise and the range of its learned variance
    "if": Family(text_parts=(("tokenizer", "text_encoder", "t5 masked"),), time_ids=None, pipeline="IFPipeline",
                 pipeline_options={"safety_checker": None, "feature_extractor": None, "watermarker": None,
                                   "requires_safety_checker": False},
                 single_file_options={}, preview_vae=None, pixels=True, bucket_step=8, guidance_scale=7.0),
    # DeepFloyd IF stage II: enlarges a picture 4x; its UNet takes that picture, enlarged back and noised, beside
    # the noisy one (6 channels in) and the level of that noise as its class label. Buckets: 4 x stage I's 8 px.
    "if-ii": Family(text_parts=(("tokenizer", "text_encoder", "t5 masked"),), time_ids=None,
                    pipeline="IFSuperResolutionPipeline",
                    pipeline_options={"safety_checker": None, "feature_extractor": None, "watermarker": None,
                                      "requires_safety_checker": False},
                    single_file_options={}, preview_vae=None, pixels=True, bucket_step=32, size_multiple=32,
                    guidance_scale=4.0, upscales=4),
}
IF_TEXT_LENGTH = 77  # IF's T5 reads 77 tokens: the length it was trained with, fixed in its pipeline
# The trained transformer's class (its config's _class_name) -> its family.
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# Sampler names of the flags (make_regularisation.py --scheduler, --scheduled_sampling_sampler): diffusers classes.
SAMPLERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
            "dpm": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler"}


@dataclass
class ModelInfo:
    """What the scripts need to know about a base model, read from its configs (never guessed from its name)."""

    ref: str  # what the user gave: folder, hub id or file
    folder: str  # a local diffusers folder holding it
    family: str  # a key of FAMILIES
    prediction_type: str  # epsilon | v_prediction | flow (velocity)
    variant: str = None
    model_index: dict = None
    model_config: dict = None  # the UNet's or transformer's config
    vae_config: dict = None
    vae_folder: str = None  # --pretrained_vae_model_name_or_path: a folder holding the VAE used instead of vae/
    scheduler_config: dict = None
    t5_max_length: int = 0  # --t5_max_sequence_length, or the family's default
    text_dtype: torch.dtype = torch.float32  # cached text embeddings are stored in the compute dtype (--mixed_precision)
    text_encoder_precisions: dict = field(default_factory=dict)  # {"text_encoder_2": "int8-quanto", ...}
    num_train_timesteps: int = 1000
    allow_pickle: bool = False  # --allow_pickle: load .bin/.pt weights (a pickle can run code) where no safetensors

    @property
    def spec(self):
        return FAMILIES[self.family]

    @property
    def text_parts(self):
        """The family's (tokenizer, text encoder, reading) that this model has (SD3 may come without its T5)."""
        return [part for part in self.spec.text_parts if (self.model_index.get(part[1]) or [None])[0] is not None]

    @property
    def guidance_embeds(self):
        """A guidance-distilled model (FLUX.1-dev): the guidance value is an input of the transformer."""
        return bool(self.model_config.get("guidance_embeds"))

    @property
    def vae_scale_factor(self):
        """Pixels per latent cell: 8 for SD's VAEs, 1 in pixel space (IF)."""
        return 1 if self.spec.pixels else 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def native_resolution(self):
        return self.model_config.get("sample_size", 128) * self.vae_scale_factor  # FLUX: no sample_size, 1024 px


# ---------------------------------------------------------------------------------------------------------------------
# Finding the model and its family


def detect_family(model_index, unet_config, where):
    """The model family from its own configs, so tiny test models are detected like real ones.

    SD3 / FLUX.1: the class of the transformer. DeepFloyd IF: no VAE, a UNet that projects its text
    (encoder_hid_dim) and predicts twice the channels it denoises (the noise and its variance); stage II also takes
    the low-resolution picture (6 channels in) and its noise level as a class label. SDXL: the UNet takes
    'text_time' added conditioning; the refiner has no first text encoder and scores aesthetics. SD 2.x: 1024-wide
    cross-attention (OpenCLIP-H) or, for small models, linear attention projections (an SD 2 trait SD 1 UNets
    lack). Everything else with a CLIP text encoder is SD 1.x."""
    if "transformer" in model_index:
        family = TRANSFORMER_FAMILIES.get(unet_config.get("_class_name"))
        if family is None:
            raise SystemExit(f"{where}: a {unet_config.get('_class_name')} transformer is not a model this tool "
                             f"trains (it trains {', '.join(TRANSFORMER_FAMILIES)} and SD 1.x/2.x/SDXL UNets)")
        return family
    if "vae" not in model_index and unet_config.get("encoder_hid_dim") and unet_config.get("out_channels") == 6:
        if unet_config.get("in_channels") == 6 and unet_config.get("class_embed_type") == "timestep":
            return "if-ii"
        if unet_config.get("in_channels") != 3:
            raise SystemExit(f"{where}: an IF-like UNet with {unet_config.get('in_channels')} input channels and "
                             f"class_embed_type={unet_config.get('class_embed_type')}: neither DeepFloyd IF stage I "
                             "(3 channels) nor stage II (6, with a timestep class embedding)")
        return "if"
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
    family = detect_family(model_index, model_config, ref)
    if FAMILIES[family].pixels and getattr(args, "pretrained_vae_model_name_or_path", None):
        raise SystemExit(f"--pretrained_vae_model_name_or_path: {ref} is {family}, which works on pixels and has no "
                         "VAE; leave the flag out")
    vae_folder = find_vae(args)
    if not (FAMILIES[family].pixels or vae_folder or os.path.isfile(os.path.join(folder, "vae", "config.json"))):
        raise SystemExit(f"{ref}: the model folder has no vae/config.json; it is incomplete or not a text-to-image "
                         "model")
    t5_max_length = getattr(args, "t5_max_sequence_length", None) or FAMILIES[family].t5_max_length
    if family == "flux" and not model_config.get("guidance_embeds"):
        t5_max_length = getattr(args, "t5_max_sequence_length", None) or 256  # schnell's, as its pipeline card
    return ModelInfo(
        ref=ref, folder=folder, family=family, variant=args.variant, model_index=model_index,
        model_config=model_config, scheduler_config=scheduler_config, t5_max_length=t5_max_length,
        text_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(getattr(args, "mixed_precision", None),
                                                                      torch.float32),
        prediction_type="flow" if FAMILIES[family].objective == "flow" else
        scheduler_config.get("prediction_type", "epsilon"),
        num_train_timesteps=scheduler_config.get("num_train_timesteps", 1000),
        vae_config=None if FAMILIES[family].pixels else
        files.read_json(os.path.join(vae_folder or os.path.join(folder, "vae"), "config.json")),
        vae_folder=vae_folder,
        text_encoder_precisions={name: getattr(args, f"text_encoder_{i}_precision", "no_change") or "no_change"
                                 for i, name in enumerate(("text_encoder", "text_encoder_2", "text_encoder_3"), 1)},
        allow_pickle=allow_pickle,
    )


# Flags that mean something for some families only: (what they apply to, whether `info` is one). Given for a model
# of another family (set to other than their default), they are refused rather than silently ignored.
FAMILY_FLAGS = {
    "preview_vae": ("families with a VAE (IF's in-progress image is the picture; its previews need none)",
                    lambda info: not info.spec.pixels),
    "t5_max_sequence_length": ("SD3 and FLUX.1 (IF's T5 reads 77 tokens, fixed by its pipeline)",
                               lambda info: info.spec.t5_max_length > 0),
    "flux_guidance_value": ("a guidance-distilled FLUX.1 (dev)", lambda info: info.guidance_embeds),
    "data_aesthetic_score": ("the SDXL refiner", lambda info: info.spec.time_ids == "aesthetic"),
    "refiner_training_strength": ("the SDXL refiner", lambda info: info.spec.refines),
    "lora_format": ("the families ComfyUI and A1111 draw with (kohya's layout; not IF)",
                    lambda info: not info.spec.pixels),
    "validation_resolution": ("models that draw from a prompt alone (an SDXL refiner refines, and IF stage II "
                              "enlarges, the subject's pictures at their own sizes)",
                              lambda info: not info.spec.draws_from_pictures),
    "if_noise_level": ("DeepFloyd IF stage II", lambda info: info.spec.upscales > 1),
}


def refuse_flags_of_other_families(info, args, parser):
    """A flag of FAMILY_FLAGS given for a model it does not apply to is an error (`parser`: a fresh one of the
    script, for the defaults); so is --train_text_encoder where the model has no CLIP encoder to train (IF)."""
    for name, (applies_to, applies) in FAMILY_FLAGS.items():
        if getattr(args, name, None) != parser.get_default(name) and not applies(info):
            raise SystemExit(f"--{name} applies to {applies_to}; {info.ref} is {info.family}: leave it out")
    if getattr(args, "train_text_encoder", False) and all(part[2].startswith("t5") for part in info.text_parts):
        raise SystemExit(f"--train_text_encoder trains a LoRA on CLIP text encoders; {info.ref} ({info.family}) reads "
                         "its captions with T5 alone, which stays frozen (and cached): leave the flag out")


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
    return None if info.spec.pixels else load_component(info, "vae", dtype).to(device).requires_grad_(False)


def load_text_encoders(info, device="cpu", dtype=torch.float32):
    """The family's tokenizers and frozen text encoders: loaded in `dtype`, then quantised as
    --text_encoder_N_precision asks (a quantised weight's dtype cannot change afterwards)."""
    tokenizers, encoders = [], []
    for tokenizer_name, encoder_name, _ in info.text_parts:
        tokenizers.append(load_component(info, tokenizer_name))
        encoder = quantise.quantize_model(load_component(info, encoder_name, dtype),
                                          info.text_encoder_precisions.get(encoder_name), dtype)
        encoder.to(device).requires_grad_(False).eval()
        encoders.append(encoder)
    return tokenizers, encoders


def load_pipeline(info, device="cpu", dtype=torch.float32):
    """The model's own inference pipeline (its scheduler included), every component loaded from the folder."""
    tokenizers, text_encoders = load_text_encoders(info, device, dtype)
    denoiser = load_component(info, info.spec.denoiser, dtype).to(device)
    vae = load_vae(info, device, dtype)  # SDXL's pipeline upcasts its VAE itself (force_upcast)
    return build_pipeline(info, denoiser, vae, tokenizers, text_encoders)


def build_pipeline(info, denoiser, vae, tokenizers, text_encoders, scheduler=None):
    """The family's diffusers inference pipeline from components already in memory (for validation images)."""
    import diffusers

    parts = {info.spec.denoiser: denoiser, "scheduler": scheduler or drawing_scheduler(info),
             **info.spec.pipeline_options}
    if not info.spec.pixels:
        parts["vae"] = vae
    if info.spec.upscales > 1:  # IF stage II noises the picture it enlarges with a scheduler of its own
        parts["image_noising_scheduler"] = load_component(info, "image_noising_scheduler")
    for (tokenizer_name, encoder_name, _) in info.spec.text_parts:  # an optional part it lacks (SD3's T5): None
        parts[tokenizer_name], parts[encoder_name] = None, None
    for (tokenizer_name, encoder_name, _), tokenizer, encoder in zip(info.text_parts, tokenizers, text_encoders):
        parts[tokenizer_name], parts[encoder_name] = tokenizer, encoder
    return getattr(diffusers, info.spec.pipeline)(**parts)


def denoiser_of(pipe):
    """A pipeline's trained model: its UNet or its transformer."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def drawing_scheduler(info):
    """The model's own scheduler, as its pipeline draws with it. IF's predicts a learned variance that training
    leaves as it was (only the noise half is trained: see predict), so a trained IF draws with the fixed variance
    instead, as diffusers' DreamBooth guide runs an IF LoRA."""
    scheduler = load_component(info, "scheduler")
    if scheduler.config.get("variance_type") in ("learned", "learned_range"):
        scheduler = type(scheduler).from_config(scheduler.config, variance_type="fixed_small")
    return scheduler


def drawing_call_options(info):
    """What every call of the family's pipeline takes besides the prompt and sizes: T5's sequence length as trained;
    for IF the caption read as the training read it (lower-cased; its pipeline's default also strips URLs and
    punctuation where bs4 and ftfy are installed)."""
    if info.spec.pixels:
        return {"clean_caption": False}
    return {"max_sequence_length": info.t5_max_length} if info.spec.t5_max_length else {}


def sampler(name, scheduler_config, **overrides):
    """A fresh diffusers sampler by its flag name (SAMPLERS), configured like the model's own scheduler."""
    import diffusers

    return getattr(diffusers, SAMPLERS[name]).from_config(scheduler_config, **overrides)


# ---------------------------------------------------------------------------------------------------------------------
# Text encoding and conditioning


def read_text_encoder(tokenizer, encoder, prompts, reading, max_length):
    """(sequence, pooled) from one text encoder as its family's pipeline reads it (either may be None)."""
    if reading == "t5 masked":  # IF's pipeline lower-cases and strips the caption, and masks T5's padding
        prompts = [prompt.lower().strip() for prompt in prompts]
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids = tokens.input_ids.to(encoder.device)
    if reading == "t5":  # T5 without an attention mask, as the SD3 and FLUX pipelines run it
        return encoder(ids)[0], None
    if reading == "t5 masked":
        return encoder(ids, attention_mask=tokens.attention_mask.to(encoder.device))[0], None
    if reading == "last":
        mask = tokens.attention_mask.to(encoder.device) if getattr(encoder.config, "use_attention_mask", False) else None
        return encoder(ids, attention_mask=mask)[0], None
    output = encoder(ids, output_hidden_states=True)
    if reading == "pooled":  # FLUX: CLIP's pooled output (CLIPTextModel, no projection), no sequence
        return None, output.pooler_output
    # penultimate: CLIPTextModelWithProjection's first output is text_embeds, the pooled vector SDXL and SD3 use
    return output.hidden_states[-2], output[0] if output[0].ndim == 2 else None


def encode_prompt(info, tokenizers, text_encoders, prompts):
    """encode_text without gradients: what the caches and every frozen use read."""
    with torch.no_grad():
        return encode_text(info, tokenizers, text_encoders, prompts)


def encode_text(info, tokenizers, text_encoders, prompts):
    """Prompt embeddings exactly as the family's diffusers pipeline computes them in encode_prompt, with gradients
    where the encoders have trainable weights (--train_text_encoder: a LoRA on the CLIP encoders).

    SD 1.x / 2.x: the text encoder's last hidden state (SD 2's shipped encoder is already cut to the penultimate
    layer). SDXL: penultimate hidden states of both encoders concatenated, pooled output of the second. SD3: the
    two CLIPs' penultimate states concatenated, zero-padded to T5's width and followed along the sequence by T5's
    (zeros where the model has no T5); pooled = both CLIPs' pooled vectors. FLUX.1: T5's sequence, CLIP's pooled.
    IF: T5's sequence (its padding masked inside T5; the UNet reads all 77 positions, as IF's pipeline gives them).
    Returns {"prompt_embeds": (B, L, D)} plus "pooled_prompt_embeds": (B, D') where the family has one."""
    sequences, pooled, t5 = [], [], None
    for (_, _, reading), tokenizer, encoder in zip(info.text_parts, tokenizers, text_encoders):
        length = {"t5": info.t5_max_length, "t5 masked": IF_TEXT_LENGTH}.get(reading, tokenizer.model_max_length)
        sequence, vector = read_text_encoder(tokenizer, encoder, prompts, reading, length)
        if reading == "t5":
            t5 = sequence
        elif sequence is not None:
            sequences.append(sequence)
        if vector is not None:
            pooled.append(vector)
    if t5 is None and any(reading == "t5" for _, _, reading in info.spec.text_parts) and sequences:
        # SD3 without its T5: as its pipeline, max_sequence_length zeros of the transformer's context width
        t5 = torch.zeros(len(prompts), info.t5_max_length, info.model_config["joint_attention_dim"],
                         device=sequences[0].device, dtype=sequences[0].dtype)
    embeds = torch.cat(sequences, dim=-1) if sequences else None
    if t5 is not None:
        embeds = t5 if embeds is None else torch.cat(
            [torch.nn.functional.pad(embeds, (0, t5.shape[-1] - embeds.shape[-1])), t5], dim=-2)
    result = {"prompt_embeds": embeds.float()}
    if pooled:
        result["pooled_prompt_embeds"] = torch.cat(pooled, dim=-1).float()
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


def conditioning_options(info, args):
    """What conditioning() needs besides the batch: a refiner's aesthetic score (--data_aesthetic_score), a
    guidance-distilled FLUX's guidance value (--flux_guidance_value); nothing for other families."""
    if info.spec.time_ids == "aesthetic":
        return {"aesthetic_score": args.data_aesthetic_score}
    if info.guidance_embeds:
        return {"guidance": args.flux_guidance_value}
    return {}


def conditioning(info, texts, transforms, aesthetic_score=None, guidance=None, low_resolution=None, on=None):
    """The denoiser's keyword arguments besides the noisy latents and timesteps, for a batch: each sample's
    text embeddings (`texts`: {"prompt_embeds", "pooled_prompt_embeds"} each) as encoder_hidden_states; for SDXL
    added_cond_kwargs: the pooled text and the time ids of each sample's crop (`transforms`); for SD3 / FLUX the
    pooled text as pooled_projections, and a guidance-distilled FLUX's guidance value per sample; for IF stage II
    `low_resolution` (objectives.LowResolution's: the enlarged noisy picture as "upscaled", its noise level as
    "class_labels"). With `on` ((device, dtype)): moved there by conditioning_on."""
    cond = {"encoder_hidden_states": torch.stack([text["prompt_embeds"] for text in texts]), **(low_resolution or {})}
    if info.spec.time_ids:
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.stack([text["pooled_prompt_embeds"] for text in texts]),
            "time_ids": torch.stack([sdxl_time_ids(transform, aesthetic_score) for transform in transforms]),
        }
    if info.spec.denoiser == "transformer":
        cond["pooled_projections"] = torch.stack([text["pooled_prompt_embeds"] for text in texts])
        if guidance is not None:
            cond["guidance"] = torch.full((len(texts),), float(guidance))
    return cond if on is None else conditioning_on(cond, *on)


def low_resolution_of(cond):
    """IF stage II's low-resolution input in a batch's conditioning ({} for other families): to carry over, sliced
    or repeated, to other rows of the same pictures."""
    return {key: cond[key] for key in ("upscaled", "class_labels") if key in cond}


def map_conditioning(function, cond):
    """`function` applied to every tensor of a conditioning dict (to slice, expand or move it)."""
    return {key: map_conditioning(function, value) if isinstance(value, dict) else function(value)
            for key, value in cond.items()}


def conditioning_on(cond, device, dtype):
    """A batch's conditioning on `device`: the text states in the compute dtype, SDXL's pooled text and time ids
    and FLUX's guidance as they are (the denoiser embeds them itself)."""
    moved = map_conditioning(lambda tensor: tensor.to(device), cond)
    for key in ("encoder_hidden_states", "pooled_projections", "upscaled"):
        if key in cond:
            moved[key] = cond[key].to(device, dtype)
    return moved


# ---------------------------------------------------------------------------------------------------------------------
# Calling the denoiser


def latent_scaling(info):
    """(shift, scale): the denoiser sees (vae latent - shift) * scale (SD3 and FLUX.1 have a shift; IF sees the
    pixels as they are)."""
    if info.spec.pixels:
        return 0.0, 1.0
    return info.vae_config.get("shift_factor") or 0.0, info.vae_config.get("scaling_factor", 0.18215)


def pack(latents):
    """FLUX's tokens: each 2x2 patch of a (B, C, H, W) latent as one token of C x 4 channels, (B, H/2 x W/2, 4C)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(tokens, height, width):
    """pack's inverse: (B, H/2 x W/2, 4C) tokens back to a (B, C, H, W) latent."""
    b, _, channels = tokens.shape
    return tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        b, channels // 4, height, width)


def image_ids(height, width, device=None):
    """FLUX's position of each token of a packed (height, width) latent: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def predict(info, model, noisy, timesteps, cond):
    """The denoiser's prediction for noisy latents (B, C, H, W) at `timesteps` (B,) — integer timesteps for a UNet,
    noise levels in (0, 1) for a flow transformer — with a batch's conditioning, in the latents' shape. FLUX's
    tokens are packed in and unpacked out here, so a latent-space mask weights its loss unchanged."""
    if info.spec.denoiser == "unet":
        # IF's UNet predicts the noise and, after it, the range of its learned variance. Only the noise half is
        # trained (as diffusers' IF DreamBooth does): the variance term of IF's own loss needs the full
        # variational bound, and a LoRA on a few images learns the subject from the noise alone; the trained model
        # then draws with a fixed variance (drawing_scheduler). Stage II reads the enlarged low-resolution picture
        # as channels beside the noisy one, as its pipeline gives it.
        if "upscaled" in cond:
            cond = dict(cond)
            inputs = torch.cat([noisy, cond.pop("upscaled").to(noisy.dtype)], dim=1)
            return model(inputs, timesteps, **cond).sample[:, :noisy.shape[1]]
        return model(noisy, timesteps, **cond).sample[:, :noisy.shape[1]]
    timestep = timesteps.to(noisy.dtype if noisy.is_floating_point() else torch.float32) * info.spec.timestep_scale
    if not info.spec.packed:
        return model(hidden_states=noisy, timestep=timestep, return_dict=False, **cond)[0]
    height, width = noisy.shape[-2:]
    text_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=noisy.device)
    tokens = model(hidden_states=pack(noisy), timestep=timestep, img_ids=image_ids(height, width, noisy.device),
                   txt_ids=text_ids, return_dict=False, **cond)[0]
    return unpack(tokens, height, width)
