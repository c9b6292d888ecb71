"""Adapters: a peft LoRA or a LyCORIS network on the UNet; switched off for the base model; saved and loaded.

Used by train_dreambooth.py (add, switch off for the prior target, save), and by evaluate.py and
make_regularisation.py (load_adapter). Files written:
    pytorch_lora_weights.safetensors          diffusers' LoRA format, for pipe.load_lora_weights (or, for LyCORIS,
                                              LyCORIS's own format with its config in the metadata)
    pytorch_lora_weights_comfyui.safetensors  the kohya layout (lora_unet_...), which ComfyUI, A1111 and diffusers read
    ..._ema variants                          with --use_ema, the averaged weights in the same forms
"""

import contextlib
import json
import logging
import os

import torch
from safetensors import safe_open

from common import cards, files, models

# --lora_target presets: module-name suffixes peft adapts, for a UNet and for an SD3 / FLUX transformer.
# IF's attention also projects the text into keys and values of its own (add_k_proj, add_v_proj; SD's UNets have none)
_UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
LORA_TARGETS = {
    "attention": _UNET_ATTENTION,
    "attention_ff": _UNET_ATTENTION + ["ff.net.0.proj", "ff.net.2"],
    "all": _UNET_ATTENTION + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut",
                              "time_emb_proj"],
}
# The joint attention of SD3 and FLUX has a text (context) stream beside the image stream: add_*_proj, to_add_out.
_JOINT_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out"]
TRANSFORMER_LORA_TARGETS = {
    "attention": _JOINT_ATTENTION,
    # + both streams' feed-forward, and FLUX's single-stream blocks' MLP and output projections
    "attention_ff": _JOINT_ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                        "proj_mlp", "single_transformer_blocks.*.proj_out"],
    "all": None,  # every linear layer of the transformer
}
# --train_text_encoder: CLIP's attention projections, as diffusers' examples adapt them; the model's child holding them.
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TRAINED_TEXT_ENCODERS = "text_encoders"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_comfyui.safetensors"  # kohya layout: ComfyUI, A1111, diffusers
EMA_SUFFIX = "_ema"  # pytorch_lora_weights_ema.safetensors (LoRA / LyCORIS) and ema/ (a full fine-tune's pipeline)
LYCORIS_PRESET_ATTRIBUTES = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                             "NAME_ALGO_MAP", "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
LYCORIS_PRESET_NAME = "dreambooth-config"


def trainable_parameters(model):
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


# ---------------------------------------------------------------------------------------------------------------------
# Adding, and switching off


def lora_target_modules(model, args, denoiser="unet"):
    """What peft adapts: --lora_layers' names, or the --lora_target preset of the model's kind (a list of name
    suffixes, or a regular expression over full module names where a preset needs a wildcard)."""
    if getattr(args, "lora_layers", None):
        return [name.strip() for name in args.lora_layers.split(",") if name.strip()]
    if denoiser == "unet":
        return LORA_TARGETS[args.lora_target]
    preset = TRANSFORMER_LORA_TARGETS[args.lora_target]
    if preset is None:
        return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    return r"(.*\.)?(" + "|".join(name.replace(".", r"\.").replace("*", r"\d+") for name in preset) + ")"


def lora_config(args, targets):
    """peft's LoraConfig from the --lora_* flags (and --use_dora) for the `targets` modules."""
    from peft import LoraConfig

    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank, lora_dropout=args.lora_dropout,
                      init_lora_weights=True if args.lora_init == "default" else args.lora_init,
                      target_modules=targets, use_dora=bool(getattr(args, "use_dora", False)))


def add_lora(model, args, denoiser="unet"):
    """A peft LoRA on the model (a UNet, or with denoiser="transformer" an SD3 / FLUX transformer)."""
    config = lora_config(args, lora_target_modules(model, args, denoiser))
    try:
        model.add_adapter(config)
    except ValueError as err:  # peft: none of the names matched
        raise SystemExit(f"--lora_layers {args.lora_layers}: {err}") from None
    return config


