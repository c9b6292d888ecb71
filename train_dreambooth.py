"""DreamBooth training: a LoRA, a LyCORIS network or a full fine-tune of a text-to-image model (SD 1.x / 2.x, SDXL
and its refiner, SD3, FLUX.1, DeepFloyd IF stage I and II: common/families/) on one subject.

    python train_dreambooth.py --config config.json
    accelerate launch train_dreambooth.py --config config.json          # several GPUs (DDP)
    python train_dreambooth.py --pretrained_model_name_or_path MODEL --instance_data_dir subject/ \\
        --instance_prompt "a photo of ohwx dog" --output_dir output/ --max_train_steps 800

Reads the base model (diffusers folder, hub id or single file), the data config and the caches (VAE latents and
text embeddings; missing or stale ones are built first, exactly as cache_latents.py does). Writes to --output_dir:
    pytorch_lora_weights.safetensors      the LoRA (diffusers format: pipe.load_lora_weights(output_dir));
                                          --output_name NAME names it NAME.safetensors
    model_index.json, unet/, ...          instead, with --model_type full: a complete diffusers pipeline
    pytorch_lora_weights_ema.safetensors  with --use_ema: the averaged weights (ema/ for a full fine-tune)
    checkpoint-STEP/                      resumable state every --checkpointing_steps
    validation/step-STEP/                 validation images (one PNG each, plus grid.png)
    logs/train_log.jsonl                  one JSON line per step (loss, lr, time)
    logs/dreambooth/                      the same and the validation grids for TensorBoard (--report_to)
    README.md, args.json                  the model card; every flag, to repeat the run (--config args.json)

Reading order: the training maths (the batch stream, the masked loss, DOP's captions, rollouts, EMA); the training
step (training_loss: the batch's loss, in which masks, prior preservation, DOP, rollouts and the weights are each one
commented block); validation; then train(): a few named set-up steps and the loop, one optimiser step per iteration.
The set-up steps follow train(); the flags come last. What a family does differently (its text encoders, its
denoiser's call, its objective's defaults) lives in common/families/, what an objective does (timesteps, targets,
min-SNR, the rollout step) in common/objectives.py; loading, caches, adapters and checkpoints in common/
(common/__init__.py lists what is where).
"""

import argparse
import contextlib
import functools
import importlib.util
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from common import (adapters, caches, cards, checkpoints, data, families, files, flags, hub, images, models,
                    objectives, optimisers, quantise, render, scores, webhooks)

ROLLOUT_SAMPLERS = ("unipc", "euler", "ddim", "dpm")  # models.SAMPLERS that step deterministically
STEP_TOTALS = ("instance_loss", "instance_batches", "prior_loss", "prior_batches", "dop_loss", "dop_batches",
               "rollout_forwards")  # for the log


# ---------------------------------------------------------------------------------------------------------------------
# The training maths


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

    def oversubscribed(self):
        """A notice for each bucket with fewer images (times repeats + 1) than the batch size."""
        return [f"notice: bucket {width}x{height} of dataset {dataset.id!r} holds {len(members)} image(s), fewer than "
                f"the batch size {self.batch_size}: its batches repeat images (oversubscribed) rather than dropping them"
                for dataset in self.datasets for (width, height), members in self.buckets(dataset).items()
                if len(members) * (dataset.repeats + 1) < self.batch_size]

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
        """The next batch: [(ImageEntry, the caption drawn for it)], all of one dataset and one bucket."""
        dataset = self.rng.choices(self.datasets, weights=self.weights)[0]
        if not self.queues[dataset.id]:
            self.queues[dataset.id] = self.epoch_batches(dataset)
            self.epochs[dataset.id] += 1
        batch = self.queues[dataset.id].pop()
        self.drawn += 1
        return [(entry, self.rng.choice(entry.captions)) for entry in batch]


def batch_generator(seed, batch_index):
    """A fresh generator per batch of the stream: noise, timesteps and latent samples depend only on the seed and
    the batch's place in the stream, so a resumed run draws what the uninterrupted run drew, and N processes with
    one micro-batch each draw what one process accumulating N micro-batches draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + batch_index) % (2 ** 63))


def batch_captions(batch, generator, dropout=0.0):
    """The batch's captions; with caption dropout each is the empty caption with probability `dropout`, drawn from
    the batch's own stream."""
    captions = [caption for _, caption in batch]
    if not dropout:
        return captions
    dropped = torch.rand(len(batch), generator=generator) < dropout
    return ["" if drop else caption for caption, drop in zip(captions, dropped.tolist())]


def sample_latents(batch, generator, info):
    """A batch's latents, each drawn from its image's cached VAE distribution (mean + std * N(0, 1), as
    vae.encode().latent_dist.sample() would; IF's cache holds the picture itself), in the UNet's scale; and their
    masks (B, 1, h, w), or None."""
    latents, masks = [], []
    for entry, _ in batch:
        cached = files.load_tensors(entry.cache_path)
        noise = torch.randn(cached["mean"].shape, generator=generator)
        latents.append(cached["mean"] + cached["std"] * noise if "std" in cached else cached["mean"])  # IF: pixels
        masks.append(cached.get("mask"))
    return info.normalise(torch.stack(latents)), torch.stack(masks) if masks[0] is not None else None


def masked_mse(pred, target, mask=None, normalize=True):
    """Per-sample mean squared error. With a mask (B, 1, h, w; 1 = train, 0 = ignore, between = partial weight)
    each element's error is weighted by the mask; `normalize` divides by the mask's mean, so the loss is the mean
    error over the masked area and a small subject does not shrink the learning rate:
        mean(m * e^2) / mean(m) = sum(m * e^2) / sum(m), the mask-weighted mean of e^2."""
    error = (pred.float() - target.float()) ** 2
    if mask is None:
        return error.mean(dim=(1, 2, 3))
    loss = (error * mask).mean(dim=(1, 2, 3))
    if normalize:
        loss = loss / mask.mean(dim=(1, 2, 3)).clamp(min=1e-8)  # an all-black mask stays 0, not 0/0
    return loss


def dop_caption(args, caption):
    """Differential output preservation's caption: `caption` with --dop_trigger replaced by --dop_class, or None where
    DOP is off or the caption does not name the trigger (then there is nothing to preserve for it)."""
    if args.dop_class is None or args.dop_trigger not in caption:
        return None
    return caption.replace(args.dop_trigger, args.dop_class)


def extra_captions(args, datasets, plans, say):
    """Captions trained without being any image's: caption dropout's empty caption and DOP's class captions."""
    extra = [""] if args.caption_dropout_probability else []
    if args.dop_class is not None:
        captions = {c for d in datasets if not d.is_regularisation_data for e in plans[d.id] for c in e.captions}
        named = sorted(c for c in captions if dop_caption(args, c))
        if not named:
            raise SystemExit(f"--dop_trigger {args.dop_trigger!r} is in none of the instance captions (e.g. "
                             f"{min(captions)!r}); give it as the captions write it (e.g. \"ohwx dog\")")
        say(f"differential output preservation: {len(named)} of {len(captions)} instance caption(s) name "
            f"{args.dop_trigger!r}; with it replaced ({dop_caption(args, named[0])!r}) they keep the base model's "
            f"prediction (weight {args.dop_weight:g})")
        extra += [dop_caption(args, c) for c in named]
    return extra


def rollout_probability(args, step):
    """Scheduled sampling's probability at optimiser step `step` (0-based): 0 at step 0, rising linearly to
    --scheduled_sampling_probability at --scheduled_sampling_ramp_steps, then constant. Early on the model's
    rollouts are noise; they are phased in as the model learns, never phased out."""
    if not args.scheduled_sampling_ramp_steps:
        return args.scheduled_sampling_probability
    return args.scheduled_sampling_probability * min(1.0, step / args.scheduled_sampling_ramp_steps)


