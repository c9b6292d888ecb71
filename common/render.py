"""Pictures from a model: every prompt at fixed seeds, the same way for training's validation and evaluate.py.

The seeds are the same at every step and for every model, so a prompt's pictures compare across checkpoints. A
refiner cannot draw from a prompt: it refines subject images (their captions as prompts) at its img2img strength,
and its grid rows start with the image it refines. IF stage II likewise enlarges low-resolution subject images.
"""

import contextlib
import math
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from common import files, images, models


def picture_sizes(info, requested, flag="--validation_resolution"):
    """The (width, height) of the pictures to draw: `requested` (the flag's list), or the model's native square.
    Each side must be a multiple of what the family's pipeline draws (8 px; SD3 and FLUX.1: 16)."""
    if not requested:
        side = images.round_to(info.native_resolution, info.bucket_step)
        return [(side, side)]
    step = info.size_multiple
    bad = [f"{width}x{height}" for width, height in requested if width % step or height % step]
    if bad:
        raise SystemExit(f"{flag}: {', '.join(bad)}: {info.family}'s pipeline draws sizes whose sides are multiples "
                         f"of {step} px")
    return list(requested)


def size_label(size):
    return f"{size[0]}x{size[1]}"


def drawing_options(info, steps, guidance_scale, negative_prompt, size):
    """The pipeline's keyword arguments shared by every picture of a round: text-to-image at `size` (width, height;
    a number: a square), or what the family draws from a picture with (a refiner: img2img at its training strength;
    IF stage II: its sources enlarged, noised at --if_noise_level). An img2img pipeline runs int(steps x strength)
    of the steps: fewer steps than make one are refused (diffusers would draw an empty batch and fail)."""
    if negative_prompt is not None and not info.negative_prompt:
        raise SystemExit(f"a negative prompt ({negative_prompt!r}): {info.family}'s pipeline ({info.pipeline}) takes "
                         "none (it guides against the empty caption); leave --validation_negative_prompt / "
                         "--negative_prompt out")
    options = dict(num_inference_steps=steps, guidance_scale=guidance_scale, **info.drawing_options(size))
    if negative_prompt is not None:
        options["negative_prompt"] = negative_prompt
    if "strength" in options and int(steps * options["strength"]) < 1:
        raise SystemExit(f"{steps} sampler steps at strength {options['strength']:g} run none: {info.family} refines "
                         f"with the last {options['strength']:g} of them; give at least "
                         f"{math.ceil(1 / options['strength'])} (--validation_num_inference_steps in training, "
                         "--num_inference_steps in evaluate.py)")
    return options


def refine_sources(info, entries, count, seed):
    """What a refiner refines, or IF stage II enlarges, in validation and evaluation: `count` subject images chosen
    by `seed`, resized and cropped to their buckets as training saw them (info.source_picture: stage II then shrinks
    each to the low-resolution photo it enlarges back to that size), each with its caption as the prompt."""
    chosen = random.Random(seed).sample(entries, min(count, len(entries)))
    pictures = [info.source_picture(images.apply_transform(images.load_image(entry.path), entry.transform))
                for entry in chosen]
    return [(entry.captions[0], picture) for entry, picture in zip(chosen, pictures)]


@dataclass
class Round:
    """How a round of pictures is drawn: each prompt at `count` seeds from `seed` on (with sources, each source once
    at `seed`), with `options` (drawing_options), under `autocast`; `desc` names its progress bar."""

    count: int
    seed: int
    options: dict
    autocast: object = contextlib.nullcontext
    desc: str = "images"


def render(pipe, prompts, plan, sources=None, path_for=None, preview_for=None):
    """Each prompt drawn as `plan` (a Round) says: at seeds plan.seed, plan.seed + 1, ... (plan.count of them); with
    `sources` (a refiner), each prompt's source image refined once at plan.seed. path_for(prompt index, seed) names
    the file each picture is saved to; preview_for(prompt index, seed) gives the call's preview callback
    (validation previews: Previews.callback). Returns a list of pictures per prompt."""
    rows = [[] for _ in prompts]
    jobs = [(p, i) for p in range(len(prompts)) for i in range(1 if sources else plan.count)]
    for p, i in tqdm(jobs, desc=plan.desc, unit="img", leave=False):
        seed = plan.seed + i
        call = dict(plan.options, prompt=prompts[p], generator=torch.Generator().manual_seed(seed))
        upscale = call.pop("upscale", None)
        if sources:
            call["image"] = sources[p][1]
        if upscale:  # IF stage II: the source enlarged `upscale` times
            call.update(width=sources[p][1].width * upscale, height=sources[p][1].height * upscale)
        if preview_for is not None:
            call.update(preview_for(p, seed))
        vae = getattr(pipe, "vae", None)  # IF has none
        with torch.no_grad(), plan.autocast(), decoding_outside_autocast(vae), predicting_in_fp32(pipe):
            image = pipe(**call).images[0]
        if path_for is not None:
            files.save_image_atomic(image, path_for(p, seed))
        rows[p].append(image)
    return rows