def read_lycoris_config(path):
    config = files.read_json(path, "--lycoris_config")
    if not isinstance(config, dict) or "algo" not in config:
        raise SystemExit(f"{path}: a LyCORIS config is a JSON object with at least \"algo\" (lora, locon, loha, "
                         "lokr, ...), e.g. {\"algo\": \"lokr\", \"linear_dim\": 10000, \"linear_alpha\": 1, "
                         "\"factor\": 16, \"apply_preset\": {\"target_module\": [\"Attention\"]}}")
    return config


def add_lycoris(unet, config, source):
    """A LyCORIS network on the UNet, from a config in the format practitioners use (algo, multiplier, linear_dim,
    linear_alpha, factor, apply_preset, and any other create_lycoris option).

    lycoris-lora keeps its preset (which modules to adapt) in class attributes, i.e. process-wide state. It is set
    for this network only and restored afterwards, so a second run in the same process starts clean."""
    from lycoris import LycorisNetwork, create_lycoris
    from lycoris.config import PRESET
    from lycoris.logging import logger

    logger.setLevel(logging.WARNING)  # its per-module INFO lines drown the run's own output

    saved = {name: getattr(LycorisNetwork, name) for name in LYCORIS_PRESET_ATTRIBUTES}
    options = {k: v for k, v in config.items() if k not in ("multiplier", "linear_dim", "linear_alpha", "apply_preset")}
    if "apply_preset" in config:  # create_lycoris applies a named preset itself, so ours gets a name for the call
        PRESET[LYCORIS_PRESET_NAME] = config["apply_preset"]
        options["preset"] = LYCORIS_PRESET_NAME
    try:
        network = create_lycoris(unet, config.get("multiplier", 1.0), config.get("linear_dim", 4),
                                 config.get("linear_alpha", 1), **options)
    except (KeyError, ValueError, TypeError) as err:
        raise SystemExit(f"{source}: lycoris-lora refused this config: {err}") from None
    finally:
        for name, value in saved.items():
            setattr(LycorisNetwork, name, value)
        PRESET.pop(LYCORIS_PRESET_NAME, None)
    if not network.loras:
        raise SystemExit(f"{source}: the preset matched no module of this UNet; check apply_preset's target_module "
                         "(e.g. \"Attention\", \"FeedForward\", \"ResnetBlock2D\")")
    network.apply_to()
    unet.add_module("lycoris", network)  # a child of the UNet: DDP, checkpoints and dtype casts all see it
    return network


def add_text_encoder_lora(model, info, text_encoders, args, device):
    """--train_text_encoder: a peft LoRA (the --lora_* settings) on the attention of each CLIP text encoder (T5
    stays frozen). The encoders become a child of the trained model (`model.text_encoders`), so everything that
    follows its trained weights (the optimiser, DDP's gradient sync, checkpoints, the EMA, switching the adapter
    off or scaling it, the saved files) follows theirs too."""
    held = torch.nn.ModuleDict()
    for (_, name, reading), encoder in zip(info.text_parts, text_encoders):
        if reading != "t5":
            encoder.add_adapter(lora_config(args, TEXT_ENCODER_LORA_TARGETS))
            if args.gradient_checkpointing:  # non-reentrant: the frozen embeddings' output needs no gradient
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            held[name] = encoder.to(device).train()
    model.add_module(TRAINED_TEXT_ENCODERS, held)


