"""SimpleTuner's config.json given to --config: its keys read as our flags, refused with the reason, or passed over.

The configs in tests/data/simpletuner/ are SimpleTuner's own examples (simpletuner/examples/*/config.json,
config/config.json.example, the web interface's examples/default.json), unchanged but for the paths they name, which
point into that folder. No model is loaded: everything here is parsing.
"""

import json

import pytest
from conftest import ROOT, write_json

import cache_latents
import evaluate
import train_dreambooth
from common import simpletuner

EXAMPLES = "tests/data/simpletuner"


@pytest.fixture(autouse=True)
def in_the_repository(monkeypatch):
    """The examples name their data and LyCORIS configs by paths relative to the repository."""
    monkeypatch.chdir(ROOT)


def example(name):
    return f"{EXAMPLES}/{name}"


def refusal_message(argv, script=train_dreambooth):
    with pytest.raises(SystemExit) as excinfo:
        script.parse_args(argv)
    return str(excinfo.value.code)


def reason(key):
    """The reason our table gives for refusing `key` (at a value other than its off value)."""
    return simpletuner.REFUSED.get(key) or simpletuner.OFF_ONLY[key][1]


def without(path, tmp_path, *keys):
    """A copy of the example at `path` without `keys` (with or without their dashes)."""
    config = json.load(open(path, encoding="utf-8"))
    return write_json(tmp_path / "config.json", {k: v for k, v in config.items() if k.lstrip("-") not in keys})


# ---------------------------------------------------------------------------------------------------------------------
# SimpleTuner's examples


def test_sd1x_example_is_read_whole_and_passes_the_checks(capsys):
    args = train_dreambooth.parse_args(["--config", example("sd1x-dreamshaper.peft-lora.json")])
    train_dreambooth.check_args(args)
    expected = {
        # its keys that are ours by name and meaning
        "pretrained_model_name_or_path": "Lykon/dreamshaper-8", "base_model_precision": "no_change",
        "caption_dropout_probability": 0.1, "checkpoints_total_limit": 5, "gradient_checkpointing": True,
        "hub_model_id": "simpletuner-example-sd1x-dreamshaper-peft-lora", "learning_rate": 1e-4, "lora_rank": 16,
        "lora_type": "standard", "lr_scheduler": "constant", "max_train_steps": 100, "mixed_precision": "bf16",
        "model_type": "lora", "num_train_epochs": 0, "output_dir": "output/examples/sd1x-dreamshaper.peft-lora",
        "push_to_hub": False, "report_to": "none", "resolution": 512.0, "resolution_type": "pixel", "seed": 42,
        "train_batch_size": 1, "use_ema": False, "vae_batch_size": 1, "validation_num_inference_steps": 20,
        "validation_prompt": ["domokun holding a sign"], "validation_seed": 42, "validation_steps": 50,
        "data_backend_config": "tests/data/simpletuner/multidatabackend-small-dreambooth-512px.json",
        # its keys and values in SimpleTuner's own words
        "checkpointing_steps": 50, "validation_guidance_scale": 7.0, "optimizer": "adamw",
        "validation_resolution": [(512, 512)],
    }
    assert {name: getattr(args, name) for name in expected} == expected
    out = capsys.readouterr().out
    for note in ["'checkpoint_step_interval' 50 -> --checkpointing_steps 50",
                 "'validation_guidance' 7.0 -> --validation_guidance_scale 7.0",
                 "'optimizer' 'adamw_bf16' read as 'adamw'",
                 "'disable_bucket_pruning' passed over: buckets are never pruned here",
                 "'model_family' passed over: the family (SD 1.x/2.x, SDXL, SD3, FLUX.1, Chroma, DeepFloyd IF) is "
                 "read from the model's own",
                 "'push_checkpoints_to_hub' False passed over", "'validation_prompt_library' False passed over",
                 "lora_dropout 0.0 (SimpleTuner: 0.1)", "resume_from_checkpoint unset (SimpleTuner: latest)"]:
        assert note in out, note


