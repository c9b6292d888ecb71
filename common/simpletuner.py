"""SimpleTuner's config.json given to --config: its keys in our terms, or refused with the reason.

SimpleTuner keeps a run's settings in a config.json of "--flag": value pairs, as we do, and many of its flags are
ours by name and meaning (learning_rate, lora_rank, lycoris_config, data_backend_config, whose multidatabackend.json
common/data.py reads as it is). flags.read_config_file asks this module about each key our parser does not know,
and about the few values of shared keys that SimpleTuner writes its own way ("1024x1024", "adamw_bf16"):

  MAPPED          the key means one of our flags (validation_guidance: --validation_guidance_scale); value converted
  REFUSED         a feature we lack or do differently: the run stops, every such key listed with its reason
  OFF_ONLY        harmless at its off value (what we do anyway), refused at any other
  PASSED_OVER     speed, memory, cache, logging and interface settings: nothing trained or saved changes
  FAMILY_OPTIONS  prefixes of the options of model families this trainer does not train
  SHARED_VALUES   our keys whose values SimpleTuner spells its own way, read as ours

A config is SimpleTuner's when it has "model_family" (SimpleTuner requires one). Then a few SimpleTuner meanings of
shared keys apply too (`simpletuner_rules`): its default weights for the family when the config names none, "constant"
with warm-up steps meaning constant_with_warmup, seed 0 meaning a fresh seed, and a note of its defaults that differ
from ours for the keys the config leaves out.
"""

import json
import os

from common import files


class Refused(ValueError):
    """A SimpleTuner setting this trainer cannot honour; the message says why and what to do instead."""


def plain(value):
    """A JSON value as SimpleTuner reads it: "true"/"false" as booleans, numbers written as text as numbers,
    null and "" as None, so 0, 0.0 and "0.0" compare equal."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "null"):
            return None
        if text in ("true", "false"):
            return text == "true"
        try:
            return float(text)
        except ValueError:
            return text
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Keys that mean one of our flags. Each converter takes (value, the whole config by bare key names) and returns
# {our flag: value}: empty when the setting is already ours by default, several flags where one key sets several.


def renamed(flag):
    return lambda value, config: {flag: value}


def when_on(flag, setting):
    """A SimpleTuner switch that, on, means --flag setting; off, nothing to set."""
    return lambda value, config: {flag: setting} if plain(value) is True else {}


def flow_shift(value, config):
    if plain(config.get("flow_schedule_auto_shift")) is True:
        return {}  # as in SimpleTuner, the auto shift wins over a static one
    shift = plain(value)
    if shift is None:
        return {}
    return {"flow_shift": 1.0 if isinstance(shift, float) and shift <= 0 else value}  # 0: no shift, i.e. 1.0


def adapter_strength(value, config):
    """Validation at another adapter strength: --validation_lora_scales renders that strength (1.0 is our default)."""
    return {} if plain(value) in (None, 1.0) else {"validation_lora_scales": [value]}


def ema_validation(value, config):
    ours = {"none": "raw", "ema_only": "ema", "comparison": "both"}
    if value not in ours:
        raise Refused(f"one of {', '.join(ours)} (none: the trained weights; comparison: both side by side)")
    return {"validation_ema": ours[value]}


def lora_init(value, config):
    if value not in ("default", "gaussian"):
        raise Refused(f"LoRA init '{value}' is not offered here: --lora_init is default (peft's) or gaussian")
    return {"lora_init": value}


def optimizer_settings(value, config):
    """"weight_decay=0.0,eps=1e-8" as our --adam_* flags, which every one of our optimisers takes."""
    ours = {"weight_decay": "adam_weight_decay", "eps": "adam_epsilon", "beta1": "adam_beta1", "beta2": "adam_beta2"}
    found = {}
    for item in filter(None, (part.strip() for part in str(value).split(","))):
        name, _, setting = item.partition("=")
        if name.strip() not in ours:
            raise Refused(f"'{name.strip()}' has no counterpart here; the optimiser takes {', '.join(ours)} (as "
                          "--adam_weight_decay, --adam_epsilon, --adam_beta1, --adam_beta2)")
        found[ours[name.strip()]] = setting.strip()
    return found


def sampling(value, config):
    ours = {"auto-weighting": "auto", "uniform": "uniform"}  # auto: in proportion to each dataset's images
    if value not in ours:
        raise Refused(f"one of {', '.join(ours)}")
    return {"data_sampling": ours[value]}


def lora_modules(value, config):
    """A JSON list of module names (or a file holding one) as --lora_layers' comma-separated names."""
    names = value
    if isinstance(value, str):
        text = value.strip()
        names = json.loads(text) if text.startswith("[") else files.read_json(text, "peft_lora_target_modules")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise Refused("a JSON list of module names, e.g. [\"to_q\", \"to_k\"]")
    return {"lora_layers": ",".join(names)}