@dataclass
class Noised:
    """A batch on its way into the denoiser: the clean latents x0, the noise, the timesteps (flow: noise levels)
    and the noisy latents x_t."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor


def rollout_batch(run, step, x, cond, generator):
    """Scheduled sampling for a batch (`x`: Noised), in place: each sample chosen with rollout_probability(step) gets
    as its x_t the model's own k-step rollout from t + k (k ~ U{1..K}; current weights, eval mode, no gradient; a
    diffusers sampler for a UNet, the flow's Euler step for SD3 / FLUX) and, with the recomputed target, the noise
    that this x_t implies for its true clean latent: the model learns to steer its own drift back rather than to
    expect perfect inputs. Returns the extra forward passes spent."""
    args, objective, model = run.args, run.objective, run.unwrapped
    chosen = torch.rand(len(x.latents), generator=generator) < rollout_probability(args, step)
    offsets = torch.randint(1, args.scheduled_sampling_max_step_offset + 1, (len(x.latents),), generator=generator)
    rolled, forwards = [], 0
    model.eval()  # sampling, as at inference: no dropout
    for i in chosen.nonzero().flatten().tolist():
        k = objective.rollout_steps(x.timesteps[i], int(offsets[i]))
        if k == 0:
            continue
        own = families.map_conditioning(lambda tensor: tensor[i:i + 1], cond)

        def own_prediction(latent, t):
            return run.info.predict(model, latent.to(run.dtype), t, own)

        with run.accelerator.autocast():
            x.noisy[i] = objective.rollout(own_prediction, x.latents[i:i + 1], x.noise[i:i + 1], x.timesteps[i], k,
                                           args.scheduled_sampling_sampler)[0]
        rolled.append(i)
        forwards += k
    model.train()
    if rolled and args.scheduled_sampling_target == "recomputed":
        x.noise[rolled] = objective.implied_noise(x.latents[rolled], x.noisy[rolled], x.timesteps[rolled])
    return forwards


class EMA:
    """An exponential moving average of the trainable parameters, kept in fp32 on `device` (the CPU by default:
    system memory, not VRAM). Each update: shadow = d * shadow + (1 - d) * param, with d = --ema_decay, or with
    warm-up d = min(ema_decay, (1 + s) / (10 + s)) where s counts the updates made before (the num_updates
    schedule of TensorFlow's ExponentialMovingAverage: early averages forget the random start quickly)."""

    def __init__(self, parameters, decay, warmup, device):
        self.decay, self.warmup = decay, warmup
        self.shadow = {name: p.detach().to(device, torch.float32, copy=True) for name, p in parameters.items()}
        self.updates = 0

    def decay_at(self, s):
        return min(self.decay, (1 + s) / (10 + s)) if self.warmup else self.decay

    def start_share(self):
        """How much of the starting (untrained) weights the average still holds: the product of the decays used."""
        return math.prod(self.decay_at(s) for s in range(self.updates))

    @torch.no_grad()
    def update(self, parameters):
        """Fold the current weights in; returns the decay used."""
        decay = self.decay_at(self.updates)
        for name, param in parameters.items():
            shadow = self.shadow[name]
            shadow.lerp_(param.detach().to(shadow.device, torch.float32), 1 - decay)  # shadow += (1-d)(param-shadow)
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


# ---------------------------------------------------------------------------------------------------------------------
# The training step


@dataclass
class Run:
    """What the training step and the rounds around it read, set up once by train(): the run's flags, the base model
    (`info`, its family), the trained model as prepared (`model`: DDP syncs its gradients) and itself (`unwrapped`:
    passes without gradients, saving, the EMA) with its trainable weights, its objective (objectives.py), the
    captions' embeddings as training reads them (`embed`) and as the frozen encoders cached them (`cached`)."""

    args: argparse.Namespace
    info: families.Family
    accelerator: object
    model: torch.nn.Module
    unwrapped: torch.nn.Module
    trainable: dict
    objective: object
    embed: adapters.TextReader  # embed(captions): their embeddings as training reads them
    cached: dict
    dtype: torch.dtype  # the compute dtype (--mixed_precision)
    datasets: list
    frozen: tuple = None  # (VAE, tokenizers, text encoders), where validation or the saved pipeline needs them
    ema: EMA = None
    sharded: bool = False  # FSDP: a forward pass needs every process

    @property
    def device(self):
        return self.accelerator.device


def training_loss(run, batches, generator, step):
    """The loss of this process's batch of the stream (`batches`: every process's, one each), drawn from the batch's
    own `generator`, at optimiser step `step`. Each feature is one block. Returns (the loss to backpropagate, what
    the log counts: {"kind": "instance" | "prior", "loss": the batch's loss before its weight, "dop": the DOP rows'
    losses, "rollout_forwards": extra forward passes})."""
    args, info, objective, device, dtype = run.args, run.info, run.objective, run.device, run.dtype
    batch = batches[run.accelerator.process_index]

    # Inputs: a latent drawn from its image's cached VAE distribution, its mask (masked loss: cut with its image,
    # averaged onto the latent grid), the caption's embeddings (cached; --train_text_encoder: read now by the trained
    # encoders) and what the family's conditioning adds (pooled text, time ids, guidance).
    latents, masks = sample_latents(batch, generator, info)
    captions = batch_captions(batch, generator, args.caption_dropout_probability)
    texts, transforms = run.embed(captions), [entry.transform for entry, _ in batch]

    # Noise and timesteps (objectives.py: DDPM timesteps uniform over the schedule, or flow-matching noise levels by
    # the weighting scheme and shift), x_t, and what the family makes from the clean picture (IF stage II: the
    # picture shrunk, enlarged back and noised, which it reads beside x_t).
    noise, timesteps = objective.draw(latents, generator)
    picture = info.picture_conditioning(latents, generator)
    cond = info.on_device(info.conditioning(texts, transforms, picture), device, dtype)
    x = Noised(latents.to(device), noise.to(device), timesteps.to(device), None)
    masks = masks.to(device) if masks is not None else None
    x.noisy = objective.add_noise(x.latents, x.noise, x.timesteps)

    # Scheduled sampling (rollouts): with the ramped probability, a sample's x_t is the model's own k-step rollout
    # from t + k instead, and (recomputed target) its noise the one that x_t implies for x0.
    forwards = rollout_batch(run, step, x, cond, generator) if args.scheduled_sampling_max_step_offset else 0
    target = objective.target(x.latents, x.noise, x.timesteps)  # eps, v, or the flow's velocity eps - x0
    noisy, timesteps = x.noisy.to(dtype), x.timesteps

    # Prior preservation: a batch comes from one dataset, so it is all instance or all regularisation. A
    # regularisation batch's loss is weighted by --prior_loss_weight (below); with the base_model target it learns
    # the frozen base model's prediction on the same x_t, timestep and caption (adapter off, cached text).
    is_prior = batch[0][0].is_regularisation
    # A sharded model's forward pass needs every process: all run it when any process has a prior batch.
    if args.prior_loss_target == "base_model" and (is_prior or run.sharded and any(
            other[0][0].is_regularisation for other in batches)):
        base_cond = info.on_device(info.conditioning([run.cached[c] for c in captions], transforms, picture),
                                   device, dtype) if args.train_text_encoder else cond
        with torch.no_grad(), adapters.adapter_disabled(run.unwrapped), run.accelerator.autocast():
            base = info.predict(run.unwrapped, noisy, timesteps, base_cond)
        target = base if is_prior else target

    # Differential output preservation (--dop_class): for each instance caption naming --dop_trigger, a row with the
    # same x_t and timestep and the class caption, whose target is the base model's prediction for it (adapter off,
    # the cached text); one forward pass then serves both. Its rows count at --dop_weight, unmasked.
    rows = [] if is_prior else [(i, dop_caption(args, c)) for i, c in enumerate(captions) if dop_caption(args, c)]
    if rows:
        index, class_captions = [i for i, _ in rows], [c for _, c in rows]
        dop_cond = info.on_device(info.conditioning([run.cached[c] for c in class_captions],
                                                    [transforms[i] for i in index],
                                                    {k: v[index] for k, v in picture.items()}), device, dtype)
        with torch.no_grad(), adapters.adapter_disabled(run.unwrapped), run.accelerator.autocast():
            preserved = info.predict(run.unwrapped, noisy[index], timesteps[index], dop_cond)
        cond = info.on_device(info.conditioning(texts + run.embed(class_captions),
                                                transforms + [transforms[i] for i in index],
                                                {k: torch.cat([v, v[index]]) for k, v in picture.items()}),
                              device, dtype)
        noisy, timesteps = torch.cat([noisy, noisy[index]]), torch.cat([timesteps, timesteps[index]])
        target = torch.cat([target, preserved.to(target.dtype)])
        masks = torch.cat([masks, torch.ones_like(masks[index])]) if masks is not None else None

    # Forward and loss. Per sample: the mean squared error over its mask (masked loss; over the whole latent
    # without one), times the objective's weight for its timestep (min-SNR; a flow weighting scheme); then the
    # batch's weight (--prior_loss_weight for a regularisation batch) and DOP's.
    with run.accelerator.autocast():
        pred = info.predict(run.model, noisy, timesteps, cond)
    loss_per_sample = masked_mse(pred, target, masks, args.masked_loss_normalize)
    weights = objective.loss_weights(timesteps)
    if weights is not None:
        loss_per_sample = loss_per_sample * weights
    unweighted, dop_losses = loss_per_sample[:len(batch)].mean(), loss_per_sample[len(batch):]
    loss = unweighted * (args.prior_loss_weight if is_prior else 1.0) + (
        args.dop_weight * dop_losses.mean() if rows else 0)
    return loss, {"kind": "prior" if is_prior else "instance", "loss": unweighted, "dop": dop_losses,
                  "rollout_forwards": forwards}


def count_losses(totals, parts):
    """Add a micro-batch's parts (training_loss) to the step's totals for the log: its loss before its weight, and
    DOP's term (before --dop_weight) when it has one."""
    totals[f"{parts['kind']}_loss"] += parts["loss"].item()
    totals[f"{parts['kind']}_batches"] += 1
    if len(parts["dop"]):
        totals["dop_loss"] += parts["dop"].mean().item()
        totals["dop_batches"] += 1
    totals["rollout_forwards"] += parts["rollout_forwards"]


def step_record(args, totals, record, ema_decay=None, skipped_nan=0, rollout_share=None):
    """One line of train_log.jsonl (without its step): `record` (loss, lr, time, epoch) with the loss's parts, and
    what the run's options add (rollouts, the EMA's decay, skipped batches)."""
    if totals["instance_batches"]:
        record["loss/instance"] = totals["instance_loss"] / totals["instance_batches"]
    if totals["prior_batches"]:  # before --prior_loss_weight
        record["loss/prior"] = totals["prior_loss"] / totals["prior_batches"]
    if totals["dop_batches"]:  # before --dop_weight
        record["loss/dop"] = totals["dop_loss"] / totals["dop_batches"]
    if args.scheduled_sampling_max_step_offset:  # extra UNet passes (per sample) spent on rollouts
        record["rollout_forwards"] = int(totals["rollout_forwards"])
        record["rollout_probability"] = rollout_share
    if ema_decay is not None:
        record["ema_decay"] = ema_decay
    if skipped_nan:
        record["skipped_nan_batches"] = skipped_nan
    return record


def eval_loss_values(run, measure):
    """The log's stable eval loss (`measure`: a scores.StableEvalLoss, the measure evaluate.py takes): eval_loss and
    eval_loss_per_timestep of the raw weights, eval_loss/ema of the average. Captions are read as training reads
    them (trained text encoders: now)."""
    embed = run.embed if run.args.train_text_encoder else None
    raw = measure(run.unwrapped, embed)
    record = {"eval_loss": raw["mean"], "eval_loss_per_timestep": raw["per_timestep"]}
    if run.ema is not None:
        with run.ema.applied(run.trainable):
            record["eval_loss/ema"] = measure(run.unwrapped, embed)["mean"]
    return record


# ---------------------------------------------------------------------------------------------------------------------
# Validation


class Validator:
    """Validation rounds, for the main process: every --validation_prompt at fixed seeds (the same seeds at every
    step, so images are comparable) into validation/step-STEP/ with a grid (a row per prompt, a column per seed).
    With an EMA, --validation_ema picks the raw weights, the EMA weights, or both side by side;
    --validation_lora_scales draws each of those at each adapter strength. With --evaluation_type clip the images
    are scored against their prompts and the subject's pictures. Webhooks get each prompt's images, and with
    --validation_preview previews while they are drawn. A model that draws from pictures (a refiner, IF stage II)
    refines (enlarges) subject pictures instead, their captions as prompts; its rows start with each source. What
    it needs (the CLIP scorer, the sources, the preview TAESD) is loaded once, here."""

    def __init__(self, run, hooks, datasets, plans):
        args, info, device = run.args, run.info, run.device
        self.run, self.hooks, self.scoring, self.sources, self.preview_vae = run, hooks, None, None, None
        if args.evaluation_type == "clip":  # validation images scored against their prompts and the subject's photos
            scorer = scores.Scorer(args.clip_model, device=device, allow_pickle=args.allow_pickle)
            subject = data.subject_dataset(datasets)
            self.scoring = scorer, scorer.clip_images([images.load_image(e.path) for e in plans[subject.id]])
        if info.draws_from_pictures:
            self.sources = render.refine_sources(info, plans[data.subject_dataset(datasets).id],
                                                 args.num_validation_images, args.validation_seed)
            run.accelerator.print(f"warning: --validation_prompt is ignored: {info.sources_note(len(self.sources))}")
        if args.validation_preview and info.preview_vae:  # a Tiny AutoEncoder turns in-progress latents into pictures
            self.preview_vae = render.load_preview_vae(args.preview_vae or info.preview_vae, args.allow_pickle, device)

    def __call__(self, step, log):
        """A round at `step`, its scores and grid into the log."""
        values = self.round(step)
        if values:
            log.log(step, values)
        log.log_image(step, "validation", os.path.join(self.run.args.output_dir, "validation", f"step-{step}",
                                                       "grid.png"))

    def round(self, step):
        """Draw, save and score a round. Returns {"validation/clip_t": ...} (with "/ema", "/scale0.5" variants)
        with --evaluation_type clip, else {}."""
        args, run, sources = self.run.args, self.run, self.sources
        model, (vae, tokenizers, text_encoders) = run.unwrapped, run.frozen
        for part in filter(None, (vae, *text_encoders)):  # no-op unless --offload_frozen left them in system memory
            part.to(run.device)
        pipe = models.build_pipeline(run.info, model, vae, tokenizers, text_encoders)
        pipe.set_progress_bar_config(disable=True)
        sizes = [None] if sources else render.picture_sizes(run.info, args.validation_resolution)  # sources': theirs
        # Prompts may hold {instance} / {class}; CLIP-T scores against the class in place of the instance.
        instance = args.validation_instance or ""
        prompts = [scores.fill_prompt(text, instance, args.validation_class or instance)
                   for text in ([caption for caption, _ in sources] if sources else args.validation_prompt)]
        weights = {"raw": ["raw"], "ema": ["ema"], "both": ["raw", "ema"]}[args.validation_ema if run.ema else "raw"]
        variants = [(w, scale) for w in weights for scale in args.validation_lora_scales or [None]]  # None: as trained
        was_training = model.training
        model.eval()  # no LoRA dropout while sampling
        rows, results, labels = [[] for _ in prompts], {}, []
        for variant, scale in variants:
            tag = ("/ema" if variant == "ema" else "") + ("" if scale is None else f"/scale{scale:g}")
            name = {"raw": "raw", "ema": "EMA"}[variant]
            label = name if scale is None else f"LoRA x{scale:g}" if weights == ["raw"] else f"{name} LoRA x{scale:g}"
            averaged = run.ema.applied(run.trainable) if variant == "ema" else contextlib.nullcontext()
            made = [[] for _ in prompts]  # this variant's pictures, every size
            with averaged, adapters.adapter_scaled(model, scale):
                for size in sizes:  # several sizes: each file and grid group named by its size
                    for p, pictures in enumerate(self.draw(pipe, step, [g for g, _ in prompts], (variant, scale),
                                                           size if len(sizes) > 1 else None, size)):
                        rows[p] += pictures
                        made[p] += pictures
                    shown = (label if len(variants) > 1 or sources else "",
                             render.size_label(size) if len(sizes) > 1 else "")
                    labels.append(" ".join(part for part in shown if part))
            if self.scoring is not None:
                scorer, real_clip = self.scoring
                values = scorer.scores([image for row in made for image in row],
                                       [prompts[p][1] for p, row in enumerate(made) for _ in row], real_clip)
                results.update({f"validation/{k}{tag}": v for k, v in values.items()})
        labels = labels if any(labels) else []
        cell = (max(w for w, _ in sizes), max(h for _, h in sizes)) if len(sizes) > 1 else None
        drawn = [generate for generate, _ in prompts]
        grid = render.prompt_grid(rows, drawn, sources, ["source", *labels] if sources else labels, cell=cell)
        folder = os.path.join(args.output_dir, "validation", f"step-{step}")
        files.save_image_atomic(grid, os.path.join(folder, "grid.png"))
        files.write_text_atomic("\n".join(drawn) + "\n", os.path.join(folder, "prompts.txt"))
        model.train(was_training)
        if args.offload_frozen:  # text encoders read every step (--train_text_encoder) stay
            for part in filter(None, (vae, *([] if args.train_text_encoder else text_encoders))):
                part.to("cpu")
        return results

    def draw(self, pipe, step, drawn, variant, named_size, size):
        """Every prompt's pictures of one variant ((weights, adapter scale)) at one size, each saved
        (prompt00-seed0_ema_scale0.5-64x64.png: `named_size` names the size where a round draws several) and sent
        to the webhooks."""
        args, info, (weights, scale) = self.run.args, self.run.info, variant
        tag = ("/ema" if weights == "ema" else "") + ("" if scale is None else f"/scale{scale:g}")
        suffix, sized = tag.replace("/", "_"), f"-{render.size_label(named_size)}" if named_size else ""
        folder = os.path.join(args.output_dir, "validation", f"step-{step}")
        plan = render.Round(args.num_validation_images, args.validation_seed,
                            render.drawing_options(info, args.validation_num_inference_steps,
                                                   validation_guidance(args, info), args.validation_negative_prompt,
                                                   size),
                            self.run.accelerator.autocast,
                            f"validation images (step {step}{tag}{sized.replace('-', ' ')})")
        made = render.render(pipe, drawn, plan, self.sources,
                             lambda p, seed: os.path.join(folder, f"prompt{p:02d}-seed{seed}{suffix}{sized}.png"),
                             self.previews(step, drawn, size))
        for p, pictures in enumerate(made):
            if self.hooks is not None:
                self.hooks.send("validation_image", drawn[p] + (" (EMA weights)" if weights == "ema" else "") +
                                ("" if scale is None else f" (LoRA x{scale:g})") + sized.replace("-", " at "),
                                step=step, images=pictures, prompt=drawn[p], weights=weights, lora_scale=scale)
        return made

    def previews(self, step, drawn, size):
        """preview_for(prompt index, seed) for render: --validation_preview's callbacks (None without it)."""
        args, info = self.run.args, self.run.info
        if not (args.validation_preview and self.hooks is not None):
            return None
        latent_size = size and (size[1] // info.vae_scale_factor, size[0] // info.vae_scale_factor)  # FLUX: unpack
        previews = render.Previews(self.hooks, self.preview_vae, args.validation_preview_steps,
                                   lambda latents: info.preview_latents(latents, latent_size),
                                   args.validation_num_inference_steps)
        return lambda p, seed: previews.callback(step, drawn[p], seed)


# ---------------------------------------------------------------------------------------------------------------------
# The run


def train(args, hooks):
    """Set-up in named steps (each defined below), the training loop, the final save."""
    accelerator = start_accelerator(args)
    say, device = accelerator.print, accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    datasets, info, plans, eval_entries, seed, resume_path = plan_data(args, accelerator)
    text_embeds, eval_examples = build_caches(args, accelerator, info, datasets, plans, eval_entries)
    denoiser, objective, weight_dtype = load_model(args, info, device, say)
    frozen, embed = load_frozen_parts(args, info, accelerator, weight_dtype, denoiser, text_embeds)
    optimizer = optimisers.make(args, adapters.trainable_parameters(denoiser))
    sampler, batches_per_epoch, max_train_steps, lr_scheduler = plan_steps(args, datasets, plans, seed, accelerator,
                                                                           optimizer)
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)  # the trained forward (DDP syncs its gradients)
    unwrapped = accelerator.unwrap_model(denoiser)  # the model itself: passes without gradients, saving, the EMA
    trainable = adapters.trainable_parameters(unwrapped)
    ema = make_ema(args, accelerator, trainable, device, say)
    run = Run(args, info, accelerator, denoiser, unwrapped, trainable, objective, embed, text_embeds, weight_dtype,
              datasets, frozen, ema, checkpoints.is_sharded(accelerator))
    state = checkpoints.TrainingState(denoiser, optimizer, lr_scheduler, sampler, seed, run_shape(args), run.ema)
    validate = Validator(run, hooks, datasets, plans) if args.validation_prompt and accelerator.is_main_process \
        else None
    first_step = checkpoints.resume(accelerator, state, resume_path)
    log = open_log(args, accelerator, first_step if resume_path else None, seed)
    eval_loss = scores.StableEvalLoss(info, objective, eval_examples, args.eval_timesteps, args.eval_seed,
                                      accelerator.autocast) if eval_examples else None
    if eval_loss is not None and first_step == 0:  # the start of the curve
        log.log(0, eval_loss_values(run, eval_loss))
    webhooks.notify(hooks, "training_started", f"training {describe(args)} on {info.ref}: steps {first_step} to "
                    f"{max_train_steps}", step=first_step, max_train_steps=max_train_steps)
    bar = tqdm(total=max_train_steps, initial=first_step, desc="training", unit="step", disable=rank > 0)

    # --- The training loop: one optimiser step per iteration.
    for step in range(first_step, max_train_steps):
        started = time.perf_counter()
        loss_sum, totals = 0.0, dict.fromkeys(STEP_TOTALS, 0.0)
        for micro in range(args.gradient_accumulation_steps):
            # Every process replays the whole batch stream and takes its own share of it. The batch's loss:
            # training_loss, where masks, prior preservation, DOP, rollouts and the weights each have their block.
            # Gradients are synchronised across processes on the last micro-step only.
            batch_index = (step * args.gradient_accumulation_steps + micro) * world + rank
            batches = [sampler.next() for _ in range(world)]
            last_micro = micro == args.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last_micro else accelerator.no_sync(denoiser):
                loss, parts = training_loss(run, batches, batch_generator(seed, batch_index), step)
                accelerator.backward(loss / args.gradient_accumulation_steps)
            loss_sum += loss.detach() / args.gradient_accumulation_steps
            count_losses(totals, parts)
        files.fault_point("backward")

        # The update, unless a loss (any process's) is NaN or infinite: then this batch's gradients are poisoned
        # and dropped, up to --skip_nan_steps times over the run; once more stops it (the weights untouched).
        mean_loss = accelerator.reduce(loss_sum.reshape(1), reduction="mean").item()
        done = step + 1
        if math.isfinite(mean_loss):
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(list(trainable.values()), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step()
        else:
            checkpoints.drop_poisoned_batch(state, mean_loss, done, args.skip_nan_steps, args.output_dir, say)

        # EMA: fold the new weights into the moving average every --ema_update_interval steps.
        ema_decay = run.ema.update(trainable) if run.ema is not None and done % args.ema_update_interval == 0 \
            else None

        # Log, with the stable eval loss every --eval_steps_interval steps and at the end.
        evaluation = eval_loss_values(run, eval_loss) if eval_loss is not None and (
            done % args.eval_steps_interval == 0 or done == max_train_steps) else {}
        totals = dict(zip(STEP_TOTALS, accelerator.reduce(torch.tensor(list(totals.values()), device=device)).tolist()))
        if log is not None:
            record = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0],
                      "step_time": time.perf_counter() - started, "epoch": sampler.drawn / batches_per_epoch}
            log.log(done, {**step_record(args, totals, record, ema_decay, state.skipped_nan,
                                         rollout_probability(args, step)), **evaluation})
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        bar.update(1)
        files.fault_point("step")

        # Checkpoint every --checkpointing_steps (not at the very end: the final save follows).
        if args.checkpointing_steps and done % args.checkpointing_steps == 0 and done < max_train_steps:
            path = checkpoints.save_checkpoint(accelerator, state, done, args.output_dir, args.checkpoints_total_limit,
                                               functools.partial(save_outputs, run)
                                               if args.model_type == "lora" else None)
            say(f"\nsaved {path}")
            webhooks.notify(hooks, "checkpoint_saved", f"checkpoint at step {done}: {path}", step=done, path=path)

        # Validation images every --validation_steps.
        if args.validation_prompt and done % args.validation_steps == 0:
            if accelerator.is_main_process:
                validate(done, log)
            accelerator.wait_for_everyone()
    bar.close()

    save_final(run, validate, log, hooks, max_train_steps)
    # "unet": the trained UNet or transformer (its diffusers name in pipelines that have a UNet)
    return {"output_dir": args.output_dir, "unet": unwrapped, "steps": max_train_steps, "seed": seed, "ema": run.ema}