def test_flux_example_refuses_value_clipping_alone_and_reads_the_rest(tmp_path, capsys):
    path = example("flux.peft-lora.json")
    assert refusal_message(["--config", path]) == f"{path}: 'grad_clip_method': {reason('grad_clip_method')}"

    args = train_dreambooth.parse_args(["--config", without(path, tmp_path, "grad_clip_method")])
    train_dreambooth.check_args(args)
    # No pretrained_model_name_or_path in the example: SimpleTuner's default FLUX.1 weights (flavour krea).
    assert args.pretrained_model_name_or_path == "black-forest-labs/flux.1-krea-dev"
    assert (args.flow_shift, args.checkpointing_steps, args.validation_steps) == (3.0, 10, 50)
    assert (args.validation_guidance_scale, args.validation_resolution, args.optimizer) == \
        (4.0, [(1024, 1024)], "adamw")
    assert (args.base_model_precision, args.lora_rank, args.lora_alpha) == ("int8-quanto", 16, 16.0)
    assert args.validation_negative_prompt == "ugly, cropped, blurry, low-quality, mediocre average"
    out = capsys.readouterr().out
    for note in ["'flow_schedule_shift' 3 -> --flow_shift 3", "'controlnet' False passed over",
                 "'validation_guidance_rescale' 0.0 passed over", "'quantize_via' passed over",
                 "'tracker_project_name' passed over", "'num_eval_images' passed over",
                 "'model_family' 'flux': no pretrained_model_name_or_path, so SimpleTuner's weights for it: "
                 "black-forest-labs/flux.1-krea-dev"]:
        assert note in out, note


@pytest.mark.parametrize("name, refused", [
    ("sd3.peft-lora.json", ["grad_clip_method", "validation_guidance_skip_layers"]),
    ("sdxl.lycoris-lokr.json", ["aspect_bucket_rounding", "loss_type"]),
    ("config.json", ["--aspect_bucket_rounding", "--push_checkpoints_to_hub"]),
])
def test_examples_list_every_refused_key_with_its_reason(tmp_path, name, refused):
    path = example(name)
    message = refusal_message(["--config", path])
    lines = [f"{path}: {len(refused)} keys cannot be used here:"]
    lines += [f"  - '{key}': {reason(key.lstrip('-'))}" for key in refused]
    assert message == "\n".join(lines)
    # Without them the rest is read.
    args = train_dreambooth.parse_args(["--config", without(path, tmp_path, *[k.lstrip("-") for k in refused])])
    assert args.validation_resolution == [(1024, 1024)] and args.optimizer == "adamw"


def test_sdxl_lycoris_example_without_its_refused_keys_is_a_lycoris_run(tmp_path):
    path = without(example("sdxl.lycoris-lokr.json"), tmp_path, "aspect_bucket_rounding", "loss_type")
    args = train_dreambooth.parse_args(["--config", path])
    train_dreambooth.check_args(args)  # reads the LyCORIS config the example names
    assert args.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (args.lora_type, args.lycoris["algo"], args.lycoris["factor"]) == ("lycoris", "lokr", 12)
    assert (args.learning_rate, args.validation_guidance_scale, args.resume_from_checkpoint) == (3e-7, 4.2, "latest")
    assert args.flow_shift is None  # not a flow-matching family: no SimpleTuner shift default applies


def test_config_example_without_its_refused_keys_keeps_simpletuners_step_intervals(tmp_path):
    path = without(example("config.json"), tmp_path, "aspect_bucket_rounding", "push_checkpoints_to_hub")
    args = train_dreambooth.parse_args(["--config", path])
    assert (args.checkpointing_steps, args.validation_steps, args.validation_guidance_scale) == (500, 500, 3.0)
    assert (args.lr_scheduler, args.lr_warmup_steps, args.learning_rate) == ("polynomial", 100, 1e-4)
    assert (args.push_to_hub, args.hub_model_id, args.report_to) == (True, "simpletuner-lora", "wandb")
    assert args.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"


def test_web_interface_config_is_read_from_its_config_object():
    args = train_dreambooth.parse_args(["--config", example("webui-default.json")])
    assert args.pretrained_model_name_or_path == "black-forest-labs/FLUX.1-dev"
    assert (args.checkpointing_steps, args.max_train_steps, args.learning_rate) == (100, 1000, 1e-4)
    assert (args.seed, args.resolution, args.output_dir) == (42, 1024.0, "output/models")


@pytest.mark.parametrize("script", [cache_latents, evaluate])
def test_the_other_scripts_read_a_simpletuner_config(script):
    args = script.parse_args(["--config", example("sd1x-dreamshaper.peft-lora.json")])
    assert (args.pretrained_model_name_or_path, args.resolution, args.seed) == ("Lykon/dreamshaper-8", 512.0, 42)


# ---------------------------------------------------------------------------------------------------------------------
# Each table