def text_reader(info, cached, frozen=None, autocast=contextlib.nullcontext):
    """texts(captions) -> each caption's {"prompt_embeds", "pooled_prompt_embeds"}: from the text cache, or, given
    the trained text encoders (`frozen`: (vae, tokenizers, text encoders)), encoded now, with gradients into their
    LoRA (a trained encoder's output changes every step, so it cannot come from a cache)."""
    if frozen is None:
        return lambda captions: [cached[caption] for caption in captions]

    def texts(captions):
        with autocast():
            encoded = models.encode_text(info, frozen[1], frozen[2], captions)
        return [{key: value[i] for key, value in encoded.items()} for i in range(len(captions))]
    return texts


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model for the duration of the block: the adapter is switched off, and on again afterwards, also when
    the block raises (a prior pass must never leak). peft: disable_adapters (DoRA included). LyCORIS: multiplier 0;
    a layer with weight decomposition (dora_wd) computes weight_decompose(W + dW, multiplier), which keeps W + dW
    at multiplier 0, so its original forward is put back instead (restore) and its wrapper re-applied after."""
    network = getattr(model, "lycoris", None)
    restored = []
    if network is not None:
        multiplier, decomposed = network.multiplier, [m for m in network.loras if getattr(m, "wd", False)]
    try:
        if network is None:
            model.disable_adapters()
        else:
            network.set_multiplier(0.0)
            for module in reversed(decomposed):
                module.restore()
                restored.append(module)
        yield model
    finally:
        if network is None:
            model.enable_adapters()
        else:
            for module in reversed(restored):  # re-applied in the order they were first applied
                module.apply_to()
            network.set_multiplier(multiplier)


@contextlib.contextmanager
def adapter_scaled(model, scale):
    """The adapter at `scale` times its trained strength for the block (validation at several strengths), then as
    trained again: 0 is the base model exactly (adapter_disabled), None or 1 the adapter as trained. peft: each
    layer's scaling times `scale` (restored exactly); LyCORIS: its multiplier."""
    if scale is None or scale == 1:
        yield model
        return
    if scale == 0:
        with adapter_disabled(model):
            yield model
        return
    network = getattr(model, "lycoris", None)
    layers = [module for module in model.modules() if hasattr(module, "scaling") and hasattr(module, "lora_A")]
    saved = network.multiplier if network is not None else [dict(layer.scaling) for layer in layers]
    try:
        if network is not None:
            network.set_multiplier(saved * scale)
        for layer in layers:
            layer.scale_layer(scale)
        yield model
    finally:
        if network is not None:
            network.set_multiplier(saved)
        for layer, scaling in zip(layers, saved if network is None else []):
            layer.scaling.update(scaling)


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def peft_metadata(configs):
    """diffusers reads each part's LoRA config from this key ({"unet": config, "text_encoder": config, ...}), so an
    alpha other than the rank, and DoRA, survive reloading."""
    adapter = {f"{prefix}.{k}": (sorted(v) if isinstance(v, set) else v)
               for prefix, config in configs.items() for k, v in config.to_dict().items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(adapter, sort_keys=True, default=str)}


def trained_text_encoders(model):
    """{pipeline name ("text_encoder", "text_encoder_2"): encoder} that --train_text_encoder put a LoRA on."""
    return dict(getattr(model, TRAINED_TEXT_ENCODERS, None) or {})


def text_encoder_matrices(model):
    """(pipeline name, module, kind, tensor) for the trained text encoders' LoRA, the module named as in CLIP's
    usual layout ("text_model.encoder.layers.0.self_attn.q_proj"; transformers 5 drops "text_model." from
    CLIPTextModel, older loaders and other tools expect it)."""
    for name, encoder in trained_text_encoders(model).items():
        prefix = "" if hasattr(encoder, "text_model") else "text_model."
        for module, kind, value in lora_matrices(encoder):
            yield name, prefix + module, kind, value


