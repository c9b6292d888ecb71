"""DreamBooth training: a LoRA (or a full fine-tune) of an SD 1.x / 2.x / SDXL UNet on one subject.

    python train_dreambooth.py --config config.json
    accelerate launch train_dreambooth.py --config config.json          # several GPUs (DDP)
    python train_dreambooth.py --pretrained_model_name_or_path MODEL --instance_data_dir subject/ \\
        --instance_prompt "a photo of ohwx dog" --output_dir output/ --max_train_steps 800

Reads the base model (diffusers folder, hub id or single file), the data config (SPEC §3) and the caches
(VAE latents and text embeddings; missing or stale ones are built first, exactly as cache_latents.py does).
Writes to --output_dir:
    pytorch_lora_weights.safetensors   the LoRA (diffusers format: pipe.load_lora_weights(output_dir))
    model_index.json, unet/, ...        instead, with --model_type full: a complete diffusers pipeline
    pytorch_lora_weights_ema.safetensors  with --use_ema: the averaged weights (ema/ for a full fine-tune)
    checkpoint-STEP/                    resumable state every --checkpointing_steps
    validation/step-STEP/               validation images (one PNG each, plus grid.png)
    logs/train_log.jsonl                one JSON line per step (loss, lr, time); TensorBoard too when installed

The training loop is one flat block near the end of main(); each feature (noise offset, rollouts, prior loss,
min-SNR, clipping, EMA, checkpoints, validation) is one commented block in it.
"""

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings

import torch
from tqdm.auto import tqdm

import common
import webhooks
from common import STATE_FILE, list_checkpoints, str2bool

LORA_TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention_ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    "all": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
            "conv1", "conv2", "conv_shortcut", "time_emb_proj"],
}
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_comfyui.safetensors"  # kohya layout: ComfyUI, A1111, diffusers
LYCORIS_PRESET_ATTRIBUTES = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                             "NAME_ALGO_MAP", "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
LYCORIS_PRESET_NAME = "dreambooth-config"
EMA_SUFFIX = "_ema"  # pytorch_lora_weights_ema.safetensors (LoRA / LyCORIS) and ema/ (a full fine-tune's pipeline)
EMA_CHECKPOINT_FILE = "ema.safetensors"
PREVIEW_VAES = {"sd1": "madebyollin/taesd", "sd2": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl",  # Tiny AEs
                "sdxl-refiner": "madebyollin/taesdxl"}
ROLLOUT_SAMPLERS = {"unipc": "UniPCMultistepScheduler", "euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler",
                    "dpm": "DPMSolverMultistepScheduler"}


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


class BatchSampler:
    """The stream of training batches: pick a dataset by weight, then the next batch from one of its buckets.

    Every choice comes from one random.Random(seed), so the stream is a function of the seed and the file list
    alone: resuming replays it up to the checkpoint (cheap, no images are read) instead of storing it."""

    def __init__(self, datasets, plans, batch_size, seed, sampling="auto"):
        self.datasets = [d for d in datasets if d.trains]
        self.plans = plans
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        # auto: a dataset is drawn in proportion to the images it shows per epoch; uniform: by probability alone
        self.weights = [d.probability * (len(plans[d.id]) * (d.repeats + 1) if sampling == "auto" else 1)
                        for d in self.datasets]
        self.queues = {d.id: [] for d in self.datasets}
        self.epochs = {d.id: 0 for d in self.datasets}
        self.drawn = 0

    def buckets(self, dataset):
        groups = {}
        for entry in self.plans[dataset.id]:
            groups.setdefault(entry.bucket, []).append(entry)
        return dict(sorted(groups.items()))

    def batches_per_epoch(self):
        return sum(math.ceil(len(members) * (d.repeats + 1) / self.batch_size)
                   for d in self.datasets for members in self.buckets(d).values())

    def epoch_batches(self, dataset):
        batches = []
        for members in self.buckets(dataset).values():
            pool = members * (dataset.repeats + 1)  # repeats: each image is seen repeats + 1 times per epoch
            self.rng.shuffle(pool)
            for start in range(0, len(pool), self.batch_size):
                batch = pool[start:start + self.batch_size]
                while len(batch) < self.batch_size:  # a short batch is filled from its bucket, never dropped
                    batch.append(self.rng.choice(members))
                batches.append(batch)
        self.rng.shuffle(batches)
        return batches

    def next(self):
        dataset = self.rng.choices(self.datasets, weights=self.weights)[0]
        if not self.queues[dataset.id]:
            self.queues[dataset.id] = self.epoch_batches(dataset)
            self.epochs[dataset.id] += 1
        batch = self.queues[dataset.id].pop()
        self.drawn += 1
        return [(entry, self.rng.choice(entry.captions)) for entry in batch]


def oversubscription_notices(sampler):
    notes = []
    for dataset in sampler.datasets:
        for (width, height), members in sampler.buckets(dataset).items():
            if len(members) * (dataset.repeats + 1) < sampler.batch_size:
                notes.append(f"notice: bucket {width}x{height} of dataset {dataset.id!r} holds {len(members)} image(s), "
                             f"fewer than the batch size {sampler.batch_size}: its batches repeat images "
                             "(oversubscribed) rather than dropping them")
    return notes


def batch_generator(seed, batch_index):
    """A fresh generator per batch of the stream: noise, timesteps and latent samples depend only on the seed and
    the batch's place in the stream, so a resumed run draws what the uninterrupted run drew, and N processes with
    one micro-batch each draw what one process accumulating N micro-batches draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + batch_index) % (2 ** 63))


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model for the duration of the block: the adapter is switched off (peft: disable_adapters; LyCORIS:
    multiplier 0), and on again afterwards, also when the block raises (a prior pass must never leak)."""
    network = getattr(model, "lycoris", None)
    multiplier = network.multiplier if network is not None else None
    if network is not None:
        network.set_multiplier(0.0)
    else:
        model.disable_adapters()
    try:
        yield model
    finally:
        if network is not None:
            network.set_multiplier(multiplier)
        else:
            model.enable_adapters()


def epoch_mix(sampler):
    """(instance samples, regularisation samples) per epoch, and the instance share of the batches drawn."""
    counts = {True: 0, False: 0}
    shares = {True: 0.0, False: 0.0}
    for dataset, weight in zip(sampler.datasets, sampler.weights):
        counts[dataset.is_regularisation_data] += len(sampler.plans[dataset.id]) * (dataset.repeats + 1)
        shares[dataset.is_regularisation_data] += weight
    return counts[False], counts[True], shares[False] / sum(shares.values())


def masked_mse(pred, target, mask=None, normalize=True):
    """Per-sample mean squared error. With a mask (B, 1, h, w; 1 = train, 0 = ignore, between = partial weight)
    each element's error is weighted by the mask; `normalize` divides by the mask's mean, so the loss is the mean
    error over the masked area and a small subject does not shrink the learning rate."""
    error = (pred.float() - target.float()) ** 2
    if mask is None:
        return error.mean(dim=(1, 2, 3))
    loss = (error * mask).mean(dim=(1, 2, 3))
    if normalize:
        loss = loss / mask.mean(dim=(1, 2, 3)).clamp(min=1e-8)  # an all-black mask stays 0, not 0/0
    return loss


def min_snr_weights(noise_scheduler, timesteps, gamma, prediction_type):
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ) / SNR for ε targets, min(SNR, γ) / (SNR + 1) for v."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def rollout_probability(args, step):
    """Scheduled sampling's probability at optimiser step `step` (0-based): 0 at step 0, rising linearly to
    --scheduled_sampling_probability at --scheduled_sampling_ramp_steps, then constant. Early on the model's
    rollouts are noise; they are phased in as the model learns, never phased out."""
    if not args.scheduled_sampling_ramp_steps:
        return args.scheduled_sampling_probability
    return args.scheduled_sampling_probability * min(1.0, step / args.scheduled_sampling_ramp_steps)