# ---------------------------------------------------------------------------------------------------------------------
# The set-up steps and the end of the run, in the order train() calls them


def start_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # cpu=True where there is no GPU: then `torchrun --nproc_per_node N` starts N CPU processes (gloo DDP).
    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    if torch.cuda.is_available():  # cuDNN attention's backward fails on FLUX's shapes (seen with torch 2.11 on an
        torch.backends.cuda.enable_cudnn_sdp(False)  # H200: "mha_graph.execute(...).is_good()"); flash attention runs
    # LyCORIS module dropout skips whole modules in some steps: DDP must expect parameters without gradients.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=bool((args.lycoris or {}).get("module_dropout")))
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=on_cpu, kwargs_handlers=[ddp],
                              log_with=checkpoints.tracker_names(args.report_to),
                              project_dir=os.path.join(args.output_dir, "logs"))
    return checkpoints.check_sharding(accelerator, args)


def open_log(args, accelerator, resumed_at, seed):
    """The main process's log: logs/train_log.jsonl, and the --report_to trackers with the run's flags."""
    if not accelerator.is_main_process:
        return None
    config = cards.run_args(args, seed, flags.option_names(build_parser()))
    return checkpoints.JsonlLog(os.path.join(args.output_dir, "logs"), resumed_at, accelerator, config)