def lora_matrices(unet):
    """(module name, "down" | "up" | "magnitude", fp32 tensor) for each matrix of the model's peft LoRA (peft's A is
    down, B up; DoRA adds each module's magnitude vector); the trained text encoders' apart (text_encoder_matrices)."""
    from peft.utils import get_peft_model_state_dict

    # "<module>.lora_A.weight" / "<module>.lora_B.weight" (embeddings are never adapted: not looked for)
    for key, value in get_peft_model_state_dict(unet, save_embedding_layers=False).items():
        if key.startswith(TRAINED_TEXT_ENCODERS + "."):
            continue
        if key.endswith(".lora_magnitude_vector"):  # DoRA: one per module, [out] (a conv's [1, out, 1, 1])
            yield key[:-len(".lora_magnitude_vector")], "magnitude", value.float()
            continue
        module, kind = key.rsplit(".lora_", 1)
        yield module, "down" if kind.startswith("A") else "up", value.float()


def save_lora(model, path, metadata, prefix="unet"):
    """The peft LoRA in diffusers' format, for load_lora_weights. A UNet's keys: 'unet.<module>.lora.down.weight'
    / '.lora.up.weight', every key renamed here, not with diffusers' convert_state_dict_to_diffusers: that one
    renames attention layers only, and load_lora_weights judges the whole file's format by its first key, so a
    file that mixes the two (conv or time-embedding LoRAs first, --lora_target all) loses its attention LoRAs.
    A transformer's (SD3, FLUX): 'transformer.<module>.lora_A.weight' / '.lora_B.weight', as diffusers saves them.
    DoRA's magnitudes keep peft's name ('<prefix>.<module>.lora_magnitude_vector'), which load_lora_weights reads
    (with use_dora in the metadata)."""
    names = {"down": "lora_A.weight", "up": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
    old_names = {**names, "down": "lora.down.weight", "up": "lora.up.weight"}
    state = {f"{prefix}.{module}.{(old_names if prefix == 'unet' else names)[kind]}": value
             for module, kind, value in lora_matrices(model)}
    # The trained text encoders' (--train_text_encoder): 'text_encoder.<module>.lora_A.weight', as diffusers saves them
    state.update({f"{encoder}.{module}.{names[kind]}": value
                  for encoder, module, kind, value in text_encoder_matrices(model)})
    files.save_safetensors_atomic(state, path, metadata)


def kohya_lora(unet, alpha):
    """The peft LoRA in the kohya layout (lora_unet_<module>.lora_down/lora_up/alpha) that ComfyUI, A1111 and
    diffusers' load_lora_weights all read."""
    state = {}
    for module, kind, value in lora_matrices(unet):
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.lora_{kind}.weight"] = value
        state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state


def kohya_text_encoder_lora(model, family, alpha):
    """The trained text encoders' LoRA in the kohya layout: lora_te_<module> for SD 1.x / 2.x's one encoder,
    lora_te1_ / lora_te2_ for the first and second CLIP of SDXL, SD3 and FLUX.1 (as kohya's sd-scripts write them)."""
    prefixes = {"text_encoder": "lora_te_" if family in ("sd1", "sd2") else "lora_te1_", "text_encoder_2": "lora_te2_"}
    state = {}
    for encoder, module, kind, value in text_encoder_matrices(model):
        name = prefixes[encoder] + module.replace(".", "_")
        state[f"{name}.lora_{kind}.weight"] = value
        state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state


# kohya's layout for SD3 and FLUX names the modules of the original (Stability MMDiT / Black Forest Labs) checkpoints,
# where q, k and v (and in a FLUX single block, the MLP's input too) are one fused Linear. Per block kind: the original
# block prefix, and each original Linear with the diffusers modules it holds, in the order their rows are stacked.
_JOINT_PARTS = {"qkv": ["to_q", "to_k", "to_v"], "context_qkv": ["add_q_proj", "add_k_proj", "add_v_proj"]}
ORIGINAL_LAYOUTS = {
    "flux": {
        "transformer_blocks.{}.": ("double_blocks.{}.", {
            "img_attn.qkv": ["attn." + p for p in _JOINT_PARTS["qkv"]],
            "txt_attn.qkv": ["attn." + p for p in _JOINT_PARTS["context_qkv"]],
            "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
            "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
            "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"],
            "img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"]}),
        "single_transformer_blocks.{}.": ("single_blocks.{}.", {
            "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
            "modulation.lin": ["norm.linear"]}),
        "": ("", {
            "img_in": ["x_embedder"], "txt_in": ["context_embedder"],
            "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
            "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
            "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
            "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
            "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
            "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
            "final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"]}),
    },
    "sd3": {
        "transformer_blocks.{}.": ("joint_blocks.{}.", {
            "x_block.attn.qkv": ["attn." + p for p in _JOINT_PARTS["qkv"]],
            "context_block.attn.qkv": ["attn." + p for p in _JOINT_PARTS["context_qkv"]],
            "x_block.attn.proj": ["attn.to_out.0"], "context_block.attn.proj": ["attn.to_add_out"],
            "x_block.attn2.qkv": ["attn2." + p for p in _JOINT_PARTS["qkv"]], "x_block.attn2.proj": ["attn2.to_out.0"],
            "x_block.mlp.fc1": ["ff.net.0.proj"], "x_block.mlp.fc2": ["ff.net.2"],
            "context_block.mlp.fc1": ["ff_context.net.0.proj"], "context_block.mlp.fc2": ["ff_context.net.2"],
            "x_block.adaLN_modulation.1": ["norm1.linear"],
            "context_block.adaLN_modulation.1": ["norm1_context.linear"]}),
        "": ("", {
            "context_embedder": ["context_embedder"],
            "t_embedder.mlp.0": ["time_text_embed.timestep_embedder.linear_1"],
            "t_embedder.mlp.2": ["time_text_embed.timestep_embedder.linear_2"],
            "y_embedder.mlp.0": ["time_text_embed.text_embedder.linear_1"],
            "y_embedder.mlp.2": ["time_text_embed.text_embedder.linear_2"],
            "final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"]}),
    },
}