def prompt_library(value, config):
    """The prompts of a SimpleTuner prompt library ({"name": "prompt"} or {"name": {"prompt": ...}}), drawn beside
    validation_prompt."""
    library = files.read_json(os.path.expanduser(str(value)), "user_prompt_library")
    if not isinstance(library, dict):
        raise Refused(f"{value}: a prompt library is a JSON object of name: prompt")
    prompts = []
    for name, entry in library.items():
        prompt = entry.get("prompt", entry.get("caption")) if isinstance(entry, dict) else entry
        if not isinstance(prompt, str):
            raise Refused(f"{value}: entry '{name}' holds no prompt text")
        prompts.append(prompt)
    return {"validation_prompt": prompts}


MAPPED = {
    "checkpoint_step_interval": renamed("checkpointing_steps"),
    "save_total_limit": renamed("checkpoints_total_limit"),  # SimpleTuner's older name
    "validation_step_interval": renamed("validation_steps"),
    "validation_guidance": renamed("validation_guidance_scale"),  # FLUX.1-dev: the embedded guidance, as ours
    "validation_adapter_strength": adapter_strength,
    "validation_lycoris_strength": adapter_strength,
    "user_prompt_library": prompt_library,
    "flow_schedule_shift": flow_shift,
    "flow_schedule_auto_shift": when_on("flow_shift", "auto"),  # both: FLUX.1's resolution-dependent shift
    "flow_use_uniform_schedule": when_on("weighting_scheme", "uniform"),
    "ema_validation": ema_validation,
    "ema_cpu_only": when_on("ema_device", "cpu"),
    "optimizer_beta1": renamed("adam_beta1"),
    "optimizer_beta2": renamed("adam_beta2"),
    "optimizer_config": optimizer_settings,
    "lora_init_type": lora_init,
    "peft_lora_target_modules": lora_modules,
    "data_backend_sampling": sampling,
    # On, SimpleTuner adds --noise_offset (otherwise it ignores it: see simpletuner_rules); ours adds it always.
    "offset_noise": lambda value, config: {},
}

# ---------------------------------------------------------------------------------------------------------------------
# Keys refused at any value, and keys refused unless off.

REFUSED = {
    "aspect_bucket_rounding": "buckets here are each image's own size in multiples of 64 px (16 for SD3 and FLUX.1), "
                              "not aspect ratios rounded to decimals: nothing to set; remove the key",
    "aspect_bucket_alignment": "bucket sides here are multiples of 64 px for SD 1.x/2.x/SDXL and 16 for SD3 and "
                               "FLUX.1, what each model needs; not settable: remove the key",
    "tread_config": "TREAD (routing tokens past blocks) is not a feature here",
    "diffusion_blocks_config": "DiffusionBlocks training is not a feature here",
    "distillation_config": "distillation is not a feature here",
    "init_lora": "starting from an existing LoRA is not a feature here (--resume_from_checkpoint continues a run of "
                 "this trainer)",
    "flux_lora_target": "the LoRA's modules here are --lora_target (attention, attention_ff, all) or --lora_layers "
                        "(module names), for every family",
    "pretrained_t5_model_name_or_path": "the text encoders come from the model's own folders (text_encoder_2, "
                                        "text_encoder_3)",
}

