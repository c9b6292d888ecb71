"""Command-line flags: --config FILE.json, the flag groups several scripts share, and true/false flags.

Every script's parser is built from argparse plus the groups here; `parse_args_with_config` lets a config.json
supply any flag (keys with or without '--'; the command line wins). cache_latents.py and evaluate.py read the
training run's config.json too: TRAINING_KEYS names the keys training has beyond the model and data groups, so
those scripts pass over the ones they do not take themselves while still refusing a typo.
"""

import argparse
import difflib

from common import files
from common.quantise import PRECISIONS

# train_dreambooth.py's flags beyond add_model_args and add_data_args (tests/test_config.py checks this list
# against its parser). A script that reads the training config passes over those of them it does not take.
TRAINING_KEYS = frozenset("""
    adam_beta1 adam_beta2 adam_epsilon adam_weight_decay base_model_precision caption_dropout_probability
    checkpointing_steps dop_class dop_trigger dop_weight
    checkpoints_total_limit clip_model data_aesthetic_score data_sampling ema_decay ema_device ema_update_interval ema_warmup
    eval_seed eval_split eval_steps_interval eval_timesteps evaluation_type flow_shift flux_guidance_value
    gradient_accumulation_steps gradient_checkpointing learning_rate lora_alpha
    logit_mean logit_std lora_dropout lora_format lora_init lora_layers lora_rank lora_target lora_type lr_num_cycles lr_power lr_scheduler
    lr_warmup_steps lycoris_config masked_loss_normalize max_grad_norm max_train_steps mixed_precision mode_scale
    model_type
    noise_offset num_train_epochs num_validation_images offload_frozen optimizer preview_vae prior_loss_target
    prior_loss_weight refiner_training_strength resume_from_checkpoint scheduled_sampling_max_step_offset
    scheduled_sampling_probability text_encoder_lr train_text_encoder
    scheduled_sampling_ramp_steps scheduled_sampling_sampler scheduled_sampling_target skip_nan_steps snr_gamma
    train_batch_size use_8bit_adam use_dora use_ema validation_class validation_ema validation_guidance_scale
    validation_instance validation_lora_scales validation_negative_prompt validation_num_inference_steps validation_preview
    validation_preview_steps validation_prompt validation_resolution validation_seed validation_steps
    webhook_config weighting_scheme
""".split())


def closest(name, choices):
    """The known name most like `name`, for 'did you mean' messages."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.0)
    return match[0] if match else None


def str2bool(value):
    """argparse type for booleans written as true/false (also yes/no, 1/0), as config.json writes them."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def number_or_auto(value):
    """argparse type for a positive number or auto (--flow_shift)."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        shift = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {value!r}") from None
    if shift <= 0:
        raise argparse.ArgumentTypeError(f"a shift is a positive number (1.0: none), got {value!r}")
    return shift


def add_bool(parser, name, default=False, help=None):
    """A true/false flag: a bare `--name` means true, `--name false` and config.json's true/false work too."""
    parser.add_argument(name, type=str2bool, nargs="?", const=True, default=default, help=help)


# ---------------------------------------------------------------------------------------------------------------------
# --config FILE.json


def option_names(parser):
    """Every long flag name of a parser, without the leading dashes."""
    return {opt[2:] for action in parser._actions for opt in action.option_strings if opt.startswith("--")}


def config_value(action, key, value, source):
    """Convert one config.json value with the flag's own type and choices, so a file and a command line agree."""

    def convert(item):
        if item is None or action.type is None:
            return item
        try:  # JSON numbers arrive as numbers; the flag's type gets the text a command line would give it
            return str2bool(item) if action.type is str2bool else action.type(str(item))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as err:
            raise SystemExit(f"{source}: '{key}' has a bad value {item!r}: {err}") from None

    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        converted = [convert(item) for item in items]
    elif isinstance(value, list):
        raise SystemExit(f"{source}: '{key}' takes one value, got a list {value!r}")
    else:
        converted = convert(value)
    allowed = action.choices
    for item in converted if isinstance(converted, list) else [converted]:
        if allowed is not None and item is not None and item not in allowed:
            raise SystemExit(f"{source}: '{key}' must be one of {', '.join(map(str, allowed))}; got {item!r}")
    return converted