# SimpleTuner key: (its value, our flag, the value it becomes)
MAPPED_CASES = {
    "checkpoint_step_interval": (250, "checkpointing_steps", 250),
    "save_total_limit": (3, "checkpoints_total_limit", 3),
    "validation_step_interval": ("200", "validation_steps", 200),
    "validation_guidance": (3.5, "validation_guidance_scale", 3.5),
    "validation_adapter_strength": (0.8, "validation_lora_scales", [0.8]),
    "validation_lycoris_strength": (1.2, "validation_lora_scales", [1.2]),
    "user_prompt_library": (f"{EXAMPLES}/user_prompt_library.json", "validation_prompt",
                            ["your prompt to validate on", "another prompt to validate on"]),
    "flow_schedule_shift": (0, "flow_shift", 1.0),  # 0: no shift
    "flow_schedule_auto_shift": (True, "flow_shift", "auto"),
    "flow_use_uniform_schedule": ("true", "weighting_scheme", "uniform"),
    "ema_validation": ("ema_only", "validation_ema", "ema"),
    "ema_cpu_only": (True, "ema_device", "cpu"),
    "optimizer_beta1": (0.95, "adam_beta1", 0.95),
    "optimizer_beta2": (0.99, "adam_beta2", 0.99),
    "optimizer_config": ("weight_decay=0.0,eps=1e-6", "adam_weight_decay", 0.0),
    "lora_init_type": ("default", "lora_init", "default"),
    "peft_lora_target_modules": (["to_q", "to_k"], "lora_layers", "to_q,to_k"),
    "data_backend_sampling": ("uniform", "data_sampling", "uniform"),
    "offset_noise": (True, "noise_offset", 0.0),  # on: nothing to set; our noise_offset stays
}


def test_every_mapped_key_has_a_case():
    assert set(MAPPED_CASES) == set(simpletuner.MAPPED)


@pytest.mark.parametrize("key", MAPPED_CASES)
def test_a_mapped_key_sets_our_flag(tmp_path, key):
    value, flag, expected = MAPPED_CASES[key]
    args = train_dreambooth.parse_args(["--config", write_json(tmp_path / "config.json", {f"--{key}": value})])
    assert getattr(args, flag) == expected


def test_a_config_of_mappable_keys_parses_to_the_expected_args(tmp_path, capsys):
    config = {
        "model_family": "sdxl", "model_flavour": "refiner-1.0", "checkpoint_step_interval": 250,
        "validation_step_interval": 100, "validation_guidance": 5.5, "validation_resolution": "1024x1024",
        "validation_prompt": "a photo of ohwx dog", "user_prompt_library": f"{EXAMPLES}/user_prompt_library.json",
        "optimizer": "optimi-adamw", "optimizer_config": "weight_decay=0.0,eps=1e-6", "use_ema": True,
        "ema_validation": "comparison", "ema_cpu_only": True, "validation_adapter_strength": 0.8,
        "validation_lycoris_strength": 0.8, "report_to": "simpletuner", "lr_scheduler": "constant",
        "lr_warmup_steps": 100, "seed": 0, "noise_offset": 0.1, "data_backend_sampling": "auto-weighting",
        "attention_mechanism": "diffusers", "minimum_image_size": 0, "max_grad_norm": 2.0,
    }
    args = train_dreambooth.parse_args(["--config", write_json(tmp_path / "config.json", config)])
    train_dreambooth.check_args(args)
    assert args.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-refiner-1.0"
    assert (args.checkpointing_steps, args.validation_steps, args.validation_guidance_scale) == (250, 100, 5.5)
    assert args.validation_prompt == ["a photo of ohwx dog", "your prompt to validate on",
                                      "another prompt to validate on"]
    assert (args.validation_resolution, args.optimizer, args.adam_weight_decay, args.adam_epsilon) == \
        ([(1024, 1024)], "adamw", 0.0, 1e-6)
    assert (args.validation_ema, args.ema_device, args.validation_lora_scales) == ("both", "cpu", [0.8])
    assert (args.report_to, args.lr_scheduler, args.data_sampling) == ("tensorboard", "constant_with_warmup", "auto")
    # SimpleTuner's seed 0 draws a fresh seed; its noise_offset without offset_noise: true does nothing.
    assert args.seed is None and args.noise_offset == 0.0
    out = capsys.readouterr().out
    assert "'lr_scheduler' constant with lr_warmup_steps: constant_with_warmup" in out
    assert "'attention_mechanism' passed over: attention here is diffusers' default" in out
    # SimpleTuner clips values at max_grad_norm unless told grad_clip_method "norm": said, not hidden.
    assert args.max_grad_norm == 2.0 and "'max_grad_norm' 2.0: SimpleTuner clips each gradient value" in out


@pytest.mark.parametrize("key, off, other", [
    ("controlnet", False, True),
    ("validation_guidance_rescale", "0.0", 0.7),
    ("minimum_image_size", 0, 256),
    ("grad_clip_method", "norm", "value"),
    ("vae_cache_scan_behaviour", "recreate", "sync"),
])
def test_an_off_only_key_passes_at_its_off_value_and_is_refused_at_another(tmp_path, key, off, other):
    train_dreambooth.parse_args(["--config", write_json(tmp_path / "off.json", {key: off})])
    path = write_json(tmp_path / "on.json", {key: other})
    assert refusal_message(["--config", path]) == f"{path}: '{key}': {simpletuner.OFF_ONLY[key][1]}"