OFF_ONLY = {  # key: (its off values, why any other is refused)
    "grad_clip_method": (("norm",), "clipping here scales the global gradient norm down to --max_grad_norm "
                                    "('norm'); 'value' (clipping each element) is not offered: use norm or remove "
                                    "the key, and mind that max_grad_norm then caps the norm"),
    "loss_type": (("l2",), "the loss here is the mean squared error (l2); huber and smooth_l1 are not offered"),
    "controlnet": ((False,), "ControlNet training is not a feature here"),
    "distillation_method": ((None,), "distillation is not a feature here"),
    "ema_warmup_steps": ((0, None), "EMA warm-up here is a decay ramp (--ema_warmup, on by default), not a copy "
                                    "of the weights until a step"),
    "prodigy_steps": ((None,), "Prodigy here adapts its step size for the whole run; no steps setting"),
    "noise_offset_probability": ((1,), "--noise_offset here is added to every sample"),
    "flow_use_beta_schedule": ((False,), "noise levels here are drawn by --weighting_scheme (logit_normal, uniform, "
                                         "mode, ...); no beta schedule"),
    "flux_guidance_mode": (("constant",), "the FLUX.1 guidance trained with is one value (--flux_guidance_value)"),
    "strict_epoch_limit": ((False,), "--max_train_steps wins over --num_train_epochs here: to stop after N epochs, "
                                     "leave max_train_steps out and set num_train_epochs"),
    "minimum_image_size": ((0, None), "set minimum_image_size per dataset, in the data backend config"),
    "t5_padding": (("unmodified",), "T5's padded tokens are passed as the encoder gives them"),
    "text_encoder_4_precision": (("no_change",), "a fourth text encoder is HiDream's; models here have at most three"),
    "quantize_activations": ((False,), "only weights are quantised here (--base_model_precision)"),
    "trust_remote_code": ((False,), "models here load with diffusers' own classes, never code from their repository"),
    "delete_problematic_images": ((False,), "this trainer never deletes files from a dataset"),
    "vae_cache_scan_behaviour": (("recreate",), "a cached latent whose record does not match its image is always "
                                                "recomputed here ('recreate'); 'sync' is not offered"),
    "validation_disable": ((False,), "without --validation_prompt no validation images are drawn: leave it out"),
    "validation_prompt_library": ((False,), "SimpleTuner's built-in prompts are not here: give --validation_prompt "
                                            "(several allowed) or a user_prompt_library file"),
    "validation_guidance_rescale": ((0,), "guidance rescale is not offered in validation here"),
    "validation_guidance_real": ((1,), "true classifier-free guidance on FLUX.1 is not offered in validation here"),
    "validation_guidance_skip_layers": ((None,), "skip-layer guidance is not offered in validation here"),
    "prediction_type": ((None,), "the prediction type is read from the model's scheduler config"),
    "input_perturbation": ((0,), "input perturbation is not a feature here"),
    "snr_weight": ((1,), "--snr_gamma weights the loss here without a further multiplier"),
    "masked_loss_probability": ((1,), "a dataset's masks apply to every sample here"),
    "lr_scale": ((False,), "--learning_rate is used as given here, not scaled by batch size and GPU count"),
    "lr_scale_sqrt": ((False,), "--learning_rate is used as given here, not scaled by batch size and GPU count"),
    "checkpoint_epoch_interval": ((None,), "checkpoints here come every --checkpointing_steps steps"),
    "checkpointing_rolling_steps": ((0,), "rolling checkpoints are not offered; --checkpoints_total_limit keeps the "
                                          "newest N"),
    "validation_epoch_interval": ((None,), "validation here comes every --validation_steps steps"),
    "eval_epoch_interval": ((None,), "the eval loss here comes every --eval_steps_interval steps"),
    "validation_randomize": ((False,), "validation seeds here are fixed (--validation_seed + k), to compare steps"),
    "validation_noise_scheduler": ((None,), "validation images here are drawn with the model's own scheduler"),
    "cache_dir_vae": ((None,), "set cache_dir_vae per dataset in the data backend config; --cache_dir moves the root "
                               "of every cache"),
    "cache_dir_text": ((None, "cache"), "the text cache is the data backend config's text_embeds dataset's "
                                        "cache_dir (default: --cache_dir/text)"),
    "push_checkpoints_to_hub": ((False,), "checkpoints stay in --output_dir; --push_to_hub uploads the result at the "
                                          "end"),
}

# ---------------------------------------------------------------------------------------------------------------------
# Keys passed over: nothing of what is trained or saved depends on them here.

