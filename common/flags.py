"""Command-line flags: --config FILE.json, the flag groups several scripts share, and true/false flags.

Every script's parser is built from argparse plus the groups here; `parse_args_with_config` lets a config.json
supply any flag (keys with or without '--'; the command line wins). cache_latents.py and evaluate.py read the
training run's config.json too: TRAINING_KEYS names the keys training has beyond the model and data groups, so
those scripts pass over the ones they do not take themselves while still refusing a typo.
"""

import argparse
import difflib

from common import files, simpletuner
from common.quantise import PRECISIONS

# train_dreambooth.py's flags beyond add_model_args and add_data_args (tests/test_config.py checks this list
# against its parser). A script that reads the training config passes over those of them it does not take.
TRAINING_KEYS = frozenset("""
    adam_beta1 adam_beta2 adam_epsilon adam_weight_decay base_model_precision caption_dropout_probability
    checkpointing_steps dop_class dop_trigger dop_weight
    checkpoints_total_limit clip_model data_aesthetic_score data_sampling ema_decay ema_device ema_update_interval ema_warmup
    eval_seed eval_split eval_steps_interval eval_timesteps evaluation_type flow_shift flux_guidance_value
    if_noise_level
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
    output_kohya_format rank report_to push_to_hub hub_model_id hub_token hub_private_repo
""".split())