def plan_data(args, accelerator):
    """The data config, the model's configs and every image's plan (headers only: no weights load before every
    input is checked), the seed, the eval-loss images and the checkpoint to resume from."""
    from accelerate.utils import set_seed

    say = accelerator.print
    if args.with_prior_preservation:
        with accelerator.main_process_first():  # the main process makes any missing class images; the rest read them
            if accelerator.is_main_process:
                data.make_class_images(args, say)
    datasets, info, plans = data.prepare(args, print_fn=say)
    if args.validation_prompt and (args.evaluation_type == "clip" or info.draws_from_pictures):
        data.subject_dataset(datasets)  # scored against, or refined: a run without subject pictures stops here
    if accelerator.is_main_process:
        data.announce_pending_features(datasets)
        files.remove_stale_temporaries(args.output_dir)  # what a killed run left half-written is never trusted
    resume_path = checkpoints.resume_checkpoint_path(args) if args.resume_from_checkpoint else None
    seed = args.seed
    if seed is None:  # an unseeded run still resumes exactly: the seed it drew is stored in every checkpoint
        seed = files.read_json(os.path.join(resume_path, checkpoints.STATE_FILE))["seed"] if resume_path \
            else random.randrange(2 ** 31)
        say(f"seed: {seed} (pass --seed to choose it)")
    set_seed(seed)
    eval_entries = data.eval_sets(datasets, plans, args.eval_split)  # removes --eval_split images from training
    if not args.eval_steps_interval:
        eval_entries = []
    elif not eval_entries:
        raise SystemExit("--eval_steps_interval needs images to measure on: an eval dataset in the data config "
                         "(\"dataset_type\": \"eval\") or --eval_split N")
    say(f"model: {info.ref} ({info.family}, {info.prediction_type}); datasets: "
        + ", ".join(f"{d.id} ({len(plans[d.id])} images)" for d in datasets if d.id in plans))
    objectives.settle_flags(info, args)
    info.refuse_flags(args, build_parser().get_default)
    if args.validation_prompt:  # a size or step count its pipeline cannot draw: refused now, not at validation
        sizes = [None] if info.draws_from_pictures else render.picture_sizes(info, args.validation_resolution)
        render.drawing_options(info, args.validation_num_inference_steps, 1.0, args.validation_negative_prompt,
                               sizes[0])
    for note in info.notes(validation_guidance(args, info)):  # a refiner's strength, FLUX.1-dev's guidance
        say(note)
    if accelerator.is_main_process:  # every flag checked: the run as settled, to repeat it
        cards.write_run_args(args, args.output_dir, seed, flags.option_names(build_parser()))
    return datasets, info, plans, eval_entries, seed, resume_path