def test_options_of_families_not_trained_here_are_refused_naming_the_family(tmp_path):
    path = write_json(tmp_path / "config.json", {"ltx2_first_frame_conditioning_probability": 0.5,
                                                 "validation_num_video_frames": 49})
    message = refusal_message(["--config", path])
    assert "'ltx2_first_frame_conditioning_probability': an option of SimpleTuner's LTX-2 models" in message
    assert "'validation_num_video_frames': an option of SimpleTuner's video models" in message


def test_validation_resolutions_are_read_as_sizes_and_a_bad_one_is_refused(tmp_path):
    """SimpleTuner's (and the reference's) sizes: WIDTHxHEIGHT or a square's side, several comma-separated."""
    for value, sizes in [("1024x768", [(1024, 768)]), ("1024x1024,768x768", [(1024, 1024), (768, 768)]),
                         ("64,96,64x96,96x64", [(64, 64), (96, 96), (64, 96), (96, 64)]), (512, [(512, 512)])]:
        path = write_json(tmp_path / "config.json", {"validation_resolution": value})
        assert train_dreambooth.parse_args(["--config", path]).validation_resolution == sizes
    path = write_json(tmp_path / "config.json", {"validation_resolution": "1024xwide"})
    assert refusal_message(["--config", path]).startswith(f"{path}: 'validation_resolution' has a bad value "
                                                          "'1024xwide': '1024xwide' is not a size")


def test_a_mapped_key_that_contradicts_our_own_key_is_refused(tmp_path):
    path = write_json(tmp_path / "config.json", {"validation_guidance": 3.5, "validation_guidance_scale": 7.0})
    message = refusal_message(["--config", path])
    assert "'validation_guidance' sets --validation_guidance_scale 3.5 but 'validation_guidance_scale' sets 7.0" \
        in message
    # the same value twice is no contradiction (SimpleTuner configs often carry both of its spellings)
    same = write_json(tmp_path / "same.json", {"validation_step_interval": 50, "validation_steps": 50})
    assert train_dreambooth.parse_args(["--config", same]).validation_steps == 50


# ---------------------------------------------------------------------------------------------------------------------
# Unknown keys, and our own configs


def test_unknown_keys_get_a_hint_only_when_a_flag_is_close(tmp_path):
    path = write_json(tmp_path / "config.json", {"learnin_rate": 1e-4, "zebra_count": 3})
    message = refusal_message(["--config", path])
    assert message == (f"{path}: 2 keys cannot be used here:\n"
                       "  - unknown key 'learnin_rate'; did you mean 'learning_rate'?\n"
                       "  - unknown key 'zebra_count'")


def test_refused_unknown_and_badly_valued_keys_are_listed_together(tmp_path):
    path = write_json(tmp_path / "config.json", {"aspect_bucket_rounding": 2, "lora_rank": "big", "--seeed": 1})
    message = refusal_message(["--config", path])
    assert message.startswith(f"{path}: 3 keys cannot be used here:\n")
    assert f"  - 'aspect_bucket_rounding': {reason('aspect_bucket_rounding')}" in message
    assert "  - 'lora_rank' has a bad value 'big'" in message
    assert "  - unknown key '--seeed'; did you mean 'seed'?" in message
    assert "data_backend_config" not in message  # a far key is given its reason, not the least unlike flag


def test_our_own_config_keeps_our_meanings_without_model_family(tmp_path, capsys):
    path = write_json(tmp_path / "config.json", {"seed": 0, "noise_offset": 0.1, "lr_scheduler": "constant",
                                                 "lr_warmup_steps": 100, "lora_rank": 8})
    args = train_dreambooth.parse_args(["--config", path])
    assert (args.seed, args.noise_offset, args.lr_scheduler, args.lora_rank) == (0, 0.1, "constant", 8)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("flavour,model", [("ii-large-1.2b", "DeepFloyd/IF-II-L-v1.0"),
                                           ("i-xlarge-4.3b", "DeepFloyd/IF-I-XL-v1.0")])
def test_a_deepfloyd_flavour_names_its_stage(tmp_path, flavour, model):
    """SimpleTuner's DeepFloyd flavours: stage I (text to 64 px) and stage II (the x4 upscaler) by their weights."""
    config = write_json(tmp_path / "config.json", {"model_family": "deepfloyd", "model_flavour": flavour})
    assert train_dreambooth.parse_args(["--config", config]).pretrained_model_name_or_path == model