ATTENTION = "attention here is diffusers' default, PyTorch's scaled_dot_product_attention, which picks its kernel"
CACHES = "latents and text embeddings are cached on disk before training here, checked against their sources"
MEMORY = ("no such offloading here; memory is saved with --base_model_precision, --gradient_checkpointing and "
          "--offload_frozen")
NO_COMPILE = "no torch.compile here: the same run, without compilation"
LAUNCH = "processes here come from `accelerate launch` (--num_processes N for N GPUs)"
QUANTISE = "quantisation here happens as the model loads (--base_model_precision)"

PASSED_OVER = {
    "model_family": "the family (SD 1.x/2.x, SDXL, SD3, FLUX.1, Chroma, DeepFloyd IF) is read from the model's own "
                    "config files",
    "model_flavour": "the weights are the ones --pretrained_model_name_or_path names",
    "attention_mechanism": ATTENTION,
    "fuse_qkv_projections": ATTENTION,
    "dynamo_backend": NO_COMPILE,
    "dynamo_mode": NO_COMPILE,
    "dynamo_use_regional_compilation": NO_COMPILE,
    "validation_torch_compile": NO_COMPILE,
    "num_processes": LAUNCH,
    "context_parallel_size": LAUNCH,
    "context_parallel_comm_strategy": LAUNCH,
    "find_unused_parameters": LAUNCH,
    "quantize_via": QUANTISE,
    "base_model_default_dtype": QUANTISE,
    "sdnq_compile_mode": QUANTISE,
    "sdnq_group_size": QUANTISE,
    "sdnq_hadamard_group_size": QUANTISE,
    "sdnq_use_hadamard": QUANTISE,
    "sdnq_use_quantized_matmul": QUANTISE,
    "ramtorch": MEMORY,
    "ramtorch_disable_extensions": MEMORY,
    "ramtorch_disable_sync_hooks": MEMORY,
    "ramtorch_target_modules": MEMORY,
    "ramtorch_text_encoder": MEMORY,
    "ramtorch_transformer_percent": MEMORY,
    "musubi_blocks_to_swap": MEMORY,
    "enable_group_offload": MEMORY,
    "group_offload_type": MEMORY,
    "group_offload_blocks_per_group": MEMORY,
    "group_offload_use_stream": MEMORY,
    "group_offload_to_disk_path": MEMORY,
    "enable_model_cpu_offload": MEMORY,
    "offload_during_startup": MEMORY,
    "gradient_checkpointing_backend": "--gradient_checkpointing here recomputes every block (PyTorch's)",
    "gradient_checkpointing_interval": "--gradient_checkpointing here recomputes every block",
    "gradient_checkpointing_segment_stride": "--gradient_checkpointing here recomputes every block",
    "vae_enable_slicing": "VAE encoding here goes --vae_batch_size images at a time",
    "vae_enable_tiling": "VAE encoding here goes --vae_batch_size images at a time",
    "vae_enable_patch_conv": "VAE encoding here goes --vae_batch_size images at a time",
    "vae_enable_temporal_roll": "VAE encoding here goes --vae_batch_size images at a time",
    "vae_cache_ondemand": CACHES,
    "vae_cache_disable": CACHES,
    "text_cache_ondemand": CACHES,
    "text_cache_disable": CACHES,
    "compress_disk_cache": CACHES,
    "skip_file_discovery": CACHES,
    "text_encoder_batch_size": CACHES,
    "disable_bucket_pruning": "buckets are never pruned here: a bucket smaller than the batch repeats its images",
    "allow_dataset_oversubscription": "a dataset smaller than the batch repeats its images here, with a notice",
    "conditioning_multidataset_sampling": "conditioning here is an image dataset's one mask dataset",
    "disable_benchmark": "no pictures of the untrained model before training; --validation_lora_scales 0 1 draws "
                         "the base model beside each validation image",
    "validation_disable_unconditional": "validation here draws the prompts given, no unconditional image",
    "num_eval_images": "CLIP scores here are taken on the validation images (--num_validation_images per prompt)",
    "tracker_project_name": "trackers log to the project 'dreambooth' (TensorBoard: OUTPUT_DIR/logs)",
    "tracker_run_name": "trackers log to the project 'dreambooth' (TensorBoard: OUTPUT_DIR/logs)",
    "push_to_hub_background": "the hub upload happens once, at the end",
    "disable_tf32": "TF32 matmuls are PyTorch's default here",
    "local_rank": LAUNCH,
    "num_machines": LAUNCH,
    "accelerate_config": LAUNCH,
    "seed_for_each_device": "each process here draws its own batches of the one seeded stream",
    "gradient_precision": "trainable weights and their gradients are fp32 here",
    "vae_dtype": "the VAE encodes the cache in fp32 here (once per image)",
    "read_batch_size": CACHES,
    "write_batch_size": CACHES,
    "image_processing_batch_size": CACHES,
    "metadata_update_interval": CACHES,
    "override_dataset_config": CACHES,
    "preserve_data_backend_cache": CACHES,
    "checkpointing_use_tempdir": "checkpoints here are always written to a temporary folder, then renamed",
    "checkpoints_rolling_total_limit": "only for rolling checkpoints, which are not offered",
    "validation_on_startup": "no pictures of the untrained model before training; --validation_lora_scales 0 1 "
                             "draws the base model beside each validation image",
    "logging_dir": "logs go to OUTPUT_DIR/logs here",
    "model_card_note": "the model card here is written from the run's settings",
    "configs_dir": "SimpleTuner's own store of configs",
}