def build_caches(args, accelerator, info, datasets, plans, eval_entries):
    """Missing or stale caches, built by the main process while the others wait (images that fail to decode are
    dropped from the plans); then every caption's embeddings, and the eval loss's examples (main process)."""
    train_datasets = [d for d in datasets if d.trains]
    text_dir = data.text_cache_dir(datasets, args)
    empty = extra_captions(args, train_datasets, plans, say=accelerator.print)
    if accelerator.is_main_process:
        for dataset in train_datasets:
            plans[dataset.id], _ = caches.build_vae_cache(plans[dataset.id], info, accelerator.device,
                                                          args.vae_batch_size)
        if eval_entries:
            eval_entries, _ = caches.build_vae_cache(eval_entries, info, accelerator.device, args.vae_batch_size)
        captions = [c for d in train_datasets for e in plans[d.id] for c in e.captions]
        caches.build_text_cache(captions + empty + [e.captions[0] for e in eval_entries], info, text_dir,
                                accelerator.device)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:  # images that failed to decode on the main process have no cache: drop them
        for dataset in train_datasets:
            plans[dataset.id] = [e for e in plans[dataset.id] if os.path.isfile(e.cache_path)]
    text_embeds = caches.load_text_embeddings([c for d in train_datasets for e in plans[d.id] for c in e.captions]
                                              + empty, info, text_dir)
    eval_examples = scores.eval_examples(eval_entries, info, text_dir, args.eval_seed) \
        if accelerator.is_main_process and eval_entries else []
    return text_embeds, eval_examples


