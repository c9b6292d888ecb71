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
from dataclasses import dataclass

import torch
from safetensors import safe_open

from common import files, models

LORA_PRESETS = ("attention", "attention_ff", "all")  # --lora_target: each family's file lists its modules
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


@dataclass
class LoraSettings:
    """A LoRA's shape (--lora_rank, --lora_alpha: None is the rank, --lora_dropout, --lora_init, --use_dora)."""

    rank: int = 16
    alpha: float = None
    dropout: float = 0.0
    init: str = "gaussian"
    dora: bool = False

    @classmethod
    def from_args(cls, args):
        return cls(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_init,
                   bool(getattr(args, "use_dora", False)))

    @property
    def scale_alpha(self):
        return self.alpha or self.rank

    def peft_config(self, targets):
        """peft's LoraConfig for the `targets` modules."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.scale_alpha, lora_dropout=self.dropout,
                          init_lora_weights=True if self.init == "default" else self.init, target_modules=targets,
                          use_dora=self.dora)


def lora_targets(info, model, preset="attention", layers=None):
    """What peft adapts: --lora_layers' names (comma-separated), or the family's --lora_target preset (a list of
    name suffixes, or a regular expression over full module names where a preset needs a wildcard)."""
    if layers:
        return [name.strip() for name in layers.split(",") if name.strip()]
    return info.lora_targets(model, preset)


def add_lora(model, settings, targets, flag="--lora_layers"):
    """A peft LoRA of `settings` (LoraSettings) on the `targets` modules of the model (lora_targets); `flag` names
    what chose them, for the message when none matches."""
    config = settings.peft_config(targets)
    try:
        model.add_adapter(config)
    except ValueError as err:  # peft: none of the names matched
        raise SystemExit(f"{flag}: {err}") from None
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


def add_text_encoder_lora(model, info, text_encoders, settings, device, checkpointing=False):
    """--train_text_encoder: a peft LoRA (the --lora_* settings) on the attention of each CLIP text encoder (T5
    stays frozen). The encoders become a child of the trained model (`model.text_encoders`), so everything that
    follows its trained weights (the optimiser, DDP's gradient sync, checkpoints, the EMA, switching the adapter
    off or scaling it, the saved files) follows theirs too."""
    held = torch.nn.ModuleDict()
    for (_, name), encoder in zip(info.text_parts, text_encoders):
        if name in info.trainable_text_encoders:
            encoder.add_adapter(settings.peft_config(TEXT_ENCODER_LORA_TARGETS))
            if checkpointing:  # non-reentrant: the frozen embeddings' output needs no gradient
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            held[name] = encoder.to(device).train()
    model.add_module(TRAINED_TEXT_ENCODERS, held)


class TextReader:
    """Each caption's embeddings as training reads them ({"prompt_embeds", ...} per caption): from the text cache
    (`cached`: {caption: embeddings}), or, given the trained text encoders (`encoders`: (tokenizers, text encoders)),
    encoded now, with gradients into their LoRA (a trained encoder's output changes every step, so it cannot come
    from a cache)."""

    def __init__(self, info, cached, encoders=None, autocast=contextlib.nullcontext):
        self.info, self.cached, self.encoders, self.autocast = info, cached, encoders, autocast

    def __call__(self, captions):
        if self.encoders is None:
            return [self.cached[caption] for caption in captions]
        with self.autocast():
            encoded = self.info.encode_text(*self.encoders, captions)
        return [{key: value[i] for key, value in encoded.items()} for i in range(len(captions))]


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


def kohya_text_encoder_lora(model, prefixes, alpha):
    """The trained text encoders' LoRA in the kohya layout, each encoder's modules under its family's prefix
    (`prefixes`: lora_te_ for SD 1.x / 2.x's one encoder, lora_te1_ / lora_te2_ for the first and second CLIP of
    SDXL, SD3 and FLUX.1, as kohya's sd-scripts write them)."""
    state = {}
    for encoder, module, kind, value in text_encoder_matrices(model):
        name = prefixes[encoder] + module.replace(".", "_")
        state[f"{name}.lora_{kind}.weight"] = value
        state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state


def kohya_denoiser_lora(model, info, alpha):
    """The denoiser's LoRA in kohya's layout for its family: its diffusers module names (UNets), or the original
    checkpoint's fused modules (SD3, FLUX.1: kohya_transformer_lora)."""
    return kohya_lora(model, alpha) if info.kohya_layout == "modules" else kohya_transformer_lora(model, info)


def kohya_transformer_lora(model, info):
    """The peft LoRA on an SD3 / FLUX transformer in kohya's layout of the original checkpoint (info.original_layout)
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
    for original, parts in info.original_layout(model):
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
                         f"{info.family} checkpoint's layout; train without it, or write the diffusers layout only")
    return state


def weight_names(output_name=None, suffix=""):
    """(diffusers-layout file, kohya-layout file) of an adapter: pytorch_lora_weights.safetensors and
    pytorch_lora_weights_comfyui.safetensors, or with --output_name NAME: NAME.safetensors and NAME_comfyui.safetensors;
    `suffix` "_ema" names the average's (pytorch_lora_weights_ema.safetensors, NAME_ema_comfyui.safetensors)."""
    stem = (output_name or LORA_WEIGHTS_NAME[:-len(".safetensors")]) + suffix
    return f"{stem}.safetensors", f"{stem}_comfyui.safetensors"


def save_adapter(model, info, paths, metadata, lora_metadata=None, lycoris_config=None):
    """Write the model's trained adapter to paths[0] with `metadata`: a peft LoRA in diffusers' format (with
    `lora_metadata` too; and, given paths[1], the kohya layout there), or a LyCORIS network in its own format with
    its config beside it (`lycoris_config`; and, for lora/locon, the kohya layout diffusers and ComfyUI load, at
    paths[1]). Returns whether a kohya file was written."""
    path, kohya_path = paths
    network = getattr(model, "lycoris", None)
    if network is None:
        configs = {info.denoiser: model.peft_config["default"],
                   **{name: encoder.peft_config["default"] for name, encoder in trained_text_encoders(model).items()}}
        save_lora(model, path, {**metadata, **peft_metadata(configs), **(lora_metadata or {})}, info.denoiser)
        if kohya_path is not None:
            alpha = configs[info.denoiser].lora_alpha
            state = kohya_denoiser_lora(model, info, alpha)
            state.update(kohya_text_encoder_lora(model, info.kohya_text_encoder_prefixes, alpha))
            files.save_safetensors_atomic(state, kohya_path, metadata)
        return kohya_path is not None
    state = {key: value.float() for key, value in network.state_dict().items()}
    files.save_safetensors_atomic(state, path, {**metadata, "lycoris_config": json.dumps(lycoris_config)})
    files.write_json_atomic(lycoris_config, os.path.join(os.path.dirname(path), "lycoris_config.json"))
    # lora/locon tensors are kohya's own under another prefix; anything else (loha, lokr, DoRA, scalars, a
    # module_algo_map that mixes algorithms) has no kohya form, and only LyCORIS's loader reads it. (IF: no tool
    # reads kohya's layout for it.)
    if kohya_path is None or info.kohya_layout != "modules" or not all(
            key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in state):
        return False
    multiplier = lycoris_config.get("multiplier", 1.0)  # kohya has no multiplier: it goes into alpha
    files.save_safetensors_atomic({key.replace("lycoris_", "lora_unet_", 1): value * multiplier
                                   if key.endswith(".alpha") else value for key, value in state.items()},
                                  kohya_path, metadata)
    return True


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
