"""What lands beside the trained weights, for the people and the tools that read it.

    run_metadata      the adapter file's safetensors metadata: our own keys, kohya's ss_* keys (A1111, Civitai and
                      the LoRA browsers read them) and Stability's modelspec.* keys
    write_run_args    args.json: every flag of the run (secrets left out), so it can be repeated
    write_model_card  README.md: what was trained on what, how to load it (diffusers, ComfyUI / A1111), the last
                      validation grid, and the YAML front matter the Hugging Face hub reads

Used by train_dreambooth.py (which writes the metadata into every adapter file).
"""

import json
import os

from common import data, files

SECRET_FLAGS = ("hub_token",)  # never written into args.json or a card
def public_name(ref):
    """The base model as a file may name it: a hub id as it is; a local folder or file by its name alone (an
    absolute path says where someone keeps their files, and means nothing on another machine)."""
    ref = str(ref)
    return os.path.basename(os.path.normpath(ref)) if os.path.exists(ref) else ref


def instance_prompts(datasets):
    return sorted({p for d in datasets if d.trains and not d.is_regularisation_data and d.instance_prompt
                   for p in data.as_list(d.instance_prompt)})


def title_of(args, info, prompts):
    """The card's and modelspec's title: the trigger, what was trained, on what (the same for a resumed run, which
    writes the same files as an uninterrupted one)."""
    kind = "full fine-tune" if args.model_type == "full" else "LyCORIS" if args.lora_type == "lycoris" else "LoRA"
    return f"{prompts[0] if prompts else 'DreamBooth'}: a DreamBooth {kind} of {public_name(info.ref)}"


def resolution(args, info):
    side = int(args.resolution) if args.resolution and float(args.resolution) >= 64 else info.native_resolution
    return side, side


def run_metadata(args, info, datasets, step, title):
    """What a person and their tools want to know about an adapter file later, as safetensors metadata (strings)."""
    prompts, base = instance_prompts(datasets), public_name(info.ref)
    width, height = resolution(args, info)
    lycoris = args.lora_type == "lycoris"
    rank = (args.lycoris or {}).get("linear_dim", 4) if lycoris else args.lora_rank
    alpha = (args.lycoris or {}).get("linear_alpha", 1) if lycoris else args.lora_alpha or args.lora_rank
    captions = {prompt: sum(1 for d in datasets if d.trains and prompt in data.as_list(d.instance_prompt))
                for prompt in prompts}
    ours = {"base_model": base, "family": info.family, "prediction_type": info.prediction_type,
            "base_model_precision": args.base_model_precision, "instance_prompts": json.dumps(prompts),
            "step": str(step)}
    kohya = {"ss_sd_model_name": base, "ss_output_name": title, "ss_network_dim": str(rank),
             "ss_network_alpha": f"{float(alpha):g}",
             "ss_network_module": "lycoris.kohya" if lycoris else "networks.lora",
             "ss_resolution": f"({width}, {height})", "ss_steps": str(step), "ss_max_train_steps": str(step),
             "ss_learning_rate": str(args.learning_rate), "ss_unet_lr": str(args.learning_rate),
             "ss_text_encoder_lr": str(args.text_encoder_lr if args.text_encoder_lr is not None else
                                       args.learning_rate if args.train_text_encoder else 0),
             "ss_seed": str(args.seed), "ss_tag_frequency": json.dumps({"instance": captions}),
             "ss_training_comment": f"trigger: {', '.join(prompts)}" if prompts else ""}
    if info.kohya_version:
        kohya["ss_base_model_version"] = info.kohya_version
    spec = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": info.modelspec_architecture + "/lora",
            "modelspec.implementation": "diffusers", "modelspec.title": title_of(args, info, prompts),
            "modelspec.resolution": f"{width}x{height}",
            "modelspec.trigger_phrase": ", ".join(prompts)}
    if info.objective == "noise":
        spec["modelspec.prediction_type"] = "v" if info.prediction_type == "v_prediction" else "epsilon"
    return {**ours, **kohya, **spec}


def run_args(args, seed, flag_names):
    """The run's flags (`flag_names`) as given and settled, a --config's keys included, with the seed it drew and
    without secrets (flags left unset are left out)."""
    values = {key: value for key, value in vars(args).items()
              if key in flag_names and value is not None and key not in SECRET_FLAGS and key != "config"}
    return {**values, "seed": seed}


def write_run_args(args, folder, seed, flag_names):
    """args.json (run_args): `--config args.json` repeats the run."""
    files.write_text_atomic(json.dumps(run_args(args, seed, flag_names), indent=2, sort_keys=True, default=str) + "\n",
                            os.path.join(folder, "args.json"))