def rollout_sampler(name, scheduler_config, device="cpu"):
    """A fresh diffusers sampler for one rollout (multistep samplers keep per-run state), with one inference step
    per training timestep: its schedule is 999, 998, ..., 0, so k steps from t+k end exactly at t."""
    import diffusers

    sampler = getattr(diffusers, ROLLOUT_SAMPLERS[name]).from_config(scheduler_config, timestep_spacing="trailing")
    sampler.set_timesteps(scheduler_config.num_train_timesteps, device=device)
    return sampler


@torch.no_grad()
def rollout(model, sampler, clean, noise, start, steps, prompt_embeds, added_cond, weight_dtype):
    """Scheduled sampling for one sample: noise the clean latent to timestep `start`, then run `steps` steps of
    the sampler with the model's own predictions, down to timestep start - steps. Returns that latent in the
    form the UNet is trained on (the variance-preserving x_t; Euler samples in its own scaled space)."""
    index = sampler.config.num_train_timesteps - 1 - start  # position of `start` in the schedule 999..0
    x = sampler.add_noise(clean, noise, sampler.timesteps[index:index + 1])
    for timestep in sampler.timesteps[index:index + steps]:
        model_input = sampler.scale_model_input(x, timestep)
        prediction = model(model_input.to(weight_dtype), timestep, prompt_embeds.to(weight_dtype),
                           added_cond_kwargs=added_cond).sample
        x = sampler.step(prediction.float(), timestep, x).prev_sample
    return sampler.scale_model_input(x, sampler.timesteps[index + steps])