def read_config_file(path, parser, also_known=()):
    """Values from a config.json for this parser: keys are flag names with or without the leading '--'.

    `also_known` names keys that belong to a sibling script (cache_latents.py reads the training config and
    passes over TRAINING_KEYS); anything else unknown is an error that suggests the closest flag."""
    raw = files.read_json(path, "--config")
    if not isinstance(raw, dict):
        raise SystemExit(f"{path}: a config file holds one JSON object of flag names and values")
    actions = {opt[2:]: action for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    values = {}
    for key, value in raw.items():
        name = key.lstrip("-")
        if name == "config":
            continue
        if name not in actions:
            if name in also_known:
                continue
            hint = closest(name, list(actions) + list(also_known))
            raise SystemExit(f"{path}: unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else ""))
        values[actions[name].dest] = config_value(actions[name], key, value, path)
    return values


def parse_args_with_config(parser, argv=None, also_known=()):
    """parser.parse_args, with --config FILE.json supplying defaults: the command line wins over the file."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**read_config_file(known.config, parser, also_known))
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# Flag groups several scripts share


def add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--pretrained_model_name_or_path", help="diffusers folder, hub id, or a single .safetensors file")
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    group.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (diffusion_pytorch_model.fp16.safetensors)")
    add_bool(group, "--local_files_only", help="never contact the hub; use the local hub cache only")
    group.add_argument("--single_file_config", default=None,
                       help="for a single-file checkpoint: a diffusers folder or hub id holding its component configs")
    add_allow_pickle_arg(group)
    for i in (1, 2, 3):
        group.add_argument(f"--text_encoder_{i}_precision", default="no_change", choices=PRECISIONS,
                           help=f"quantise text encoder {i} (for caching and validation images; SD3's T5 is 3, "
                                "FLUX's 2)")
    group.add_argument("--t5_max_sequence_length", type=int, default=None,
                       help="T5 tokens per caption (SD3, FLUX.1). Default: 77 for SD3 (as diffusers' SD3 "
                            "example), 512 for FLUX.1-dev, 256 for schnell; at most 512")


def add_allow_pickle_arg(parser):
    """--allow_pickle, for every script that loads model weights (see files.safe_weights)."""
    add_bool(parser, "--allow_pickle", help="load a model whose weights are only pickles (.bin/.pt: loading one can "
                                            "run code); only for a source you trust")


def add_data_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--config", default=None, help="JSON file of flag values (keys with or without '--')")
    group.add_argument("--data_backend_config", "--data_config", default=None,
                       help="JSON list of datasets (multidatabackend.json)")
    group.add_argument("--instance_data_dir", default=None, help="simple case: one folder of subject images")
    group.add_argument("--instance_prompt", default=None, help="simple case: the caption of every subject image")
    group.add_argument("--resolution", type=float, default=None,
                       help="default dataset resolution (default: the model's native size)")
    group.add_argument("--resolution_type", default="pixel_area", choices=["pixel", "area", "pixel_area"])
    group.add_argument("--output_dir", default="output")
    group.add_argument("--cache_dir", default=None, help="root of the caches (default: OUTPUT_DIR/cache)")
    group.add_argument("--seed", type=int, default=None, help="makes a run reproducible (random crops included)")
    group.add_argument("--vae_batch_size", type=int, default=4, help="images per VAE encode when caching")


def add_eval_args(parser):
    group = parser.add_argument_group("eval loss (fixed timesteps and noise: comparable across steps and runs)")
    group.add_argument("--eval_split", type=int, default=0,
                       help="hold out N images of the subject for the eval loss (besides any eval datasets)")
    group.add_argument("--eval_timesteps", type=int, default=8, help="evenly spaced timesteps, ends excluded")
    group.add_argument("--eval_seed", type=int, default=0, help="seed of the fixed eval noise")


def add_conditioning_args(parser):
    """What the denoiser is conditioned on besides the caption: the SDXL refiner's aesthetic score and strength,
    a guidance-distilled FLUX.1's guidance value."""
    group = parser.add_argument_group("FLUX.1-dev")
    group.add_argument("--flux_guidance_value", type=float, default=1.0,
                       help="the guidance value a guidance-distilled FLUX.1 trains with. 1.0 (default) keeps the "
                            "distillation intact: the LoRA learns the subject, not a new guidance behaviour; drawing "
                            "uses its own guidance (--validation_guidance_scale, typically 3.5)")
    group = parser.add_argument_group("SDXL refiner")
    group.add_argument("--data_aesthetic_score", type=float, default=7.0,
                       help="the refiner's aesthetic-score conditioning for the training images")
    group.add_argument("--refiner_training_strength", type=float, default=0.2,
                       help="the refiner trains (and is validated) on the lowest-noise share of the timesteps")