@contextlib.contextmanager
def decoding_outside_autocast(vae):
    """The pipeline's VAE decode runs outside autocast, in the VAE's own dtype. Under fp16 autocast a VAE held in fp32
    would still convolve in fp16, and diffusers' own upcast (force_upcast) never triggers, as it looks at the weights'
    dtype: SDXL's VAE then overflows into black or NaN images. The denoiser still runs under autocast. (IF: no VAE.)"""
    if vae is None:
        yield
        return

    def decode(latents, *args, **kwargs):
        with torch.autocast(latents.device.type, enabled=False):
            return type(vae).decode(vae, latents.to(vae.dtype), *args, **kwargs)

    own = vae.__dict__.get("decode")  # an instance's own decode (rare), put back afterwards
    vae.decode = decode
    try:
        yield
    finally:
        if own is None:
            del vae.decode
        else:
            vae.decode = own


@contextlib.contextmanager
def predicting_in_fp32(pipe):
    """The denoiser's prediction in fp32, as training's model gives it under mixed precision (accelerate wraps a
    prepared model's forward so): the scheduler then steps fp32 latents. Without this, evaluate.py's model, not
    prepared, would return bf16 / fp16 and its latents would stay so: pictures a few levels off training's validation
    ones at the same step and seed. A no-op in fp32 and for training's own model."""
    from accelerate.utils import convert_to_fp32

    hook = models.denoiser_of(pipe).register_forward_hook(lambda module, inputs, output: convert_to_fp32(output))
    try:
        yield
    finally:
        hook.remove()


def prompt_grid(rows, prompts, sources=None, column_labels=(), cell=None):
    """The pictures of a round in one image: a row per prompt, labelled with it, a column per seed (a refiner's
    rows start with the image each refines, or IF stage II's with the small one it enlarges, shown at the size of
    what it drew); `column_labels` head the columns or equal groups of them."""
    cell = cell or (rows[0][0].size if rows and rows[0] else None)
    rows = [[images.enlarged(sources[p][1], max(cell)), *row] if sources else row for p, row in enumerate(rows)]
    return images.image_grid([image for row in rows for image in row], len(rows[0]), cell=cell,
                             column_labels=column_labels, row_labels=prompts)


def load_preview_vae(reference, allow_pickle=False, device="cpu"):
    """The Tiny AutoEncoder that turns in-progress latents into pictures (--preview_vae: folder or hub id)."""
    from diffusers import AutoencoderTiny

    try:
        preview_vae = AutoencoderTiny.from_pretrained(reference, **files.safe_weights(reference, allow_pickle))
    except (OSError, ValueError) as err:
        raise SystemExit(f"--preview_vae {reference}: cannot load a Tiny AutoEncoder there ({err}); pass a local "
                         "folder or a hub id (madebyollin/taesd, madebyollin/taesdxl)") from None
    return preview_vae.to(device).eval()


@torch.no_grad()
def decode_preview(preview_vae, latents, to_latent=None):
    """A quick picture of in-progress latents: the Tiny AutoEncoder decodes the pipeline's latents, in
    milliseconds, where the full VAE would take seconds. `to_latent` (the family's preview_latents) makes the
    pipeline's latents a (B, C, H, W) latent first (FLUX's packed tokens are unpacked); the latents are unscaled as
    the pipeline would for this decoder (a Tiny AutoEncoder's own scale is 1 and shift 0: it reads the pipeline's
    latents as they are). Without a preview VAE (IF, in pixel space) the in-progress image is the picture."""
    from PIL import Image

    if to_latent is not None:
        latents = to_latent(latents)
    if preview_vae is None:
        image = latents[0]
    else:
        config = preview_vae.config
        latents = latents / config.get("scaling_factor", 1.0) + (config.get("shift_factor") or 0.0)
        image = preview_vae.decode(latents[:1].to(preview_vae.device, preview_vae.dtype)).sample[0]
    return Image.fromarray(((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


@dataclass
class Previews:
    """--validation_preview: pictures of a validation image while it is drawn, sent to the webhooks (`hooks`) every
    `every` denoising steps and at the last one. `preview_vae`: the Tiny AutoEncoder (None: the latents are the
    picture, IF); `to_latent`: see decode_preview; `steps`: the denoising steps of a call (IF's older callback does
    not say)."""

    hooks: object
    preview_vae: object
    every: int
    to_latent: object = None
    steps: int = None

    def callback(self, step, prompt, seed):
        """The pipeline-call keywords that send this picture's previews (`step`: the training step): a
        callback_on_step_end, or for IF, whose pipeline has the older per-step `callback`, a callback over its
        steps."""
        def send(done, total, latents):
            if done % self.every == 0 or done == total:
                self.hooks.send("preview_image", f"{prompt} (denoising step {done}/{total})", step=step,
                                images=[decode_preview(self.preview_vae, latents, self.to_latent)], prompt=prompt,
                                seed=seed, denoising_step=done)

        if self.preview_vae is None:
            return {"callback": lambda index, timestep, latents: send(index + 1, self.steps, latents),
                    "callback_steps": 1}

        def callback(pipe, index, timestep, tensors):
            send(index + 1, pipe.num_timesteps, tensors["latents"])  # the steps this call runs (img2img: the last)
            return tensors
        return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}