def original_layout(model, family):
    """[(original module name, [the diffusers modules it fuses, in row order])] for the model's transformer."""
    layout = []
    for blocks, (original_blocks, table) in ORIGINAL_LAYOUTS[family].items():
        for i in range(len(getattr(model, blocks.split(".")[0])) if blocks else 1):
            layout += [(original_blocks.format(i) + original, [blocks.format(i) + part for part in parts])
                       for original, parts in table.items()]
    return layout


def kohya_transformer_lora(model, family):
    """The peft LoRA on an SD3 / FLUX transformer in kohya's layout of the original checkpoint
    (lora_unet_double_blocks_0_img_attn_qkv.lora_down/lora_up/alpha), which ComfyUI, Forge and diffusers' kohya
    converter read. A fused module's LoRA stacks its parts: down = [A_q; A_k; A_v], up = diag(B_q, B_k, B_v)
    (zeros for a part that was not trained), which is exactly the sum of the parts' updates. Each part's
    alpha / rank is multiplied into its up matrix and alpha is written equal to the rank, so every reader applies
    scale 1, whatever it does with alpha. AdaLayerNormContinuous (the final norm) keeps (scale, shift) in diffusers
    and (shift, scale) in the originals: its rows swap."""
    from diffusers.models.normalization import AdaLayerNormContinuous

    modules = dict(model.named_modules())
    adapted = {name for name, module in modules.items() if hasattr(module, "lora_A") and "default" in module.lora_A
               and not name.startswith(TRAINED_TEXT_ENCODERS + ".")}
    state, written = {}, set()
    for original, parts in original_layout(model, family):
        if not adapted.intersection(parts):
            continue
        rank = next(modules[part].lora_A["default"].out_features for part in parts if part in adapted)
        downs, ups = [], []
        for part in parts:
            module = modules[part]
            if part in adapted:
                downs.append(module.lora_A["default"].weight.detach().float())
                ups.append(module.lora_B["default"].weight.detach().float() * module.scaling["default"])
            else:
                downs.append(torch.zeros(rank, module.in_features))
                ups.append(torch.zeros(module.out_features, rank))
        up = torch.block_diag(*ups)
        if isinstance(modules[parts[0].rsplit(".", 1)[0]], AdaLayerNormContinuous):
            up = torch.cat(up.chunk(2)[::-1])
        name = "lora_unet_" + original.replace(".", "_")
        state.update({f"{name}.lora_down.weight": torch.cat(downs).contiguous(),
                      f"{name}.lora_up.weight": up.contiguous(),
                      f"{name}.alpha": torch.tensor(float(rank * len(parts)))})
        written.update(parts)
    if adapted - written:
        raise SystemExit(f"--lora_format comfyui: {sorted(adapted - written)[0]} has no place in the original "
                         f"{family} checkpoint's layout; train without it, or write the diffusers layout only")
    return state