# Options of SimpleTuner's model families that are not trained here (they appear only in those families' configs).
FAMILY_OPTIONS = {
    "cosmos3_": "Cosmos 3", "hidream_": "HiDream", "ideogram_": "Ideogram", "ltx2_": "LTX-2", "minimax_": "MiniMax",
    "wan_": "Wan", "audio_": "audio", "validation_audio": "audio", "validation_lyrics": "audio",
    "validation_num_video_frames": "video", "framerate": "video",
}

# ---------------------------------------------------------------------------------------------------------------------
# SimpleTuner's spelling of values of keys we share


def optimizer_name(value):
    same = {"adamw_bf16": "adamw", "optimi-adamw": "adamw", "torch-adamw": "adamw", "bnb-adamw": "adamw",
            "bnb-adamw8bit": "adamw8bit", "ao-adamw8bit": "adamw8bit"}
    if value in same:  # trainable weights stay fp32 here, so bf16-state variants are plain AdamW
        return same[value], "the same optimiser (trainable weights stay fp32 here; --adam_* set it)"
    return value, None


SHARED_VALUES = {
    "optimizer": optimizer_name,
    "report_to": lambda value: ("tensorboard", "local charts, as TensorBoard under OUTPUT_DIR/logs")
    if value == "simpletuner" else (value, None),
    "lr_scheduler": lambda value: ("cosine", "SimpleTuner's alias") if value == "cosine_with_warmup" else (value, None),
}

# ---------------------------------------------------------------------------------------------------------------------
# A SimpleTuner config's own meanings

# SimpleTuner's weights for a family and flavour (its default flavour first), for a config that names none.
DEFAULT_MODELS = {
    "sd1x": {"dreamshaper": "Lykon/dreamshaper-8", "1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
             "1.4": "CompVis/stable-diffusion-v1-4"},
    "sd2x": {"pseudoflex-v2": "bghira/pseudo-flex-v2", "2.1": "stabilityai/stable-diffusion-2-1",
             "2.0": "stabilityai/stable-diffusion-2-0", "digitaldiffusion": "Junglerally/Digital-Diffusion",
             "pseudojourney": "bghira/pseudo-journey-v2"},
    "sdxl": {"base-1.0": "stabilityai/stable-diffusion-xl-base-1.0",
             "refiner-1.0": "stabilityai/stable-diffusion-xl-refiner-1.0",
             "base-0.9": "stabilityai/stable-diffusion-xl-base-0.9",
             "refiner-0.9": "stabilityai/stable-diffusion-xl-refiner-0.9"},
    "sd3": {"medium": "stabilityai/stable-diffusion-3.5-medium", "large": "stabilityai/stable-diffusion-3.5-large"},
    "flux": {"krea": "black-forest-labs/flux.1-krea-dev", "dev": "black-forest-labs/flux.1-dev",
             "schnell": "black-forest-labs/flux.1-schnell"},
    "chroma": {"base": "lodestones/Chroma1-Base", "hd": "lodestones/Chroma1-HD"},
    "deepfloyd": {"i-medium-400m": "DeepFloyd/IF-I-M-v1.0", "i-large-900m": "DeepFloyd/IF-I-L-v1.0",
                  "i-xlarge-4.3b": "DeepFloyd/IF-I-XL-v1.0", "ii-medium-450m": "DeepFloyd/IF-II-M-v1.0",
                  "ii-large-1.2b": "DeepFloyd/IF-II-L-v1.0"},
}