def load_model(args, info, device, say):
    """The UNet or transformer, frozen in the compute precision (quantised with --base_model_precision) with an
    fp32 adapter on top, or whole in fp32 for a full fine-tune; and its objective (objectives.py)."""
    from diffusers.training_utils import cast_training_params

    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    denoiser = models.load_component(info, info.denoiser, weight_dtype if args.model_type == "lora" else torch.float32)
    quantise.quantize_model(denoiser, args.base_model_precision, weight_dtype)  # load -> quantise -> freeze -> adapter
    denoiser.to(device).requires_grad_(args.model_type == "full")
    if args.model_type == "lora":
        if args.lora_type == "lycoris":
            adapters.add_lycoris(denoiser, args.lycoris, args.lycoris_config).to(device)
        else:
            adapters.add_lora(denoiser, adapters.LoraSettings.from_args(args), adapters.lora_targets(
                info, denoiser, args.lora_target, args.lora_layers),
                f"--lora_layers {args.lora_layers}" if args.lora_layers else f"--lora_target {args.lora_target}")
        cast_training_params(denoiser, torch.float32)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    count = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    objective = objectives.for_model(info, args)
    say(f"training {count:,} parameters ({describe(args)}; base weights: {args.base_model_precision}); "
        f"{objective.describe()}")
    return denoiser, objective, weight_dtype


def validation_guidance(args, info):
    """--validation_guidance_scale, or the family's usual value (FLUX.1-dev: 3.5, its embedded guidance)."""
    return info.guidance_scale if args.validation_guidance_scale is None else args.validation_guidance_scale


def describe(args):
    adapter = f"LyCORIS {args.lycoris['algo']}" if args.lora_type == "lycoris" else \
        f"{'DoRA' if args.use_dora else 'LoRA'} rank {args.lora_rank}"
    return "the whole UNet" if args.model_type == "full" else adapter


def load_frozen_parts(args, info, accelerator, weight_dtype, denoiser, text_embeds):
    """(VAE, tokenizers, text encoders) where validation renders images, a full fine-tune saves a whole pipeline or
    --train_text_encoder puts a LoRA on the encoders (then held by the UNet too, in fp32); else None. With
    --offload_frozen they wait in system memory and visit the GPU only to render (trained encoders stay). And the
    adapters.TextReader that reads captions as training reads them (from the cache, or through the trained encoders)."""
    from diffusers.training_utils import cast_training_params

    if not (args.validation_prompt or args.model_type == "full" or args.train_text_encoder):
        return None, adapters.TextReader(info, text_embeds)
    # A trained text encoder runs every step, and so do the frozen ones beside it (SD3's T5): they never wait in
    # system memory.
    frozen_device = "cpu" if args.offload_frozen else accelerator.device
    encoder_device = accelerator.device if args.train_text_encoder else frozen_device
    vae = models.load_vae(info, frozen_device)
    tokenizers, text_encoders = models.load_text_encoders(info, encoder_device, weight_dtype)
    frozen = vae, tokenizers, text_encoders
    if not args.train_text_encoder:
        return frozen, adapters.TextReader(info, text_embeds)
    adapters.add_text_encoder_lora(denoiser, info, text_encoders, adapters.LoraSettings.from_args(args),
                                   accelerator.device, args.gradient_checkpointing)
    cast_training_params(denoiser, torch.float32)
    return frozen, adapters.TextReader(info, text_embeds, (tokenizers, text_encoders), accelerator.autocast)


def plan_steps(args, datasets, plans, seed, accelerator, optimizer):
    """The batch stream, the length of the run and its lr schedule, each said."""
    from diffusers.optimization import get_scheduler

    say, world = accelerator.print, accelerator.num_processes
    sampler = BatchSampler(datasets, plans, args.train_batch_size, seed, args.data_sampling)
    for note in sampler.oversubscribed():
        say(note)
    data.report_mix(args, sampler.datasets, sampler.weights, sampler.plans, say)
    batches_per_epoch = sampler.batches_per_epoch()
    steps_per_epoch = max(1, math.ceil(math.ceil(batches_per_epoch / world) / args.gradient_accumulation_steps))
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    if max_train_steps < 100 and not args.max_train_steps:
        say(f"warning: {max_train_steps} steps ({args.num_train_epochs} epoch(s) of {steps_per_epoch} steps) is too "
            "few to learn a subject; DreamBooth runs take about 100 steps per photo: set --max_train_steps (e.g. 800)")
    # Stepped by hand once per optimiser step (accelerate would step it once per process): its length is the run's.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_train_steps, num_cycles=args.lr_num_cycles, power=args.lr_power)
    say(f"{max_train_steps} steps: batch {args.train_batch_size} x accumulation {args.gradient_accumulation_steps} x "
        f"{world} process(es); {steps_per_epoch} steps per epoch")
    if args.scheduled_sampling_max_step_offset:
        say(f"scheduled sampling: up to {args.scheduled_sampling_max_step_offset} {args.scheduled_sampling_sampler} "
            f"steps per rolled-out sample (extra forward passes), probability 0 -> "
            f"{args.scheduled_sampling_probability:g} over {args.scheduled_sampling_ramp_steps} steps, "
            f"{args.scheduled_sampling_target} target")
    return sampler, batches_per_epoch, max_train_steps, lr_scheduler


def make_ema(args, accelerator, trainable, device, say):
    """With --use_ema, a shadow copy of the trainable weights, kept by the main process (all hold the same)."""
    if not (args.use_ema and accelerator.is_main_process):
        return None
    say(f"EMA of the trained weights: decay {args.ema_decay}{' with warm-up' if args.ema_warmup else ''}, every "
        f"{args.ema_update_interval} step(s), kept on {args.ema_device}")
    return EMA(trainable, args.ema_decay, args.ema_warmup, "cpu" if args.ema_device == "cpu" else device)


def run_shape(args):
    """What a checkpoint records of the run's shape, so a resume with another one is noticed."""
    return {"train_batch_size": args.train_batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "model_type": args.model_type, "ema_warmup": args.ema_warmup}


def save_outputs(run, folder, step, card_only=False):
    """The adapter file(s) in `folder` (a checkpoint or the output): the raw weights and, with --use_ema, the average
    beside them (with how much of the untrained start it still holds); a checkpoint's model card. The output
    folder's card follows the last validation round, so the run's end writes it alone (card_only, for a full
    fine-tune's pipeline too). Returns the adapter's path."""
    args = run.args
    if card_only:
        return write_card(run, folder, step)
    path = write_adapter(run, folder, step)
    if folder != args.output_dir:
        write_card(run, folder, step)
    if run.ema is not None:
        metadata = {"weights": "ema", "ema_decay": str(args.ema_decay), "ema_updates": str(run.ema.updates),
                    "ema_start_share": f"{run.ema.start_share():.6f}"}
        with run.ema.applied(run.trainable):
            write_adapter(run, folder, step, adapters.EMA_SUFFIX, metadata)
    return path


def write_adapter(run, folder, step, suffix="", metadata=None):
    """One adapter file in `folder` with what its metadata says of the run (cards.run_metadata), and its kohya layout
    where asked (--lora_format comfyui; LyCORIS: always, where one exists). `suffix` names a variant ("_ema")."""
    args, info = run.args, run.info
    name, kohya_name = adapters.weight_names(args.output_name, suffix)
    path = os.path.join(folder, name)
    metadata = {**cards.run_metadata(args, info, run.datasets, step, name[:-len(".safetensors")]), **(metadata or {})}
    lora = {"lora_rank": str(args.lora_rank), "lora_alpha": str(args.lora_alpha or args.lora_rank),
            "lora_target": args.lora_layers or args.lora_target}  # the LoRA's own file says how it was made
    kohya = args.lora_format == "comfyui" or args.lora_type == "lycoris"
    written = adapters.save_adapter(run.unwrapped, info, (path, os.path.join(folder, kohya_name) if kohya else None),
                                    metadata, lora, args.lycoris)
    if args.lora_type == "lycoris" and not written and info.kohya_layout and not suffix and folder == args.output_dir:
        print(f"note: no {kohya_name}: these LyCORIS modules have no kohya form (only LyCORIS's loader reads them)")
    return path