def weight_names(output_name=None, suffix=""):
    """(diffusers-layout file, kohya-layout file) of an adapter: pytorch_lora_weights.safetensors and
    pytorch_lora_weights_comfyui.safetensors, or with --output_name NAME: NAME.safetensors and NAME_comfyui.safetensors;
    `suffix` "_ema" names the average's (pytorch_lora_weights_ema.safetensors, NAME_ema_comfyui.safetensors)."""
    stem = (output_name or LORA_WEIGHTS_NAME[:-len(".safetensors")]) + suffix
    return f"{stem}.safetensors", f"{stem}_comfyui.safetensors"


def save_adapter(args, info, datasets, unet, lora_config, lycoris_config, step, folder, suffix="",
                 extra_metadata=None):
    """Write the trained adapter into `folder`: diffusers-format LoRA (and --lora_format comfyui: the kohya layout
    too), or the LyCORIS file with its config (and, for lora/locon, the kohya layout diffusers and ComfyUI load).
    `suffix` names a variant: "_ema" writes pytorch_lora_weights_ema.safetensors (and ..._ema_comfyui)."""
    name, kohya_name = weight_names(args.output_name, suffix)
    path = os.path.join(folder, name)
    metadata = {**cards.run_metadata(args, info, datasets, step, os.path.basename(path)[:-len(".safetensors")]),
                **(extra_metadata or {})}
    kohya_path = os.path.join(folder, kohya_name)
    network = getattr(unet, "lycoris", None)
    if network is None:
        configs = {info.spec.denoiser: lora_config, **{name: encoder.peft_config["default"]
                                                       for name, encoder in trained_text_encoders(unet).items()}}
        save_lora(unet, path, {
            **metadata, **peft_metadata(configs), "lora_rank": str(args.lora_rank),
            "lora_alpha": str(args.lora_alpha or args.lora_rank), "lora_target": args.lora_layers or args.lora_target},
            info.spec.denoiser)
        if args.lora_format == "comfyui":
            state = (kohya_lora(unet, args.lora_alpha or args.lora_rank) if info.spec.denoiser == "unet"
                     else kohya_transformer_lora(unet, info.family))
            state.update(kohya_text_encoder_lora(unet, info.family, args.lora_alpha or args.lora_rank))
            files.save_safetensors_atomic(state, kohya_path, metadata)
        return path
    state = {key: value.float() for key, value in network.state_dict().items()}
    files.save_safetensors_atomic(state, path, {**metadata, "lycoris_config": json.dumps(lycoris_config)})
    files.write_json_atomic(lycoris_config, os.path.join(folder, "lycoris_config.json"))
    # lora/locon tensors are kohya's own under another prefix; anything else (loha, lokr, DoRA, scalars, a
    # module_algo_map that mixes algorithms) has no kohya form, and only LyCORIS's loader reads it. (IF: no tool
    # reads kohya's layout for it.)
    if info.spec.pixels:
        return path
    if info.spec.denoiser == "unet" and all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                                            for key in state):
        multiplier = lycoris_config.get("multiplier", 1.0)  # kohya has no multiplier: it goes into alpha
        files.save_safetensors_atomic({key.replace("lycoris_", "lora_unet_", 1): value * multiplier
                                       if key.endswith(".alpha") else value for key, value in state.items()},
                                      kohya_path, metadata)
    elif not suffix and folder == args.output_dir:
        print(f"note: no {kohya_name}: these LyCORIS modules have no kohya form (only LyCORIS's loader reads "
              "them)")
    return path