FLOW_FAMILIES = ("sd3", "flux", "chroma")  # of DEFAULT_MODELS, those trained by flow matching (--flow_shift applies)

# Our flag: (SimpleTuner's key, its default) where the defaults differ in what is trained or kept.
DEFAULTS_DIFFER = {
    "model_type": ("model_type", "full"),
    "learning_rate": ("learning_rate", 4e-7),
    "lr_scheduler": ("lr_scheduler", "constant_with_warmup"),
    "lr_power": ("lr_power", 0.8),
    "max_grad_norm": ("max_grad_norm", "2.0, clipping each gradient value"),
    "lora_dropout": ("lora_dropout", 0.1),
    "lora_init": ("lora_init_type", "peft's default init"),
    "flow_shift": ("flow_schedule_shift", 3.0),
    "ema_decay": ("ema_decay", 0.995),
    "gradient_checkpointing": ("gradient_checkpointing", True),
    "mixed_precision": ("mixed_precision", "bf16"),
    "resume_from_checkpoint": ("resume_from_checkpoint", "latest"),
    "checkpoints_total_limit": ("checkpoints_total_limit", 5),
}


def find(config, name):
    """The key of `config` that is `name` with or without leading dashes, or None."""
    return next((key for key in config if key.lstrip("-") == name), None)


def simpletuner_rules(config, raw, ours, notes):
    """SimpleTuner's meanings of a config's shared keys, applied to `config` (in our terms) in place."""
    family, flavour = raw.get("model_family"), raw.get("model_flavour")
    if "pretrained_model_name_or_path" in ours and find(config, "pretrained_model_name_or_path") is None:
        models = DEFAULT_MODELS.get(family, {})
        model = models.get(flavour or next(iter(models), None))
        if model:
            config["pretrained_model_name_or_path"] = model
            notes.append(f"'model_family' {family!r}{f' flavour {flavour!r}' if flavour else ''}: no "
                         f"pretrained_model_name_or_path, so SimpleTuner's weights for it: {model}")
        else:
            notes.append(f"'model_family' {family!r}: no pretrained_model_name_or_path and no default weights here; "
                         "pass --pretrained_model_name_or_path")
    scheduler, warmup = find(config, "lr_scheduler"), plain(config.get(find(config, "lr_warmup_steps")))
    if scheduler and config[scheduler] == "constant" and isinstance(warmup, float) and warmup > 0:
        config[scheduler] = "constant_with_warmup"  # diffusers' "constant" would skip the warm-up
        notes.append("'lr_scheduler' constant with lr_warmup_steps: constant_with_warmup, as SimpleTuner reads it")
    seed = find(config, "seed")
    if seed and plain(config[seed]) in (0, -1):
        del config[seed]
        notes.append(f"'seed' {raw['seed']}: SimpleTuner draws a fresh seed each run, as no --seed does here")
    offset = find(config, "noise_offset")
    if offset and plain(config[offset]) and plain(raw.get("offset_noise")) is not True:
        del config[offset]
        notes.append("'noise_offset' without offset_noise: true does nothing in SimpleTuner; not applied here")
    clip = find(config, "max_grad_norm")
    if clip and plain(config[clip]) and "grad_clip_method" not in raw:
        notes.append(f"'max_grad_norm' {config[clip]}: SimpleTuner clips each gradient value at it (its default "
                     "grad_clip_method 'value'); here it caps the global gradient norm")
    left_out = [f"{flag} {'unset' if ours[flag] is None else ours[flag]} (SimpleTuner: {theirs})"
                for flag, (key, theirs) in DEFAULTS_DIFFER.items()
                if flag in ours and key not in raw and find(config, flag) is None
                and (flag != "flow_shift" or family in FLOW_FAMILIES)]
    if left_out:
        notes.append("defaults here are not SimpleTuner's; this config leaves out " + ", ".join(left_out))