def write_card(run, folder, step):
    """The model card (cards.write_model_card) of the adapter or pipeline in `folder`, naming its kohya file if any."""
    name, kohya = adapters.weight_names(run.args.output_name)
    cards.write_model_card(run.args, run.info, run.datasets, folder, step,
                           (name, kohya if os.path.isfile(os.path.join(folder, kohya)) else None))


def save_final(run, validate, log, hooks, steps):
    """The trained adapter (or a full fine-tune's whole pipeline, and its EMA as ema/), a last validation round if
    the last step had none, and the end of the log."""
    args, accelerator, model, ema = run.args, run.accelerator, run.unwrapped, run.ema
    accelerator.wait_for_everyone()
    with checkpoints.whole_weights(accelerator, model, run.trainable):  # under FSDP, gathered from the shards
        if accelerator.is_main_process and args.model_type == "lora":
            path = save_outputs(run, args.output_dir, steps)
        elif accelerator.is_main_process:
            path = args.output_dir
            checkpoints.save_full_model(run.info, model, run.frozen, path, ema, run.trainable)
    if accelerator.is_main_process:
        if args.validation_prompt and steps % args.validation_steps != 0:
            validate(steps, log)
        save_outputs(run, args.output_dir, steps, card_only=True)  # the model card, with the last validation grid
        log.close()
        accelerator.print(f"saved {path}")
        if ema is not None:  # what is left of the untrained start in the exported average
            accelerator.print(f"the EMA weights hold {ema.start_share():.1%} of the starting weights after "
                              f"{ema.updates} updates (decay {args.ema_decay}{', warm-up' if args.ema_warmup else ''})")
        if hooks is not None:
            hooks.send("training_finished", f"finished {steps} steps; saved {path}", step=steps, path=path)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # the trackers' files closed: what goes up is complete
    if args.push_to_hub and accelerator.is_main_process:
        hub.push_folder(args.output_dir, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo,
                        say=accelerator.print)
    if torch.distributed.is_initialized():
        # Shut the process group down while Python runs normally: left to the interpreter's exit, freeing the DDP
        # reducer joins gloo's worker threads while holding the GIL one of them waits for (an exit that hangs).
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Flags


def check_args(args):
    """Refuse impossible settings before any model work."""
    args.mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if args.mixed_precision not in ("no", "bf16", "fp16"):
        raise SystemExit(f"accelerate's config asks for mixed precision {args.mixed_precision}; this trainer takes "
                         "no, bf16 or fp16: pass --mixed_precision")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise SystemExit("--mixed_precision fp16 needs a CUDA GPU; on this machine use bf16 or no")
    if args.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise SystemExit("--mixed_precision bf16: this GPU has no bf16 support; use fp16")
    optimisers.check_args(args)
    check_output_args(args)
    if not 0 <= args.caption_dropout_probability <= 1:
        raise SystemExit(f"--caption_dropout_probability {args.caption_dropout_probability:g}: a probability, 0 to 1")
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
    if args.use_dora and (args.model_type == "full" or args.lora_type == "lycoris" or args.lora_format == "comfyui"):
        raise SystemExit("--use_dora is peft's DoRA on the standard LoRA (--model_type lora --lora_type lora); LyCORIS "
                         "takes \"dora_wd\": true in its config; and the kohya (ComfyUI) layout has no DoRA form that "
                         "diffusers and ComfyUI read alike (diffusers drops dora_scale, ComfyUI normalises by the base "
                         "weight alone): use --lora_format diffusers")
    if (args.dop_class is None) != (args.dop_trigger is None) or "" in (args.dop_class, args.dop_trigger) or (
            args.dop_class is not None and args.model_type == "full"):
        raise SystemExit("differential output preservation needs --dop_class and --dop_trigger together, neither "
                         "empty (e.g. \"dog\" and \"ohwx dog\"), and an adapter to switch off for the base model's "
                         "prediction (--model_type lora)")
    if args.train_text_encoder and (args.model_type == "full" or args.lora_type == "lycoris"):
        raise SystemExit("--train_text_encoder puts a peft LoRA on the text encoders beside the UNet's, saved for "
                         "load_lora_weights: use it with --model_type lora --lora_type standard (a full fine-tune "
                         "saves whole models; a LyCORIS network covers the UNet alone)")
    if args.text_encoder_lr is not None and not args.train_text_encoder:
        raise SystemExit("--text_encoder_lr is the trained text encoders' learning rate: add --train_text_encoder")
    if args.lora_type == "lycoris" and not args.lycoris_config:
        raise SystemExit("--lora_type lycoris needs --lycoris_config FILE.json (e.g. {\"algo\": \"lokr\", "
                         "\"linear_dim\": 10000, \"linear_alpha\": 1, \"factor\": 16})")
    args.lycoris = adapters.read_lycoris_config(args.lycoris_config) if args.lora_type == "lycoris" else None
    quantise.check_precision(args.base_model_precision, "--base_model_precision")
    quantise.check_text_encoder_precisions(args)
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
        files.safe_weights(args.clip_model, args.allow_pickle)
    if args.validation_preview and args.preview_vae:
        files.safe_weights(args.preview_vae, args.allow_pickle)
    if not 0 < args.refiner_training_strength <= 1:
        raise SystemExit("--refiner_training_strength must lie in (0, 1] (the share of the schedule, e.g. 0.2)")
    if args.validation_preview_steps < 1:
        raise SystemExit("--validation_preview_steps must be 1 or more")
    for placeholder, flag in (("{instance}", "validation_instance"), ("{class}", "validation_class")):
        if any(placeholder in p for p in args.validation_prompt or []) and not getattr(args, flag):
            raise SystemExit(f"a --validation_prompt uses {placeholder}: pass --{flag} (e.g. \"ohwx dog\" / \"dog\")")
    if args.validation_lora_scales and args.model_type == "full":
        raise SystemExit("--validation_lora_scales scales an adapter; a full fine-tune has none")
    if args.validation_ema != "raw" and not args.use_ema:
        raise SystemExit(f"--validation_ema {args.validation_ema} renders the EMA weights: add --use_ema")