def output_writer(args, info, datasets, model, lora_config, ema, trainable):
    """save_outputs(folder, step) for training: the adapter file(s) in `folder` (a checkpoint or the output), the raw
    weights and with --use_ema the average beside them (with how much of the untrained start it still holds); a
    checkpoint's model card. The output folder's card follows the last validation round, so the run's end writes
    it alone (card_only, for a full fine-tune's pipeline too)."""
    def save_outputs(folder, step, card_only=False):
        if card_only:
            return write_card(args, info, datasets, folder, step)
        path = save_adapter(args, info, datasets, model, lora_config, args.lycoris, step, folder)
        if folder != args.output_dir:
            write_card(args, info, datasets, folder, step)
        if ema is not None:
            metadata = {"weights": "ema", "ema_decay": str(args.ema_decay), "ema_updates": str(ema.updates),
                        "ema_start_share": f"{ema.start_share():.6f}"}
            with ema.applied(trainable):
                save_adapter(args, info, datasets, model, lora_config, args.lycoris, step, folder, EMA_SUFFIX, metadata)
        return path
    return save_outputs


def write_card(args, info, datasets, folder, step):
    """The model card (cards.write_model_card) of the adapter or pipeline in `folder`, naming its kohya file if any."""
    name, kohya = weight_names(args.output_name)
    cards.write_model_card(args, info, datasets, folder, step, name,
                           kohya if os.path.isfile(os.path.join(folder, kohya)) else None)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_adapter(pipe, path):
    """Apply a trained adapter to a pipeline's UNet: a LyCORIS file with LyCORIS's own loader, anything else with
    diffusers' load_lora_weights. `path` is a .safetensors file or an output folder (its --output_name is read
    from its args.json)."""
    file = path if os.path.isfile(path) else os.path.join(path, weight_names(output_name_of(path))[0])
    with safe_open(file, framework="pt") as handle:
        is_lycoris = any(key.startswith("lycoris_") for key in handle.keys())
        config = json.loads((handle.metadata() or {}).get("lycoris_config", "{}"))
    if is_lycoris:
        from lycoris import create_lycoris_from_weights

        denoiser = models.denoiser_of(pipe)
        network, _ = create_lycoris_from_weights(config.get("multiplier", 1.0), file, denoiser)  # as trained
        network.to(device=denoiser.device, dtype=denoiser.dtype)
        network.apply_to()
        denoiser.add_module("lycoris", network)  # keeps it alive and findable, as in training
    else:
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # else: a warning that the (untrained) text encoder has no LoRA keys
        try:
            pipe.load_lora_weights(os.path.dirname(file) or ".", weight_name=os.path.basename(file))
        finally:
            diffusers_logging.set_verbosity(verbosity)
    return pipe


def output_name_of(folder):
    """The --output_name a training output folder was written with (its args.json), or None."""
    record = os.path.join(folder, "args.json")
    return files.read_json(record).get("output_name") if os.path.isfile(record) else None


def unload_adapter(pipe):
    """Take load_adapter's adapter off the pipeline's UNet again: the base model's weights as they were."""
    denoiser = models.denoiser_of(pipe)
    network = getattr(denoiser, "lycoris", None)
    if network is not None:
        network.restore()
        del denoiser.lycoris
    else:
        pipe.unload_lora_weights()