def implied_noise(noise_scheduler, clean, noisy, timesteps):
    """The noise that puts `clean` at `noisy` in the forward process: (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t).
    As a target it makes a rolled-out x_t imply the true clean latent (for v: v = sqrt(abar) eps - sqrt(1-abar) x0
    with this eps)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(clean.device)[timesteps].float().view(-1, 1, 1, 1)
    return (noisy - alphas_cumprod.sqrt() * clean) / (1 - alphas_cumprod).sqrt()


class EMA:
    """An exponential moving average of the trainable parameters, kept in fp32 on `device` (the CPU by default:
    system memory, not VRAM). Each update: shadow = d * shadow + (1 - d) * param, with d = --ema_decay, or with
    warm-up d = min(ema_decay, (1 + s) / (10 + s)) where s counts the updates made before (early averages forget
    the random start quickly)."""

    def __init__(self, parameters, decay, warmup, device):
        self.decay, self.warmup = decay, warmup
        self.shadow = {name: p.detach().to(device, torch.float32, copy=True) for name, p in parameters.items()}
        self.updates = 0

    def current_decay(self):
        s = self.updates
        return min(self.decay, (1 + s) / (10 + s)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, parameters):
        """Fold the current weights in; returns the decay used."""
        decay = self.current_decay()
        for name, param in parameters.items():
            shadow = self.shadow[name]
            shadow.lerp_(param.detach().to(shadow.device, torch.float32), 1 - decay)
        self.updates += 1
        return decay

    @contextlib.contextmanager
    def applied(self, parameters):
        """The EMA weights in the model for the duration of the block (to save or render them), then the raw ones.
        The raw weights wait in system memory: a second copy of a fully fine-tuned UNet would not fit on the GPU."""
        raw = {name: p.detach().to("cpu", copy=True) for name, p in parameters.items()}
        with torch.no_grad():
            for name, param in parameters.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in parameters.items():
                    param.copy_(raw[name])


def add_lora(unet, args):
    from peft import LoraConfig

    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank, lora_dropout=args.lora_dropout,
                        init_lora_weights=True if args.lora_init == "default" else args.lora_init,
                        target_modules=LORA_TARGETS[args.lora_target])
    unet.add_adapter(config)
    return config


def read_lycoris_config(path):
    config = common.read_json(path, "--lycoris_config")
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


def trainable_parameters(model):
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def run_metadata(args, info, datasets, step):
    """What a person wants to know about an adapter file later, as safetensors metadata (strings)."""
    prompts = sorted({p for d in datasets if d.trains and not d.is_regularisation_data and d.instance_prompt
                      for p in common.as_list(d.instance_prompt)})
    return {"base_model": str(info.ref), "family": info.family, "prediction_type": info.prediction_type,
            "base_model_precision": args.base_model_precision, "instance_prompts": json.dumps(prompts),
            "step": str(step)}


def peft_metadata(config):
    """diffusers reads the LoRA's config from this key (so an alpha other than the rank survives reloading)."""
    adapter = {f"unet.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(adapter, sort_keys=True, default=str)}


def lora_matrices(unet):
    """(module name, "down" | "up", fp32 tensor) for each matrix of the UNet's peft LoRA (peft's A is down, B up)."""
    from peft.utils import get_peft_model_state_dict

    for key, value in get_peft_model_state_dict(unet).items():  # "<module>.lora_A.weight" / "<module>.lora_B.weight"
        module, kind = key.rsplit(".lora_", 1)
        yield module, "down" if kind.startswith("A") else "up", value.float()


def save_lora(unet, path, metadata):
    """The UNet's peft LoRA in diffusers' format: keys 'unet.<module>.lora.down.weight' / '.lora.up.weight', for
    load_lora_weights. Every key is renamed here, not with diffusers' convert_state_dict_to_diffusers: that one
    renames attention layers only, and load_lora_weights judges the whole file's format by its first key, so a
    file that mixes the two (conv or time-embedding LoRAs first, --lora_target all) loses its attention LoRAs."""
    state = {f"unet.{module}.lora.{kind}.weight": value for module, kind, value in lora_matrices(unet)}
    common.save_safetensors_atomic(state, path, metadata)


def kohya_lora(unet, alpha):
    """The peft LoRA in the kohya layout (lora_unet_<module>.lora_down/lora_up/alpha) that ComfyUI, A1111 and
    diffusers' load_lora_weights all read."""
    state = {}
    for module, kind, value in lora_matrices(unet):
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.lora_{kind}.weight"] = value
        state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state


def save_adapter(args, info, datasets, unet, lora_config, lycoris_config, step, folder, suffix="",
                 extra_metadata=None):
    """Write the trained adapter into `folder`: diffusers-format LoRA (and --lora_format comfyui: the kohya layout
    too), or the LyCORIS file with its config (and, for lora/locon, the kohya layout diffusers and ComfyUI load).
    `suffix` names a variant: "_ema" writes pytorch_lora_weights_ema.safetensors (and ..._ema_comfyui)."""
    metadata = {**run_metadata(args, info, datasets, step), **(extra_metadata or {})}
    path = os.path.join(folder, LORA_WEIGHTS_NAME.replace(".safetensors", f"{suffix}.safetensors"))
    kohya_path = os.path.join(folder, KOHYA_WEIGHTS_NAME.replace("_comfyui", f"{suffix}_comfyui"))
    network = getattr(unet, "lycoris", None)
    if network is None:
        save_lora(unet, path, {**metadata, **peft_metadata(lora_config), "lora_rank": str(args.lora_rank),
                               "lora_alpha": str(args.lora_alpha or args.lora_rank), "lora_target": args.lora_target})
        if args.lora_format == "comfyui":
            common.save_safetensors_atomic(kohya_lora(unet, args.lora_alpha or args.lora_rank), kohya_path, metadata)
        return path
    state = {key: value.float() for key, value in network.state_dict().items()}
    common.save_safetensors_atomic(state, path, {**metadata, "lycoris_config": json.dumps(lycoris_config)})
    common.write_json_atomic(lycoris_config, os.path.join(folder, "lycoris_config.json"))
    # lora/locon tensors are kohya's own under another prefix; anything else (loha, lokr, DoRA, scalars, a
    # module_algo_map that mixes algorithms) has no kohya form, and only LyCORIS's loader reads it.
    if all(key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for key in state):
        multiplier = lycoris_config.get("multiplier", 1.0)  # kohya has no multiplier: it goes into alpha
        common.save_safetensors_atomic({key.replace("lycoris_", "lora_unet_", 1): value * multiplier
                                        if key.endswith(".alpha") else value for key, value in state.items()},
                                       kohya_path, metadata)
    elif not suffix and folder == args.output_dir:
        print(f"note: no {KOHYA_WEIGHTS_NAME}: these LyCORIS modules have no kohya form (only LyCORIS's loader reads "
              "them)")
    return path


def save_checkpoint(accelerator, args, unet, optimizer, lr_scheduler, step, sampler, seed, ema=None,
                    save_outputs=None, skipped_nan=0):
    """Write checkpoint-STEP atomically: everything goes into a hidden temporary folder, the state file last,
    then one rename. A run killed at any moment leaves either the whole checkpoint or none. `save_outputs(folder)`
    adds the adapter files, so a checkpoint loads (and evaluates) exactly like a final output."""
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    tmp = os.path.join(args.output_dir, f".checkpoint-{step}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    try:
        # Each process keeps its own RNG state (dropout draws differ per rank).
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, os.path.join(tmp, f"rng_{accelerator.process_index}.pt"))
        if accelerator.is_main_process:
            weights = trainable_parameters(accelerator.unwrap_model(unet))
            common.save_safetensors_atomic(weights, os.path.join(tmp, "trainable.safetensors"))
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            torch.save(lr_scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
            if ema is not None:
                common.save_safetensors_atomic(ema.shadow, os.path.join(tmp, EMA_CHECKPOINT_FILE))
            if save_outputs is not None:
                save_outputs(tmp, step)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name in os.listdir(tmp):
                with open(os.path.join(tmp, name), "rb") as handle:
                    os.fsync(handle.fileno())
            common.write_json_atomic({
                "step": step, "batches_drawn": sampler.drawn, "seed": seed,
                "train_batch_size": args.train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "num_processes": accelerator.num_processes, "model_type": args.model_type,
                "ema_updates": ema.updates if ema is not None else None,
                "skipped_nan_batches": skipped_nan,  # --skip_nan_steps counts over the whole run, resumes included
            }, os.path.join(tmp, STATE_FILE))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except BaseException as err:  # a full disk, a write error, an interrupt: the temporary folder goes, older
        shutil.rmtree(tmp, ignore_errors=True)  # checkpoints stay as they are
        full = isinstance(err, common.DiskFull)
        if isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and not full):
            raise
        reason = (f"the disk is full while writing {os.path.basename(err.path)}" if full
                  else f"{type(err).__name__}: {err}")
        raise SystemExit(f"could not write checkpoint {final} ({reason}); nothing of it was kept and the earlier "
                         "checkpoints are intact. Free some disk space and rerun with --resume_from_checkpoint "
                         "latest.") from None
    # Rotation: keep the newest --checkpoints_total_limit checkpoints.
    if accelerator.is_main_process and args.checkpoints_total_limit:
        for old in list_checkpoints(args.output_dir)[:-args.checkpoints_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_state(path):
    """A checkpoint's optimiser / schedule / RNG file: plain tensors and numbers only (weights_only), so a
    tampered file cannot run code on load; anything else is refused, naming the file."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # UnpicklingError for a foreign object, RuntimeError / EOFError for a damaged file
        raise SystemExit(f"{path}: not a training state file this script wrote ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}); it is damaged or was replaced. Resume from another "
                         "checkpoint, or delete this one.") from None


def load_checkpoint(path, accelerator, unet, optimizer, lr_scheduler, ema=None):
    """Restore weights, optimizer, lr schedule, RNG and the EMA; returns the checkpoint's training_state.json."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as handle:
        state = json.load(handle)
    model = accelerator.unwrap_model(unet)
    weights = common.load_tensors(os.path.join(path, "trainable.safetensors"))
    missing = set(trainable_parameters(model)) - set(weights)
    if missing:
        raise SystemExit(f"{path} does not match this run's trainable weights (missing e.g. {sorted(missing)[0]}); "
                         "was it written with other --model_type / --lora_* settings?")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(load_state(os.path.join(path, "optimizer.pt")))
    lr_scheduler.load_state_dict(load_state(os.path.join(path, "scheduler.pt")))
    if accelerator.scaler is not None and os.path.isfile(os.path.join(path, "scaler.pt")):
        accelerator.scaler.load_state_dict(load_state(os.path.join(path, "scaler.pt")))
    rng_file = os.path.join(path, f"rng_{accelerator.process_index}.pt")
    if os.path.isfile(rng_file):
        rng = load_state(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    ema_file = os.path.join(path, EMA_CHECKPOINT_FILE)
    if ema is not None and os.path.isfile(ema_file):
        for name, value in common.load_tensors(ema_file).items():
            ema.shadow[name].copy_(value)
        ema.updates = state["ema_updates"]
    elif ema is not None:
        print(f"warning: {path} holds no EMA (the run had no --use_ema); the average starts from the resumed weights")
        with torch.no_grad():
            for name, param in trainable_parameters(model).items():
                ema.shadow[name].copy_(param)
        ema.updates = 0
    return state


def resume_checkpoint_path(args):
    """The checkpoint --resume_from_checkpoint names (latest: the newest complete one), or None to start fresh."""
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        if not found:
            print(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir} yet; starting fresh")
            return None
        return found[-1]
    path = args.resume_from_checkpoint
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise SystemExit(f"--resume_from_checkpoint {path}: not a complete checkpoint folder (no {STATE_FILE})")
    return path


def image_grid(images, columns, labels=()):
    """Images in rows of `columns`; `labels` (optional) head equal groups of columns, e.g. ("raw", "EMA")."""
    from PIL import Image, ImageDraw

    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    top = 14 if labels else 0
    grid = Image.new("RGB", (columns * width, rows * height + top), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height + top))
    draw = ImageDraw.Draw(grid)
    for i, label in enumerate(labels):
        draw.text((i * columns // len(labels) * width + 3, 1), label, fill="black")
    return grid


@torch.no_grad()
def decode_preview(preview_vae, latents):
    """A quick picture of in-progress latents: the Tiny AutoEncoder decodes the pipeline's (scaled) latents as they
    are, in milliseconds, where the full VAE would take seconds."""
    from PIL import Image

    image = preview_vae.decode(latents[:1].to(preview_vae.device, preview_vae.dtype)).sample[0]
    return Image.fromarray(((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


def preview_sender(hooks, preview_vae, every, step, prompt, seed):
    """A callback_on_step_end that sends a preview every `every` denoising steps and at the last one."""
    def callback(pipe, index, timestep, tensors):
        done, total = index + 1, pipe.num_timesteps  # the steps this call runs (img2img runs only the last ones)
        if done % every == 0 or done == total:
            hooks.send("preview_image", f"{prompt} (denoising step {done}/{total})", step=step,
                       images=[decode_preview(preview_vae, tensors["latents"])], prompt=prompt, seed=seed,
                       denoising_step=done)
        return tensors
    return callback


def run_validation(args, info, accelerator, unet, vae, tokenizers, text_encoders, step, ema=None, scoring=None,
                   hooks=None, preview_vae=None, sources=None):
    """Render every --validation_prompt at fixed seeds (the same seeds at every step, so images are comparable).
    With an EMA, --validation_ema picks the raw weights, the EMA weights, or both side by side in the grid.
    With `scoring` (--evaluation_type clip: the Scorer and the subject's CLIP embeddings) the images are scored;
    returns {"validation/clip_t": ..., "validation/clip_i": ...} (with "/ema" variants), else {}.
    Webhooks get each prompt's images, and with `preview_vae` previews while they are generated.
    A refiner refines `sources` ([(caption, image)]: common.refine_sources) at --refiner_training_strength instead;
    its grid shows each source beside its refinement."""
    model = accelerator.unwrap_model(unet)
    for part in (vae, *text_encoders):  # no-op unless --offload_frozen left them in system memory
        part.to(accelerator.device)
    pipe = common.build_pipeline(info, model, vae, tokenizers, text_encoders)
    pipe.set_progress_bar_config(disable=True)
    folder = os.path.join(args.output_dir, "validation", f"step-{step}")
    os.makedirs(folder, exist_ok=True)
    resolution = int(args.validation_resolution or common.round64(info.native_resolution))
    variants = {"raw": ["raw"], "ema": ["ema"], "both": ["raw", "ema"]}[args.validation_ema if ema else "raw"]
    was_training = model.training
    model.eval()  # no LoRA dropout while sampling
    # Prompts may hold {instance} / {class}; CLIP-T scores against the class in place of the instance.
    texts = [caption for caption, _ in sources] if sources else args.validation_prompt
    prompts = [common.fill_prompt(p, args.validation_instance or "", args.validation_class or args.validation_instance
                                  or "") for p in texts]
    per_prompt = 1 if sources else args.num_validation_images
    grid_rows = {p: [sources[p][1]] if sources else [] for p in range(len(prompts))}
    scores = {}
    for variant in variants:
        made = {p: [] for p in range(len(prompts))}
        jobs = [(p, i) for p in range(len(prompts)) for i in range(per_prompt)]
        weights = ema.applied(trainable_parameters(model)) if variant == "ema" else contextlib.nullcontext()
        with weights:
            for p, i in tqdm(jobs, desc=f"validation images (step {step}, {variant})", unit="img", leave=False):
                seed = args.validation_seed + i
                preview = None
                if preview_vae is not None and hooks is not None:
                    preview = preview_sender(hooks, preview_vae, args.validation_preview_steps, step, prompts[p][0],
                                             seed)
                call = common.pipeline_call(args, prompts[p][0], seed, args.validation_num_inference_steps,
                                            args.validation_guidance_scale, args.validation_negative_prompt,
                                            resolution, sources[p][1] if sources else None)
                with torch.no_grad(), accelerator.autocast():
                    image = pipe(**call, callback_on_step_end=preview,
                                 callback_on_step_end_tensor_inputs=["latents"]).images[0]
                name = f"prompt{p:02d}-seed{seed}" + (EMA_SUFFIX if variant == "ema" else "")
                common.save_image_atomic(image, os.path.join(folder, f"{name}.png"))
                made[p].append(image)
        for p, images in made.items():
            grid_rows[p] += images
            if hooks is not None:
                hooks.send("validation_image", prompts[p][0] + (" (EMA weights)" if variant == "ema" else ""),
                           step=step, images=images, prompt=prompts[p][0], weights=variant)
        if scoring is not None:
            scorer, real_clip = scoring
            values = scorer.scores([image for p in made for image in made[p]],
                                   [prompts[p][1] for p in made for _ in made[p]], real_clip)
            tag = "/ema" if variant == "ema" else ""
            scores.update({f"validation/{k}{tag}": v for k, v in values.items()})
    labels = [{"raw": "raw", "ema": "EMA"}[v] for v in variants] if len(variants) > 1 or sources else []
    if sources:
        labels = ["source", *labels]
    common.save_image_atomic(image_grid([image for p in grid_rows for image in grid_rows[p]], len(grid_rows[0]),
                                        labels), os.path.join(folder, "grid.png"))
    common.write_text_atomic("\n".join(generate for generate, _ in prompts) + "\n", os.path.join(folder, "prompts.txt"))
    model.train(was_training)
    if args.offload_frozen:
        for part in (vae, *text_encoders):
            part.to("cpu")
    return scores


def save_full_pipeline(info, unet, vae, tokenizers, text_encoders, output_dir):
    """A full fine-tune as a complete diffusers pipeline in output_dir, moved into place file by file with
    model_index.json last, so the folder only looks like a model once it is one."""
    pipe = common.build_pipeline(info, unet, vae, tokenizers, text_encoders)
    tmp = os.path.join(output_dir, ".pipeline.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    index = os.path.join(output_dir, "model_index.json")
    if os.path.exists(index):  # an earlier pipeline here stops being a model while its parts are replaced
        os.remove(index)
    for name in sorted(os.listdir(tmp), key=lambda n: n == "model_index.json"):
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        common.fault_point("write")
        os.replace(os.path.join(tmp, name), target)
    os.rmdir(tmp)


class JsonlLog:
    """One JSON object per line; TensorBoard scalars too when tensorboard is installed.

    The log is the run's record, so it must read like an uninterrupted run's: a resumed run (`resumed_at` = the
    checkpoint's step) keeps the lines up to that step and drops the rest (steps it will redo, and a line a kill
    cut in half); a run that starts afresh starts an empty log."""

    def __init__(self, folder, resumed_at=None):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "train_log.jsonl")
        kept = common.read_log(path, until_step=resumed_at) if resumed_at is not None else []
        common.write_text_atomic("".join(json.dumps(record) + "\n" for record in kept), path)
        self.handle = open(path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(folder, "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def log(self, step, values):
        self.handle.write(json.dumps({"step": step, **values}) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)

    def close(self):
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def check_args(args):
    """Refuse impossible settings before any model work."""
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise SystemExit("--mixed_precision fp16 needs a CUDA GPU; on this machine use bf16 or no")
    if args.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise SystemExit("--mixed_precision bf16: this GPU has no bf16 support; use fp16")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        raise SystemExit("--train_batch_size and --gradient_accumulation_steps must be 1 or more")
    if args.validation_prompt and args.validation_steps < 1:
        raise SystemExit("--validation_steps must be 1 or more")
    if args.skip_nan_steps < 0:
        raise SystemExit("--skip_nan_steps must be 0 or more (how many NaN/inf batches may be dropped)")
    quantised_encoders = [i for i in (1, 2, 3) if getattr(args, f"text_encoder_{i}_precision") != "no_change"]
    if args.model_type == "full" and (args.lora_type == "lycoris" or args.base_model_precision != "no_change"
                                      or quantised_encoders):
        raise SystemExit("--model_type full trains every UNet weight and saves a whole pipeline: it takes neither "
                         "--lora_type lycoris nor a quantised --base_model_precision or --text_encoder_N_precision "
                         "(those are for adapters); use --model_type lora")
    if args.lora_type == "lycoris" and not args.lycoris_config:
        raise SystemExit("--lora_type lycoris needs --lycoris_config FILE.json (e.g. {\"algo\": \"lokr\", "
                         "\"linear_dim\": 10000, \"linear_alpha\": 1, \"factor\": 16})")
    args.lycoris = read_lycoris_config(args.lycoris_config) if args.lora_type == "lycoris" else None
    common.check_precision(args.base_model_precision, "--base_model_precision")
    for i in (1, 2, 3):
        common.check_precision(getattr(args, f"text_encoder_{i}_precision"), f"--text_encoder_{i}_precision")
    if args.prior_loss_target == "base_model" and args.model_type == "full":
        raise SystemExit("--prior_loss_target base_model needs an adapter to switch off; a full fine-tune has none: "
                         "use --prior_loss_target dataset")
    args.prior_loss_target = args.prior_loss_target or ("dataset" if args.model_type == "full" else "base_model")
    if (args.scheduled_sampling_max_step_offset < 0 or args.scheduled_sampling_ramp_steps < 0
            or not 0 <= args.scheduled_sampling_probability <= 1):
        raise SystemExit("scheduled sampling: --scheduled_sampling_max_step_offset and --scheduled_sampling_ramp_steps "
                         "must be 0 or more and --scheduled_sampling_probability between 0 and 1 (e.g. 10, 1000, 1.0)")
    if not 0 < args.ema_decay < 1 or args.ema_update_interval < 1:
        raise SystemExit("--ema_decay must lie between 0 and 1 (e.g. 0.999) and --ema_update_interval be 1 or more")
    args.validation_ema = args.validation_ema or ("both" if args.use_ema else "raw")
    if args.validation_preview and not (args.webhook_config and args.validation_prompt):
        raise SystemExit("--validation_preview sends pictures of validation images to webhooks: it needs "
                         "--validation_prompt and --webhook_config")
    # A scoring or preview model with only pickle weights is refused now, not once the caches are built.
    if args.evaluation_type == "clip" and args.validation_prompt:
        common.safe_weights(args.clip_model, args.allow_pickle)
    if args.validation_preview and args.preview_vae:
        common.safe_weights(args.preview_vae, args.allow_pickle)
    if not 0 < args.refiner_training_strength <= 1:
        raise SystemExit("--refiner_training_strength must lie in (0, 1] (the share of the schedule, e.g. 0.2)")
    if args.validation_preview_steps < 1:
        raise SystemExit("--validation_preview_steps must be 1 or more")
    for placeholder, flag in (("{instance}", "validation_instance"), ("{class}", "validation_class")):
        if any(placeholder in p for p in args.validation_prompt or []) and not getattr(args, flag):
            raise SystemExit(f"a --validation_prompt uses {placeholder}: pass --{flag} (e.g. \"ohwx dog\" / \"dog\")")
    if args.validation_ema != "raw" and not args.use_ema:
        raise SystemExit(f"--validation_ema {args.validation_ema} renders the EMA weights: add --use_ema")


# ---------------------------------------------------------------------------------------------------------------------
# Flags


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_model_args(parser)
    common.add_data_args(parser)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--data_sampling", default="auto", choices=["auto", "uniform"],
                        help="auto: datasets drawn by probability x images x (repeats+1); uniform: by probability")

    group = parser.add_argument_group("what to train")
    group.add_argument("--model_type", default="lora", choices=["lora", "full"])
    group.add_argument("--lora_type", default="standard", choices=["standard", "lycoris"],
                       help="standard: peft LoRA (--lora_* flags); lycoris: LyCORIS, configured by --lycoris_config")
    group.add_argument("--lycoris_config", default=None, help="LyCORIS config JSON (algo, dims, factor, apply_preset)")
    group.add_argument("--lora_format", default="diffusers", choices=["diffusers", "comfyui"],
                       help="comfyui: also write the kohya key layout (pytorch_lora_weights_comfyui.safetensors)")
    group.add_argument("--base_model_precision", default="no_change", choices=common.PRECISIONS,
                       help="quantise the frozen UNet (LoRA/LyCORIS only); int8-quanto is the recommended one")
    group.add_argument("--offload_frozen", type=str2bool, nargs="?", const=True, default=False,
                       help="keep the VAE and text encoders in system memory between validations (GPU memory)")
    group.add_argument("--lora_rank", type=int, default=16)
    group.add_argument("--lora_alpha", type=float, default=None, help="default: the rank (scale 1.0)")
    group.add_argument("--lora_dropout", type=float, default=0.0)
    group.add_argument("--lora_target", default="attention", choices=list(LORA_TARGETS))
    group.add_argument("--lora_init", default="gaussian", choices=["gaussian", "default"],
                       help="init of the A matrices (B starts at zero either way, so step 0 is the base model)")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--learning_rate", type=float, default=1e-4)
    group.add_argument("--lr_scheduler", default="constant",
                       choices=["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear",
                                "polynomial"])
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument("--lr_num_cycles", type=int, default=1, help="cosine_with_restarts: number of restarts")
    group.add_argument("--lr_power", type=float, default=1.0, help="polynomial: power")
    group.add_argument("--max_train_steps", type=int, default=None, help="optimiser steps (wins over epochs)")
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--skip_nan_steps", type=int, default=0,
                       help="drop up to N batches whose loss is NaN or infinite (default 0: the first one stops the run)")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="0 turns clipping off")
    group.add_argument("--use_8bit_adam", type=str2bool, nargs="?", const=True, default=False)
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=1e-2)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                       help="compute precision; trainable weights stay fp32")
    group.add_argument("--gradient_checkpointing", type=str2bool, nargs="?", const=True, default=False)
    group.add_argument("--snr_gamma", type=float, default=None, help="min-SNR weighting; 5.0 is the paper's value")
    group.add_argument("--noise_offset", type=float, default=0.0, help="e.g. 0.05-0.1: darker darks, brighter lights")
    group.add_argument("--masked_loss_normalize", type=str2bool, nargs="?", const=True, default=True,
                       help="divide the masked loss by the mask's mean (false: the plain product)")
    group.add_argument("--prior_loss_target", default=None, choices=["base_model", "dataset"],
                       help="regularisation batches learn the base model's own prediction (base_model; default for "
                            "adapters) or the class image (dataset: classic DreamBooth; the only choice for full)")
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the regularisation loss")

    group = parser.add_argument_group("scheduled sampling (rollouts): train on the model's own imperfect x_t")
    group.add_argument("--scheduled_sampling_max_step_offset", type=int, default=0,
                       help="K: a rolled-out sample starts k ~ U{1..K} timesteps higher (0 = off; 5-10 is typical)")
    group.add_argument("--scheduled_sampling_probability", type=float, default=1.0,
                       help="share of samples rolled out once the ramp is done")
    group.add_argument("--scheduled_sampling_ramp_steps", type=int, default=0,
                       help="the probability rises linearly from 0 over this many steps (0: full from the start)")
    group.add_argument("--scheduled_sampling_sampler", default="unipc", choices=list(ROLLOUT_SAMPLERS))
    group.add_argument("--scheduled_sampling_target", default="recomputed", choices=["recomputed", "original"],
                       help="recomputed: the target implies the true clean latent from the rolled-out x_t; "
                            "original: the clean trajectory's target")

    group = parser.add_argument_group("EMA: a moving average of the trained weights, saved beside them")
    group.add_argument("--use_ema", type=str2bool, nargs="?", const=True, default=False)
    group.add_argument("--ema_decay", type=float, default=0.999)
    group.add_argument("--ema_update_interval", type=int, default=1, help="update the average every N steps")
    group.add_argument("--ema_device", default="cpu", choices=["cpu", "accelerator"],
                       help="cpu: the average lives in system memory, not on the GPU")
    group.add_argument("--ema_warmup", type=str2bool, nargs="?", const=True, default=False,
                       help="decay min(ema_decay, (1+s)/(10+s)) after s updates: the average leaves the start fast")

    common.add_eval_args(parser)
    common.add_refiner_args(parser)
    parser.add_argument("--eval_steps_interval", type=int, default=0,
                        help="log the stable eval loss every N steps (eval datasets and/or --eval_split images)")

    group = parser.add_argument_group("checkpoints")
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")

    group = parser.add_argument_group("validation")
    group.add_argument("--validation_prompt", nargs="+", default=None)
    group.add_argument("--validation_steps", type=int, default=100)
    group.add_argument("--num_validation_images", type=int, default=2)
    group.add_argument("--validation_num_inference_steps", type=int, default=25)
    group.add_argument("--validation_guidance_scale", type=float, default=7.5)
    group.add_argument("--validation_negative_prompt", default=None)
    group.add_argument("--validation_resolution", type=int, default=None, help="default: the model's native size")
    group.add_argument("--validation_seed", type=int, default=0)
    group.add_argument("--validation_instance", default=None,
                       help="fills {instance} in validation prompts (e.g. \"ohwx dog\")")
    group.add_argument("--validation_class", default=None,
                       help="fills {class}, and replaces the instance in the text CLIP-T scores (e.g. \"dog\")")
    group.add_argument("--evaluation_type", default="none", choices=["none", "clip"],
                       help="clip: score validation images (CLIP-T, CLIP-I against the subject) into the log")
    group.add_argument("--clip_model", default="openai/clip-vit-base-patch32", help="for --evaluation_type clip")
    group.add_argument("--validation_preview", type=str2bool, nargs="?", const=True, default=False,
                       help="send in-progress pictures of validation images to the webhooks (Tiny AutoEncoder)")
    group.add_argument("--validation_preview_steps", type=int, default=5, help="a preview every N denoising steps")
    group.add_argument("--preview_vae", default=None,
                       help="Tiny AutoEncoder (default madebyollin/taesd; madebyollin/taesdxl for SDXL)")
    group.add_argument("--webhook_config", default=None,
                       help="JSON: raw and/or discord webhooks for start, checkpoints, validation images, previews, "
                            "the end and errors (see webhooks.py)")
    group.add_argument("--validation_ema", default=None, choices=["raw", "ema", "both"],
                       help="with --use_ema, which weights validation renders (default both, side by side)")
    return parser


def parse_args(argv=None):
    return common.parse_args_with_config(build_parser(), argv)


# ---------------------------------------------------------------------------------------------------------------------
# The run


def train(args, hooks):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    # cpu=True where there is no GPU: then `torchrun --nproc_per_node N` starts N CPU processes (gloo DDP).
    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    # LyCORIS module dropout skips whole modules in some steps: DDP must expect parameters without gradients.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=bool((args.lycoris or {}).get("module_dropout")))
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=on_cpu, kwargs_handlers=[ddp])
    say = accelerator.print
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # --- Data config and model configs: every input is checked before any weights are loaded.
    datasets = common.load_datasets(args)
    if accelerator.is_main_process:
        common.announce_pending_features(datasets)
    info = common.resolve_model(args)
    for dataset in datasets:
        dataset.resolution = dataset.resolution or info.native_resolution
    if accelerator.is_main_process:  # what a killed run left half-written (never trusted) goes first
        common.remove_stale_temporaries(args.output_dir)
    resume_path = resume_checkpoint_path(args) if args.resume_from_checkpoint else None
    seed = args.seed
    if seed is None:  # an unseeded run still resumes exactly: the seed it drew is stored in every checkpoint
        seed = common.read_json(os.path.join(resume_path, STATE_FILE))["seed"] if resume_path else random.randrange(2 ** 31)
        say(f"seed: {seed} (pass --seed to choose it)")
    set_seed(seed)
    plans = common.plan_datasets(datasets, common.crop_seed(args), print_fn=say)
    eval_entries = common.eval_sets(datasets, plans, args.eval_split)  # removes --eval_split images from training
    if not args.eval_steps_interval:
        eval_entries = []
    elif not eval_entries:
        raise SystemExit("--eval_steps_interval needs images to measure on: an eval dataset in the data config "
                         "(\"dataset_type\": \"eval\") or --eval_split N")
    say(f"model: {info.ref} ({info.family}, {info.prediction_type}); datasets: "
        + ", ".join(f"{d.id} ({len(plans[d.id])} images)" for d in datasets if d.id in plans))

    # --- Caches: the main process builds what is missing, the others wait and then read.
    train_datasets = [d for d in datasets if d.trains]
    text_dir = common.text_cache_dir(datasets, args)
    if accelerator.is_main_process:
        for dataset in train_datasets:
            plans[dataset.id], _ = common.build_vae_cache(plans[dataset.id], info, device, args.vae_batch_size)
        if eval_entries:
            eval_entries, _ = common.build_vae_cache(eval_entries, info, device, args.vae_batch_size)
        captions = [c for d in train_datasets for e in plans[d.id] for c in e.captions]
        captions += [e.captions[0] for e in eval_entries]
        common.build_text_cache(captions, info, text_dir, device)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:  # images that failed to decode on the main process have no cache: drop them
        for dataset in train_datasets:
            plans[dataset.id] = [e for e in plans[dataset.id] if os.path.isfile(e.cache_path)]
    text_identity = common.text_encoder_identity(info)
    text_embeds = {}
    for dataset in train_datasets:
        for entry in plans[dataset.id]:
            for caption in entry.captions:
                if caption not in text_embeds:
                    text_embeds[caption] = common.load_tensors(common.text_cache_path(text_dir, caption, text_identity))
    shift, scaling = common.latent_scaling(info)

    # --- Models. Frozen weights in the compute precision, trainable ones in fp32.
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    unet = common.load_component(info, "unet", weight_dtype if args.model_type == "lora" else torch.float32)
    common.quantize_model(unet, args.base_model_precision, weight_dtype)  # load -> quantise -> freeze -> adapter
    unet.to(device).requires_grad_(args.model_type == "full")
    lora_config = lycoris_config = None
    if args.model_type == "lora" and args.lora_type == "lycoris":
        lycoris_config = args.lycoris
        add_lycoris(unet, lycoris_config, args.lycoris_config).to(device)
        cast_training_params(unet, torch.float32)
    elif args.model_type == "lora":
        lora_config = add_lora(unet, args)
        cast_training_params(unet, torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    noise_scheduler = DDPMScheduler.from_pretrained(info.folder, subfolder="scheduler")
    vae = tokenizers = text_encoders = None
    if args.validation_prompt or args.model_type == "full":  # validation renders images; a full save needs them all
        # Low memory: with --offload_frozen they wait in system memory and visit the GPU only to render.
        frozen_device = "cpu" if args.offload_frozen else device
        vae = common.load_component(info, "vae").to(frozen_device)
        tokenizers, text_encoders = common.load_text_encoders(info, frozen_device, weight_dtype)

    params = list(trainable_parameters(unet).values())
    kind = "the whole UNet" if args.model_type == "full" else \
        f"LyCORIS {lycoris_config['algo']}" if lycoris_config else f"LoRA rank {args.lora_rank}"
    say(f"training {sum(p.numel() for p in params):,} parameters ({kind}; base weights: {args.base_model_precision})")
    if args.use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    # --- Batches and the length of the run.
    sampler = BatchSampler(datasets, plans, args.train_batch_size, seed, args.data_sampling)
    for note in oversubscription_notices(sampler):
        say(note)
    instance_count, prior_count, instance_share = epoch_mix(sampler)
    if prior_count:
        say(f"an epoch holds {instance_count} instance and {prior_count} regularisation samples; "
            f"{instance_share:.0%} of batches are instance batches (prior loss: {args.prior_loss_target} target, "
            f"weight {args.prior_loss_weight:g})")
        if instance_share < 0.5:
            fix = "raise the subject's repeats (or its probability)" if args.data_sampling == "auto" else \
                "raise the subject's probability (with --data_sampling uniform, repeats do not change the mix)"
            say(f"warning: only {instance_share:.0%} of batches show the subject; the usual advice is at least half "
                f"(e.g. 10 photos beside 1000 class images want repeats >= 100): {fix}")
    batches_per_epoch = sampler.batches_per_epoch()
    micro_per_epoch = math.ceil(batches_per_epoch / world)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / args.gradient_accumulation_steps))
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    # The lr schedule is stepped by hand once per optimiser step (not through accelerate, which steps it once
    # per process), so its length is simply max_train_steps.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_train_steps, num_cycles=args.lr_num_cycles, power=args.lr_power)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    unwrapped = accelerator.unwrap_model(unet)
    trainable = trainable_parameters(unwrapped)

    # EMA: a shadow copy of the trainable weights, kept by the main process (every process holds the same weights).
    ema = None
    if args.use_ema and accelerator.is_main_process:
        ema = EMA(trainable, args.ema_decay, args.ema_warmup, "cpu" if args.ema_device == "cpu" else device)
        say(f"EMA of the trained weights: decay {args.ema_decay}{' with warm-up' if args.ema_warmup else ''}, every "
            f"{args.ema_update_interval} step(s), kept on {args.ema_device}")
    if args.scheduled_sampling_max_step_offset:
        say(f"scheduled sampling: up to {args.scheduled_sampling_max_step_offset} {args.scheduled_sampling_sampler} "
            f"steps per rolled-out sample (extra forward passes), probability 0 -> "
            f"{args.scheduled_sampling_probability:g} over {args.scheduled_sampling_ramp_steps} steps, "
            f"{args.scheduled_sampling_target} target")

    # --evaluation_type clip: validation images are scored against their prompts and the subject's photos.
    scoring = None
    if args.evaluation_type == "clip" and args.validation_prompt and accelerator.is_main_process:
        scorer = common.Scorer(args.clip_model, device=device, allow_pickle=args.allow_pickle)
        subject = next(d for d in datasets if d.trains and not d.is_regularisation_data)
        scoring = scorer, scorer.clip_images([common.load_image(e.path) for e in plans[subject.id]])

    # An SDXL refiner cannot draw from a prompt: its validation refines subject images (their captions as prompts).
    sources = None
    if info.family == "sdxl-refiner":
        say(f"SDXL refiner: text encoder 2 only, timesteps 0-{common.timestep_range(info, args) - 1} "
            f"(--refiner_training_strength {args.refiner_training_strength:g}), aesthetic score "
            f"{args.data_aesthetic_score:g}")
        if args.validation_prompt and accelerator.is_main_process:
            say(f"warning: a refiner refines images, so --validation_prompt is ignored: validation refines "
                f"{args.num_validation_images} subject image(s) at strength {args.refiner_training_strength:g}")
            subject = next(d for d in datasets if d.trains and not d.is_regularisation_data)
            sources = common.refine_sources(plans[subject.id], args.num_validation_images, args.validation_seed)

    # --validation_preview: a Tiny AutoEncoder turns in-progress latents into pictures for the webhooks.
    preview_vae = None
    if args.validation_preview and accelerator.is_main_process:
        from diffusers import AutoencoderTiny

        reference = args.preview_vae or PREVIEW_VAES[info.family]
        try:
            weights = common.safe_weights(reference, args.allow_pickle)
            preview_vae = AutoencoderTiny.from_pretrained(reference, **weights).to(device).eval()
        except (OSError, ValueError) as err:
            raise SystemExit(f"--preview_vae {reference}: cannot load a Tiny AutoEncoder there ({err}); pass a local "
                             "folder or a hub id (madebyollin/taesd, madebyollin/taesdxl)") from None

    def save_adapters(folder, step):
        """The adapter file(s) in `folder`: the raw weights, and with --use_ema the average beside them."""
        path = save_adapter(args, info, datasets, unwrapped, lora_config, lycoris_config, step, folder)
        if ema is not None:
            with ema.applied(trainable):
                save_adapter(args, info, datasets, unwrapped, lora_config, lycoris_config, step, folder, EMA_SUFFIX,
                             {"weights": "ema", "ema_decay": str(args.ema_decay), "ema_updates": str(ema.updates)})
        return path

    first_step, skipped_nan = 0, 0
    if resume_path:
        state = load_checkpoint(resume_path, accelerator, unet, optimizer, lr_scheduler, ema)
        first_step, skipped_nan = state["step"], state.get("skipped_nan_batches", 0)
        for key in ("train_batch_size", "gradient_accumulation_steps", "num_processes"):
            current = accelerator.num_processes if key == "num_processes" else getattr(args, key)
            if state.get(key) != current:
                say(f"warning: {key} was {state.get(key)} in {resume_path}, now {current}: the data order will differ "
                    "from an uninterrupted run")
        for _ in range(state["batches_drawn"]):  # replay the batch stream up to the checkpoint
            sampler.next()
        say(f"resumed from {resume_path} at step {first_step}")

    log = JsonlLog(os.path.join(args.output_dir, "logs"), first_step if resume_path else None) \
        if accelerator.is_main_process else None
    eval_examples = common.eval_examples(eval_entries, info, text_dir, common.refiner_conditioning(info, args)) \
        if accelerator.is_main_process else []

    def evaluate_loss():
        """The stable eval loss of the current weights (and of the EMA): common.stable_eval_loss, the function
        evaluate.py runs, so the numbers agree."""
        def loss():
            return common.stable_eval_loss(unwrapped, noise_scheduler, info.prediction_type, eval_examples,
                                           args.eval_timesteps, args.eval_seed, accelerator.autocast,
                                           common.timestep_range(info, args))
        raw = loss()
        record = {"eval_loss": raw["mean"], "eval_loss_per_timestep": raw["per_timestep"]}
        if ema is not None:
            with ema.applied(trainable):
                record["eval_loss/ema"] = loss()["mean"]
        return record

    if eval_examples and first_step == 0:  # the starting point, for the curve
        log.log(0, evaluate_loss())
    say(f"{max_train_steps} steps: batch {args.train_batch_size} x accumulation {args.gradient_accumulation_steps} x "
        f"{world} process(es); {steps_per_epoch} steps per epoch")
    if hooks is not None:
        hooks.send("training_started", f"training {kind} on {info.ref}: steps {first_step} to {max_train_steps}",
                   step=first_step, max_train_steps=max_train_steps)
    bar = tqdm(total=max_train_steps, initial=first_step, desc="training", unit="step",
               disable=not accelerator.is_main_process)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    timestep_high = common.timestep_range(info, args)  # the refiner trains on its low-noise end only
    aesthetic_score = common.refiner_conditioning(info, args)

    # --- The training loop: one optimiser step per iteration.
    for step in range(first_step, max_train_steps):
        started = time.perf_counter()
        loss_sum = 0.0
        # For the log: instance loss, instance batches, prior loss, prior batches, rollout forward passes.
        sums = torch.zeros(5)
        for micro in range(args.gradient_accumulation_steps):
            # Every process replays the whole batch stream and takes its own share of it.
            batch_index = (step * args.gradient_accumulation_steps + micro) * world + rank
            batch = [sampler.next() for _ in range(world)][rank]
            generator = batch_generator(seed, batch_index)

            # Inputs from the caches: a latent drawn from the cached VAE distribution, the caption's embeddings.
            latents, masks = [], []
            for entry, _ in batch:
                cached = common.load_tensors(entry.cache_path)
                latents.append(cached["mean"] + cached["std"] * torch.randn(cached["mean"].shape, generator=generator))
                masks.append(cached.get("mask"))
            latents = (torch.stack(latents) - shift) * scaling
            # Masked loss: the mask was cropped with its image and averaged onto the latent grid when cached.
            masks = torch.stack(masks).to(device) if masks[0] is not None else None
            prompt_embeds = torch.stack([text_embeds[caption]["prompt_embeds"] for _, caption in batch])
            added_cond = None
            if info.family.startswith("sdxl"):  # micro-conditioning: pooled text + sizes and crop (+ aesthetics)
                added_cond = {
                    "text_embeds": torch.stack([text_embeds[c]["pooled_prompt_embeds"] for _, c in batch]).to(device),
                    "time_ids": torch.stack([common.sdxl_time_ids(e.transform, aesthetic_score)
                                             for e, _ in batch]).to(device),
                }

            # Noise and timesteps (uniform over the schedule).
            noise = torch.randn(latents.shape, generator=generator)
            if args.noise_offset:  # a per-channel constant shift teaches the model to move the mean brightness
                noise = noise + args.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
            timesteps = torch.randint(0, timestep_high, (latents.shape[0],), generator=generator)
            latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

            # Scheduled sampling (rollouts): with the ramped probability, a sample's x_t is the model's own k-step
            # rollout from t+k (current weights, no gradient) instead of the forward process's. The recomputed
            # target is the noise that this x_t implies for the true clean latent: the model learns to steer its
            # own drift back rather than to expect perfect inputs.
            if args.scheduled_sampling_max_step_offset:
                chosen = torch.rand(len(batch), generator=generator) < rollout_probability(args, step)
                offsets = torch.randint(1, args.scheduled_sampling_max_step_offset + 1, (len(batch),),
                                        generator=generator)
                rolled = []
                unwrapped.eval()  # sampling, as at inference: no dropout
                for i in chosen.nonzero().flatten().tolist():
                    k = min(int(offsets[i]), num_timesteps - 1 - int(timesteps[i]))  # capped at the last timestep
                    if k == 0:
                        continue
                    cond = {key: value[i:i + 1] for key, value in added_cond.items()} if added_cond else None
                    sampler_i = rollout_sampler(args.scheduled_sampling_sampler, noise_scheduler.config, device)
                    with accelerator.autocast():
                        noisy_latents[i] = rollout(unwrapped, sampler_i, latents[i:i + 1], noise[i:i + 1],
                                                   int(timesteps[i]) + k, k, prompt_embeds[i:i + 1].to(device), cond,
                                                   weight_dtype)[0]
                    rolled.append(i)
                    sums[4] += k
                unwrapped.train()
                if rolled and args.scheduled_sampling_target == "recomputed":
                    noise[rolled] = implied_noise(noise_scheduler, latents[rolled], noisy_latents[rolled],
                                                  timesteps[rolled])

            if info.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            model_inputs = (noisy_latents.to(weight_dtype), timesteps, prompt_embeds.to(device, weight_dtype))

            # Prior preservation: a batch comes from one dataset, so it is all instance or all regularisation.
            # With the base_model target, a regularisation batch learns the frozen base model's own prediction on
            # the same noisy latent, timestep and caption (adapter switched off, no gradient).
            is_prior = batch[0][0].is_regularisation
            if is_prior and args.prior_loss_target == "base_model":
                with torch.no_grad(), adapter_disabled(unwrapped), accelerator.autocast():
                    target = unwrapped(*model_inputs, added_cond_kwargs=added_cond).sample

            # Forward and loss. Gradients are synchronised across processes on the last micro-step only.
            last_micro = micro == args.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(unet):
                with accelerator.autocast():
                    pred = unet(*model_inputs, added_cond_kwargs=added_cond).sample
                loss_per_sample = masked_mse(pred, target, masks, args.masked_loss_normalize)

                # Min-SNR weighting: each sample weighted by its own timestep's SNR.
                if args.snr_gamma:
                    loss_per_sample = loss_per_sample * min_snr_weights(noise_scheduler, timesteps, args.snr_gamma,
                                                                        info.prediction_type)
                unweighted = loss_per_sample.mean()
                loss = unweighted * (args.prior_loss_weight if is_prior else 1.0)
                accelerator.backward(loss / args.gradient_accumulation_steps)
            loss_sum += loss.detach() / args.gradient_accumulation_steps
            sums[:4] += torch.tensor([0, 0, unweighted.item(), 1] if is_prior else [unweighted.item(), 1, 0, 0])

        common.fault_point("backward")

        # A NaN or infinite loss (any process's) means this batch's gradients are poisoned: the update is not
        # applied. Up to --skip_nan_steps such batches are dropped (the step still counts, so the data order and
        # the schedule stay those of the run); one more stops the run, the weights untouched by it and the last
        # checkpoint on disk intact.
        mean_loss = accelerator.reduce(loss_sum.reshape(1), reduction="mean").item()
        done = step + 1
        if not math.isfinite(mean_loss):
            optimizer.zero_grad(set_to_none=True)
            skipped_nan += 1
            if skipped_nan > args.skip_nan_steps:
                latest = list_checkpoints(args.output_dir)
                raise SystemExit(
                    f"loss became {mean_loss} at step {done}; stopping"
                    + (f" ({skipped_nan - 1} bad batches skipped before)" if args.skip_nan_steps else "")
                    + f". Last good checkpoint: {latest[-1] if latest else 'none'}. Try a lower --learning_rate, "
                    "--mixed_precision no, or --skip_nan_steps N to drop up to N bad batches.")
            say(f"\nloss became {mean_loss} at step {done}: batch skipped ({skipped_nan} of at most "
                f"{args.skip_nan_steps})")
            with warnings.catch_warnings():  # a scheduler step with no optimiser step yet is what we mean here
                warnings.simplefilter("ignore", UserWarning)
                lr_scheduler.step()
        else:
            # Clip, step.
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()

        # EMA: fold the new weights into the moving average every --ema_update_interval steps.
        ema_decay = None
        if ema is not None and done % args.ema_update_interval == 0:
            ema_decay = ema.update(trainable)

        # Stable eval loss every --eval_steps_interval steps, and at the end (main process).
        evaluation = {}
        if eval_examples and (done % args.eval_steps_interval == 0 or done == max_train_steps):
            evaluation = evaluate_loss()

        # Log.
        sums = accelerator.reduce(sums.to(device), reduction="sum").cpu()
        step_time = time.perf_counter() - started
        if log is not None:
            record = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "step_time": step_time,
                      "epoch": sampler.drawn / batches_per_epoch}
            if sums[1]:
                record["loss/instance"] = (sums[0] / sums[1]).item()
            if sums[3]:  # before --prior_loss_weight
                record["loss/prior"] = (sums[2] / sums[3]).item()
            if args.scheduled_sampling_max_step_offset:  # extra UNet passes (per sample) spent on rollouts
                record["rollout_forwards"] = int(sums[4])
                record["rollout_probability"] = rollout_probability(args, step)
            if ema_decay is not None:
                record["ema_decay"] = ema_decay
            if skipped_nan:
                record["skipped_nan_batches"] = skipped_nan
            record.update(evaluation)
            log.log(done, record)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        bar.update(1)
        common.fault_point("step")

        # Checkpoint every --checkpointing_steps (not at the very end: the final save follows).
        if args.checkpointing_steps and done % args.checkpointing_steps == 0 and done < max_train_steps:
            path = save_checkpoint(accelerator, args, unet, optimizer, lr_scheduler, done, sampler, seed, ema,
                                   save_adapters if args.model_type == "lora" else None, skipped_nan)
            say(f"\nsaved {path}")
            if hooks is not None:
                hooks.send("checkpoint_saved", f"checkpoint at step {done}: {path}", step=done, path=path)

        # Validation images every --validation_steps.
        if args.validation_prompt and done % args.validation_steps == 0:
            if accelerator.is_main_process:
                scores = run_validation(args, info, accelerator, unet, vae, tokenizers, text_encoders, done, ema,
                                        scoring, hooks, preview_vae, sources)
                if scores:
                    log.log(done, scores)
            accelerator.wait_for_everyone()
    bar.close()

    # --- Final save.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.model_type == "lora":
            path = save_adapters(args.output_dir, max_train_steps)
        else:
            path = args.output_dir
            vae, text_encoders = vae.to(torch.float32), [e.to(torch.float32) for e in text_encoders]
            save_full_pipeline(info, unwrapped.to(torch.float32), vae, tokenizers, text_encoders, args.output_dir)
            if ema is not None:  # the average beside the raw weights, loadable the same way
                with ema.applied(trainable):
                    save_full_pipeline(info, unwrapped, vae, tokenizers, text_encoders,
                                       os.path.join(args.output_dir, EMA_SUFFIX[1:]))
        if args.validation_prompt and max_train_steps % args.validation_steps != 0:
            scores = run_validation(args, info, accelerator, unet, vae, tokenizers, text_encoders, max_train_steps,
                                    ema, scoring, hooks, preview_vae, sources)
            if scores:
                log.log(max_train_steps, scores)
        log.close()
        say(f"saved {path}")
        if hooks is not None:
            hooks.send("training_finished", f"finished {max_train_steps} steps; saved {path}", step=max_train_steps,
                       path=path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        # Shut the process group down while Python runs normally: left to the interpreter's exit, freeing the DDP
        # reducer joins gloo's worker threads while holding the GIL one of them waits for (an exit that hangs).
        torch.distributed.destroy_process_group()
    return {"output_dir": args.output_dir, "unet": unwrapped, "steps": max_train_steps, "seed": seed, "ema": ema}


def main(argv=None):
    """Check the flags, then train. Webhooks (main process only) hear of the start, checkpoints, validation
    images, the end, and any error that stops the run, with its message."""
    from accelerate.state import AcceleratorState, GradientState

    args = parse_args(argv)
    check_args(args)
    hooks = webhooks.load_webhooks(args.webhook_config) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        return train(args, hooks)
    except BaseException as err:
        if hooks is not None:
            text = str(err) if isinstance(err, SystemExit) else f"{type(err).__name__}: {err}"
            hooks.send("error", f"training stopped: {text}")
        raise
    finally:
        if hooks is not None:
            hooks.close(timeout=15)  # bounded: a hanging server does not hold the run's exit for long
        # accelerate keeps its settings in process-wide state; clear them so main() can run again in this process
        # (notebooks, tests) with another --mixed_precision.
        AcceleratorState._reset_state()
        GradientState._reset_state()


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A worker of a multi-process launch, its work written and its process group shut down: skip the
        # interpreter's teardown, where gloo's threads can (rarely, seen on CPU) deadlock a worker that never exits.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