def closest(name, choices):
    """The known name most like `name`, for 'did you mean' messages; None when none is close (a hint far from
    the typo misleads more than no hint)."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
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


def picture_sizes(value):
    """argparse type for --validation_resolution: one size or several, comma-separated, each a square's side or
    WIDTHxHEIGHT, as the reference writes them (64,96,64x96,96x64). Returns [(width, height), ...]."""
    sizes = []
    for part in str(value).lower().replace(" ", "").split(","):
        width, _, height = part.partition("x")
        if not width.isdigit() or not (height or width).isdigit() or int(width) < 1 or int(height or width) < 1:
            raise argparse.ArgumentTypeError(f"{part!r} is not a size: give a square's side or WIDTHxHEIGHT, several "
                                             "comma-separated (e.g. 1024 or 1024,832x1216)")
        sizes.append((int(width), int(height or width)))
    return sizes


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
    passes over TRAINING_KEYS). SimpleTuner's keys are read in our terms where they mean one of our flags (see
    common/simpletuner.py). Anything else unknown is an error, with the closest flag when one is close; every
    problem of the file is listed at once."""
    raw = files.read_json(path, "--config")
    if not isinstance(raw, dict):
        raise SystemExit(f"{path}: a config file holds one JSON object of flag names and values")
    actions = {opt[2:]: action for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    defaults = {name: action.default for name, action in actions.items()}
    raw, notes, problems = simpletuner.translate(simpletuner.unwrap(raw), defaults, also_known)
    values = {}
    for key, value in raw.items():
        name = key.lstrip("-")
        if name == "config":
            continue
        if name not in actions:
            if name not in also_known:
                hint = closest(name, list(actions) + list(also_known))
                problems.append(f"unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else ""))
            continue
        try:
            values[actions[name].dest] = config_value(actions[name], key, value, path)
        except SystemExit as err:
            problems.append(str(err).removeprefix(f"{path}: "))
    if len(problems) == 1:
        raise SystemExit(f"{path}: {problems[0]}")
    if problems:
        raise SystemExit(f"{path}: {len(problems)} keys cannot be used here:\n  - " + "\n  - ".join(problems))
    simpletuner.say(path, notes)
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
    group.add_argument("--pretrained_vae_model_name_or_path", default=None,
                       help="a VAE to use instead of the model's own (a folder or hub id holding its config.json, "
                            "e.g. madebyollin/sdxl-vae-fp16-fix: SDXL's VAE without fp16 overflow)")
    group.add_argument("--single_file_config", default=None,
                       help="for a single-file checkpoint: a diffusers folder or hub id holding its component configs")
    add_allow_pickle_arg(group)
    for i in (1, 2, 3):  # --text_encoder_precision: the first (IF's only one, its T5)
        group.add_argument(f"--text_encoder_{i}_precision", *(["--text_encoder_precision"] if i == 1 else []),
                           default="no_change", choices=PRECISIONS,
                           help=f"quantise text encoder {i} (for caching and validation images; SD3's T5 is 3, "
                                "FLUX.1's 2, IF's, Chroma's T5 and FLUX.2 klein's Qwen3 1)")
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
    group.add_argument("--resolution_type", default="pixel_area", choices=["pixel", "area", "pixel_area"],
                       help="what --resolution measures: pixel, the shorter side in px; area, megapixels; pixel_area, "
                            "the area of a square of that side (aspect buckets keep it)")
    group.add_argument("--output_dir", default="output", help="where the weights, checkpoints, logs and images go")
    group.add_argument("--output_name", default=None,
                       help="file name (without .safetensors) of the saved adapter, e.g. ohwx_dog (default: "
                            "pytorch_lora_weights, as diffusers names it); ComfyUI keeps many LoRAs in one folder")
    group.add_argument("--cache_dir", default=None, help="root of the caches (default: OUTPUT_DIR/cache)")
    group.add_argument("--seed", type=int, default=None, help="makes a run reproducible (random crops included)")
    group.add_argument("--vae_batch_size", type=int, default=4, help="images per VAE encode when caching")
    # diffusers' DreamBooth example's way to ask for prior preservation, for commands that carry over
    add_bool(group, "--with_prior_preservation",
             help="add a regularisation dataset: the --class_data_dir images captioned --class_prompt (training "
                  "has the base model make the missing ones when the folder holds fewer than --num_class_images, "
                  "as make_regularisation.py does)")
    group.add_argument("--class_data_dir", default=None, help="with --with_prior_preservation: the class images")
    group.add_argument("--class_prompt", default=None, help="with --with_prior_preservation: their caption, e.g. "
                                                            "\"a photo of a dog\"")
    group.add_argument("--num_class_images", type=int, default=100,
                       help="with --with_prior_preservation: how many class images the folder should hold")


def add_eval_args(parser):
    group = parser.add_argument_group("eval loss (fixed timesteps and noise: comparable across steps and runs)")
    group.add_argument("--eval_split", type=int, default=0,
                       help="hold out N images of the subject for the eval loss (besides any eval datasets)")
    group.add_argument("--eval_timesteps", type=int, default=8, help="evenly spaced timesteps, ends excluded")
    group.add_argument("--eval_seed", type=int, default=0, help="seed of the fixed eval noise")


def add_conditioning_args(parser):
    """What the denoiser is conditioned on besides the caption: the SDXL refiner's aesthetic score and strength,
    a guidance-distilled FLUX.1's guidance value, IF stage II's noise level."""
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
    group = parser.add_argument_group("DeepFloyd IF stage II")
    group.add_argument("--if_noise_level", type=int, default=250,
                       help="the noise on the low-resolution picture stage II enlarges: training draws its level "
                            "uniformly from 0 to this, validation and evaluate.py use it (the pipeline's noise_level; "
                            "0-999, default 250 as the pipeline's)")


def add_flow_args(parser):
    """SD3 and FLUX.1: which noise levels are trained, and how they are weighted."""
    group = parser.add_argument_group("flow matching (SD3, FLUX.1): which noise levels are trained, and how weighted")
    group.add_argument("--weighting_scheme", default="logit_normal",
                       choices=["logit_normal", "uniform", "mode", "cosmap", "sigma_sqrt"],
                       help="how noise levels are drawn (logit_normal, mode: denser mid-range, as the SD3 paper) "
                            "and weighted (cosmap, sigma_sqrt: per-sample loss weights)")
    group.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal: mean")
    group.add_argument("--logit_std", type=float, default=1.0, help="logit_normal: standard deviation")
    group.add_argument("--mode_scale", type=float, default=1.29, help="mode: scale")
    group.add_argument("--flow_shift", type=number_or_auto, default=None,
                       help="shift of the noise levels towards noise: a number S (static), or auto (FLUX.1-dev's "
                            "resolution-dependent shift, as its pipeline draws). Default: the model's scheduler "
                            "(SD3 3.0, FLUX.1-dev auto, schnell 1.0), i.e. the levels it is drawn at")


def add_rollout_args(parser, samplers):
    """Scheduled sampling: `samplers` are the deterministic ones a rollout may use."""
    group = parser.add_argument_group("scheduled sampling (rollouts): train on the model's own imperfect x_t")
    group.add_argument("--scheduled_sampling_max_step_offset", type=int, default=0,
                       help="K: a rolled-out sample starts k ~ U{1..K} timesteps higher (0 = off; 5-10 is typical)")
    group.add_argument("--scheduled_sampling_probability", type=float, default=1.0,
                       help="share of samples rolled out once the ramp is done")
    group.add_argument("--scheduled_sampling_ramp_steps", type=int, default=0,
                       help="the probability rises linearly from 0 over this many steps (0: full from the start)")
    group.add_argument("--scheduled_sampling_sampler", default=None, choices=samplers,
                       help="default unipc; flow matching (SD3, FLUX.1) rolls out with Euler only")
    group.add_argument("--scheduled_sampling_target", default="recomputed", choices=["recomputed", "original"],
                       help="recomputed: the target implies the true clean latent from the rolled-out x_t; "
                            "original: the clean trajectory's target")


def add_ema_args(parser):
    group = parser.add_argument_group("EMA: a moving average of the trained weights, saved beside them")
    add_bool(group, "--use_ema", help="keep a moving average of the trained weights; validation and the saved output use it")
    group.add_argument("--ema_decay", type=float, default=0.999, help="the average's decay per update")
    group.add_argument("--ema_update_interval", type=int, default=1, help="update the average every N steps")
    group.add_argument("--ema_device", default="cpu", choices=["cpu", "accelerator"],
                       help="cpu: the average lives in system memory, not on the GPU")
    add_bool(group, "--ema_warmup", default=True,
                   help="decay min(ema_decay, (1+s)/(10+s)) after s updates, so the average leaves the untrained start "
                        "fast (on by default: without it, decay 0.999 still holds 45%% of the start after 800 steps)")


def add_validation_args(parser):
    """Validation images during training: prompts, seeds, strengths, previews."""
    group = parser.add_argument_group("validation")
    group.add_argument("--validation_prompt", nargs="+", default=None,
                       help="prompts drawn every --validation_steps (may hold {instance} and {class}); none: no validation")
    group.add_argument("--validation_steps", type=int, default=100, help="draw the validation prompts every N steps")
    group.add_argument("--num_validation_images", type=int, default=2, help="seeds per prompt")
    group.add_argument("--validation_lora_scales", type=float, nargs="+", default=None,
                       help="render each prompt and seed at these adapter strengths side by side (e.g. 0 0.5 1; 0 is "
                            "the base model, for comparison)")
    group.add_argument("--validation_num_inference_steps", type=int, default=25, help="sampler steps per image")
    group.add_argument("--validation_guidance_scale", type=float, default=None,
                       help="default: the family's (7.5 SD/SDXL, 7.0 SD3, 3.5 FLUX.1-dev's embedded guidance)")
    group.add_argument("--validation_negative_prompt", default=None, help="negative prompt for validation images")
    group.add_argument("--validation_resolution", type=picture_sizes, default=None,
                       help="the pictures' size: a square's side or WIDTHxHEIGHT; several, comma-separated, are each "
                            "drawn and shown side by side (e.g. 64,96,64x96,96x64). Default: the model's native size")
    group.add_argument("--validation_seed", type=int, default=0,
                       help="image k of each prompt uses seed + k, the same at every step")
    group.add_argument("--validation_instance", default=None,
                       help="fills {instance} in validation prompts (e.g. \"ohwx dog\")")
    group.add_argument("--validation_class", default=None,
                       help="fills {class}, and replaces the instance in the text CLIP-T scores (e.g. \"dog\")")
    group.add_argument("--evaluation_type", default="none", choices=["none", "clip"],
                       help="clip: score validation images (CLIP-T, CLIP-I against the subject) into the log")
    group.add_argument("--clip_model", default="openai/clip-vit-base-patch32", help="for --evaluation_type clip")
    add_bool(group, "--validation_preview",
                   help="send in-progress pictures of validation images to the webhooks (Tiny AutoEncoder)")
    group.add_argument("--validation_preview_steps", type=int, default=1,
                       help="a preview every N denoising steps and at the last (default: every step, as the reference)")
    group.add_argument("--preview_vae", default=None,
                       help="Tiny AutoEncoder (default: the family's, madebyollin/taesd, taesdxl, taesd3 or taef1)")
    group.add_argument("--webhook_config", default=None,
                       help="JSON: raw and/or discord webhooks for start, checkpoints, validation images, previews, "
                            "the end and errors (see common/webhooks.py)")
    group.add_argument("--validation_ema", default=None, choices=["raw", "ema", "both"],
                       help="with --use_ema, which weights validation renders (default both, side by side)")


def add_output_args(parser):
    """Where the result goes besides --output_dir: the trackers that follow the run, and the Hugging Face hub."""
    group = parser.add_argument_group("logging and sharing")
    group.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "all", "none"],
                       help="trackers besides logs/train_log.jsonl (always written): scalars every logged step, "
                            "validation grids as images. tensorboard: OUTPUT_DIR/logs/dreambooth; wandb needs the "
                            "wandb package (WANDB_MODE=offline runs without a network); all: both, wandb when installed")
    add_bool(group, "--push_to_hub", help="upload the output folder (weights, model card, args.json, validation "
                                          "images, logs) to the Hugging Face hub at the end; needs --hub_model_id")
    group.add_argument("--hub_model_id", default=None, help="the hub repository to push to, e.g. you/ohwx-dog-lora")
    group.add_argument("--hub_token", default=None,
                       help="hub token with write access (default: HF_TOKEN or `hf auth login`'s); never saved")
    add_bool(group, "--hub_private_repo", help="create the hub repository private")


class HelpFormatter(argparse.HelpFormatter):
    """--help shows every flag's default, unless its help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        value = action.default
        shown = "none" if value is None else ("on" if value else "off") if isinstance(value, bool) else \
            " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()