def check_output_args(args):
    """The output's name (--output_name), --lora_format (and diffusers' --output_kohya_format for it), the trackers
(--report_to), the hub (--push_to_hub), and diffusers' prior-preservation flags (--with_prior_preservation)."""
    if args.output_kohya_format:
        args.lora_format = "comfyui"
    if args.output_name is not None and (not args.output_name.strip() or os.path.basename(args.output_name) !=
                                         args.output_name or args.output_name.endswith(".safetensors")):
        raise SystemExit(f"--output_name {args.output_name!r}: a file name without folder or .safetensors, e.g. "
                         "ohwx_dog")
    if args.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise SystemExit("--report_to wandb needs the wandb package: pip install wandb (WANDB_MODE=offline logs "
                         "without a network), or use --report_to tensorboard")
    if args.push_to_hub and not args.hub_model_id:
        raise SystemExit("--push_to_hub needs --hub_model_id, the repository to create or update (e.g. you/ohwx-dog)")
    if args.push_to_hub:
        hub.check_push(args.hub_model_id, args.hub_token)  # the id's form and a token, before hours of training
    if args.with_prior_preservation and not (args.class_data_dir and args.class_prompt and args.num_class_images > 0):
        raise SystemExit("--with_prior_preservation needs --class_data_dir DIR, --class_prompt TEXT (e.g. \"a photo "
                         "of a dog\") and --num_class_images N (at least 1)")
    if not args.with_prior_preservation and (args.class_data_dir or args.class_prompt):
        raise SystemExit("--class_data_dir and --class_prompt describe the regularisation images: add "
                         "--with_prior_preservation (or list the folder in the data config with "
                         "\"is_regularisation_data\": true)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=flags.HelpFormatter)
    flags.add_model_args(parser)
    flags.add_data_args(parser)
    parser.add_argument("--train_batch_size", type=int, default=1, help="images per step and process")
    parser.add_argument("--data_sampling", default="auto", choices=["auto", "uniform"],
                        help="auto: datasets drawn by probability x images x (repeats+1); uniform: by probability")

    group = parser.add_argument_group("what to train")
    group.add_argument("--model_type", default="lora", choices=["lora", "full"],
                       help="lora: an adapter on the frozen model; full: every weight of the UNet or transformer")
    group.add_argument("--lora_type", default="standard", choices=["standard", "lycoris"],
                       help="standard: peft LoRA (--lora_* flags); lycoris: LyCORIS, configured by --lycoris_config")
    group.add_argument("--lycoris_config", default=None, help="LyCORIS config JSON (algo, dims, factor, apply_preset)")
    group.add_argument("--lora_format", default="diffusers", choices=["diffusers", "comfyui"],
                       help="comfyui: also write the kohya key layout (pytorch_lora_weights_comfyui.safetensors)")
    flags.add_bool(group, "--output_kohya_format", help="the same as --lora_format comfyui (diffusers' name)")
    group.add_argument("--base_model_precision", default="no_change", choices=quantise.PRECISIONS,
                       help="quantise the frozen UNet (LoRA/LyCORIS only); int8-quanto is the recommended one")
    flags.add_bool(group, "--offload_frozen",
                   help="keep the VAE and text encoders in system memory between validations (GPU memory)")
    group.add_argument("--lora_rank", "--rank", type=int, default=16, help="the LoRA's rank (its size)")
    group.add_argument("--lora_alpha", type=float, default=None, help="default: the rank (scale 1.0)")
    group.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA's input while training")
    group.add_argument("--lora_target", default="attention", choices=adapters.LORA_PRESETS,
                       help="which layers get the LoRA (each family's file in common/families/ lists its modules)")
    group.add_argument("--lora_layers", default=None,
                       help="explicit module names for the LoRA, comma-separated (e.g. \"attn.to_q,attn.to_k\"; "
                            "peft matches them as name suffixes); replaces --lora_target")
    flags.add_bool(group, "--use_dora",
                   help="DoRA (peft): a learned magnitude per output beside the LoRA's direction; saved for "
                        "load_lora_weights")
    group.add_argument("--lora_init", default="gaussian", choices=["gaussian", "default"],
                       help="init of the A matrices (B starts at zero either way, so step 0 is the base model)")
    flags.add_bool(group, "--train_text_encoder",
                   help="a LoRA (the --lora_* settings) on the CLIP text encoder(s) too, as in the DreamBooth paper: "
                        "the identifier's embedding learns the subject; captions are encoded every step (T5 stays "
                        "frozen)")
    group.add_argument("--text_encoder_lr", type=float, default=None,
                       help="learning rate of the text encoders' LoRA (default: --learning_rate)")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--learning_rate", type=float, default=1e-4, help="peak learning rate (see --optimizer)")
    group.add_argument("--lr_scheduler", default="constant",
                       choices=["constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear",
                                "polynomial"], help="the learning rate's course over the run")
    group.add_argument("--lr_warmup_steps", type=int, default=0, help="steps of linear rise from 0 to the lr")
    group.add_argument("--lr_num_cycles", type=int, default=1, help="cosine_with_restarts: number of restarts")
    group.add_argument("--lr_power", type=float, default=1.0, help="polynomial: power")
    group.add_argument("--max_train_steps", type=int, default=None, help="optimiser steps (wins over epochs)")
    group.add_argument("--num_train_epochs", type=int, default=1, help="passes over the data (if no --max_train_steps)")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="batches whose gradients add up to one optimiser step")
    group.add_argument("--skip_nan_steps", type=int, default=0,
                       help="drop up to N batches whose loss is NaN or infinite (default 0: the first one stops "
                            "the run)")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="0 turns clipping off")
    group.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "prodigy", "adafactor"],
                       help="adamw: lr 1e-4 for a LoRA, 1e-6 to 5e-6 for a full fine-tune; adamw8bit: the same lrs, a "
                            "quarter of the optimiser memory (bitsandbytes); prodigy: estimates its own step size, "
                            "use --learning_rate 1.0 (the adam_* flags apply to it); adafactor: factored second "
                            "moments, the least memory, lrs as for adamw")
    flags.add_bool(group, "--use_8bit_adam", help="the same as --optimizer adamw8bit")
    group.add_argument("--adam_beta1", type=float, default=0.9, help="Adam's first-moment decay")
    group.add_argument("--adam_beta2", type=float, default=0.999, help="Adam's second-moment decay")
    group.add_argument("--adam_weight_decay", type=float, default=1e-2, help="decoupled weight decay")
    group.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam's denominator floor")
    group.add_argument("--mixed_precision", default=None, choices=["no", "bf16", "fp16"],
                       help="compute precision; trainable weights stay fp32 (default: what `accelerate launch` was "
                            "configured with, else no)")
    flags.add_bool(group, "--gradient_checkpointing",
                   help="recompute activations in the backward pass: much less memory, about a third slower")
    group.add_argument("--snr_gamma", type=float, default=None, help="min-SNR weighting; 5.0 is the paper's value")
    group.add_argument("--noise_offset", type=float, default=0.0, help="e.g. 0.05-0.1: darker darks, brighter lights")
    flags.add_bool(group, "--masked_loss_normalize", default=True,
                   help="divide the masked loss by the mask's mean (false: the plain product)")
    group.add_argument("--prior_loss_target", default=None, choices=["base_model", "dataset"],
                       help="regularisation batches learn the base model's own prediction (base_model; default for "
                            "adapters) or the class image (dataset: classic DreamBooth; the only choice for full)")
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="weight of the regularisation loss")
    group.add_argument("--dop_class", default=None,
                       help="differential output preservation: on instance batches the caption with --dop_trigger "
                            "replaced by this (e.g. \"dog\") keeps the base model's prediction, so the class keeps "
                            "its look without regularisation images")
    group.add_argument("--dop_trigger", default=None, help="what DOP replaces in the captions (e.g. \"ohwx dog\")")
    group.add_argument("--dop_weight", type=float, default=1.0, help="weight of the DOP term")
    group.add_argument("--caption_dropout_probability", type=float, default=0.0,
                       help="each sample trains on the empty caption with this probability (e.g. 0.1), so the model "
                            "keeps drawing the subject's look without the identifier's context")

    flags.add_flow_args(parser)
    flags.add_rollout_args(parser, ROLLOUT_SAMPLERS)
    flags.add_ema_args(parser)
    flags.add_eval_args(parser)
    flags.add_conditioning_args(parser)
    parser.add_argument("--eval_steps_interval", type=int, default=0,
                        help="log the stable eval loss every N steps (eval datasets and/or --eval_split images)")

    group = parser.add_argument_group("checkpoints")
    group.add_argument("--checkpointing_steps", type=int, default=500,
                       help="save a resumable checkpoint-N folder every N steps")
    group.add_argument("--checkpoints_total_limit", type=int, default=None,
                       help="keep only the newest N checkpoints (default: all)")
    group.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")

    flags.add_validation_args(parser)
    flags.add_output_args(parser)
    return parser


def parse_args(argv=None):
    return flags.parse_args_with_config(build_parser(), argv)


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