# ---------------------------------------------------------------------------------------------------------------------
# The whole config


def unwrap(raw):
    """SimpleTuner's web interface saves {"_metadata": {...}, "config": {flags}}: the flags are the inner object."""
    if isinstance(raw.get("_metadata"), dict) and isinstance(raw.get("config"), dict):
        return raw["config"]
    return raw


def family_of(name):
    """The SimpleTuner model family whose option `name` is, when it is one of FAMILY_OPTIONS."""
    return next((family for prefix, family in FAMILY_OPTIONS.items() if name.startswith(prefix)), None)


def refusal(name, value):
    """Why a SimpleTuner key is refused at this value, or None when it is not."""
    if name in REFUSED:
        return REFUSED[name]
    if name in OFF_ONLY:
        off, reason = OFF_ONLY[name]
        return None if plain(value) in [plain(o) for o in off] else reason
    if family_of(name):
        return f"an option of SimpleTuner's {family_of(name)} models; this trainer trains SD 1.x/2.x, SDXL, SD3, " \
               "FLUX.1, Chroma and DeepFloyd IF"
    return None


def is_simpletuner_key(name):
    return any(name in table for table in (MAPPED, REFUSED, OFF_ONLY, PASSED_OVER)) or family_of(name) is not None


def translate(raw, ours, also_known=()):
    """A config.json's object in our terms. `ours`: {flag name: default} of the reading script's parser;
    `also_known`: keys a sibling script takes, passed over here.

    Returns (config, notes, problems): config holds every key our parser knows (SimpleTuner's spelling of a
    value translated), every key nobody knows (for the caller's unknown-key message) and the flags SimpleTuner's
    keys mean; notes say what was translated or passed over; problems name each refused key with its reason."""
    config, notes, problems = {}, [], []
    bare = {key.lstrip("-"): value for key, value in raw.items()}
    theirs = [key for key in raw if key.lstrip("-") not in ours and key.lstrip("-") not in also_known
              and is_simpletuner_key(key.lstrip("-"))]
    for key, value in raw.items():
        name = key.lstrip("-")
        if key in theirs:
            continue
        if name in ours and name in SHARED_VALUES:
            try:
                converted, why = SHARED_VALUES[name](value)
            except Refused as err:
                problems.append(f"'{key}': {err}")
                continue
            if why:
                notes.append(f"'{key}' {value!r} read as {converted!r}: {why}")
            value = converted
        config[key] = value
    for key in theirs:
        name, value = key.lstrip("-"), raw[key]
        reason = refusal(name, value)
        if reason:
            problems.append(f"'{key}': {reason}")
        elif name in PASSED_OVER:
            notes.append(f"'{key}' passed over: {PASSED_OVER[name]}")
        elif name in OFF_ONLY:
            notes.append(f"'{key}' {value!r} passed over: what happens here anyway")
        else:
            try:
                settings = MAPPED[name](value, bare)
            except (ValueError, SystemExit) as err:  # Refused, or a file it names that cannot be read
                problems.append(f"'{key}': {err}")
                continue
            for flag, setting in settings.items():
                if flag not in ours:
                    continue  # a sibling script's flag (cache_latents.py reads the training config too)
                set_flag(config, flag, setting, key, problems)
                notes.append(f"'{key}' {value!r} -> --{flag} {setting!r}")
            if not settings:
                notes.append(f"'{key}' {value!r}: nothing to set (as here by default)")
    if "model_family" in bare:
        simpletuner_rules(config, bare, ours, notes)
    return config, notes, problems


def set_flag(config, flag, value, source, problems):
    """Put a translated setting into `config`; a different value already there for the flag is a problem."""
    key = find(config, flag)
    if key is None:
        config[flag] = value
    elif flag == "validation_prompt":  # SimpleTuner draws a prompt library beside validation_prompt
        config[key] = (config[key] if isinstance(config[key], list) else [config[key]]) + value
    elif plain(config[key]) != plain(value):
        problems.append(f"'{source}' sets --{flag} {value!r} but '{key}' sets {config[key]!r}: keep one of them")


def say(path, notes):
    """The notes, one line each, from the main process only."""
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(f"{path}: {note}")