def latest_grid(output_dir):
    """The last validation round's grid.png, relative to the output folder, or None."""
    folder = os.path.join(output_dir, "validation")
    steps = sorted(int(name.split("-")[1]) for name in os.listdir(folder) if name.startswith("step-")) \
        if os.path.isdir(folder) else []
    for step in reversed(steps):
        if os.path.isfile(os.path.join(folder, f"step-{step}", "grid.png")):
            return f"validation/step-{step}/grid.png", step
    return None, None


def write_model_card(args, info, datasets, folder, step, names):
    """README.md in `folder`: a model card with YAML front matter for the hub (base_model, tags, instance_prompt),
    the run's settings, the last validation grid (when the output folder has one), and how to load the result
    (`names`: the adapter's file and its kohya-layout file, or None where there is none)."""
    weight_name, kohya_name = names
    prompts, base = instance_prompts(datasets), public_name(info.ref)
    adapter = "full" if args.model_type == "full" else "lycoris" if args.lora_type == "lycoris" else "lora"
    tags = ["text-to-image", "diffusers", "dreambooth", info.hub_tag] + ([] if adapter == "full" else [adapter])
    front = ["---", f"base_model: {json.dumps(base)}", "library_name: diffusers", "tags:"] + \
        [f"- {tag}" for tag in tags] + ([f"instance_prompt: {json.dumps(prompts[0])}"] if prompts else []) + ["---"]
    width, height = resolution(args, info)
    what = {"full": "a full fine-tune of the " + info.denoiser,
            "lycoris": f"a LyCORIS {(args.lycoris or {}).get('algo', '')} network",
            "lora": f"a {'DoRA' if args.use_dora else 'LoRA'} of rank {args.lora_rank} (alpha "
                    f"{args.lora_alpha or args.lora_rank}, {args.lora_layers or args.lora_target})"}[adapter]
    if args.train_text_encoder:
        what += ", with a LoRA on the text encoders"
    rows = [("base model", f"`{base}` ({info.family}, {info.prediction_type})"), ("trained", what),
            ("trigger / instance prompt", ", ".join(f"`{p}`" for p in prompts) or "from the captions"),
            ("class", args.validation_class or args.dop_class or "-"), ("steps", str(step)),
            ("learning rate", f"{args.learning_rate:g} ({args.optimizer}, {args.lr_scheduler})"
             + (f", text encoders {args.text_encoder_lr:g}" if args.text_encoder_lr is not None else "")),
            ("resolution", f"{width}x{height} (aspect buckets)"),
            ("batch", f"{args.train_batch_size} x accumulation {args.gradient_accumulation_steps}"),
            ("prior preservation", f"{args.prior_loss_target} target, weight {args.prior_loss_weight:g}"
             if any(d.is_regularisation_data for d in datasets) else "none"),
            ("precision", f"{args.mixed_precision} (base weights: {args.base_model_precision})"),
            ("seed", str(args.seed))]
    prompt = (prompts[0] if prompts else "a photo") + " in the snow"
    output = args.hub_model_id if getattr(args, "hub_model_id", None) else "path/to/this/folder"
    if adapter == "full":
        load = [f'pipe = DiffusionPipeline.from_pretrained("{output}", torch_dtype=torch.bfloat16).to("cuda")']
    elif adapter == "lycoris":
        load = [f'pipe = DiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")',
                "from lycoris import create_lycoris_from_weights",
                f'network, _ = create_lycoris_from_weights(1.0, "{output}/{weight_name}", pipe.{info.denoiser})',
                "network.to(pipe.device, pipe.dtype); network.apply_to()"]
    else:
        load = [f'pipe = DiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")',
                f'pipe.load_lora_weights("{output}", weight_name="{weight_name}")']
    grid, grid_step = latest_grid(args.output_dir) if os.path.abspath(folder) == os.path.abspath(args.output_dir) \
        else (None, None)
    extra, call = info.card_loading(f'image = pipe("{prompt}").images[0]', adapter)  # IF's variance, a picture
    load += extra
    lines = front + ["", f"# {title_of(args, info, prompts)}", "",
                     f"DreamBooth training of {what} on `{base}`, {step} steps.", "",
                     "| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    if grid:
        lines += ["", f"## Validation (step {grid_step})", "", f"![validation images at step {grid_step}]({grid})"]
    lines += ["", "## Use it", "", "In diffusers:", "", "```python", "import torch",
              "from diffusers import DiffusionPipeline", "", *load,
              call, "```"]
    if kohya_name:
        lines += ["", f"In ComfyUI, A1111 / Forge and other kohya-format tools: `{kohya_name}` (put it in the "
                  "`loras` folder)."]
    elif adapter != "full" and info.kohya_layout is not None:
        lines += ["", "This file is in diffusers' layout; train with `--lora_format comfyui` for a kohya-format file "
                  "that ComfyUI and A1111 read."]
    lines += ["", "Trained with `train_dreambooth.py`; every flag of the run is in `args.json`."]
    files.write_text_atomic("\n".join(lines) + "\n", os.path.join(folder, "README.md"))
