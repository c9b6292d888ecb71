"""Train, from scratch, a small SD 1.x-shaped pipeline that draws the toy world (about an hour on 2 CPU cores).

    python toy/make_toy_model.py --output_dir /tmp/toy --unet_steps 50  # a quick check that everything runs

The shipped model (toy/model) is one run of the defaults, 60.3 min on 2 cores (the VAE, then 10,370 UNet steps
at batch 32 until the 60-minute budget): shape and colour right in 94 % of 128 generations from caption
combinations it never saw.

    python toy/make_toy_model.py --output_dir toy/model

Three parts, each a normal diffusers component, saved as one StableDiffusionPipeline folder that every script
loads like any other model:
  - text: a CLIP tokenizer whose hand-made vocabulary makes every caption word one token (toy/make_toy_data.py's
    TOY_WORDS) and a small CLIPTextModel, randomly initialised and frozen (distinct words are all it must tell apart);
  - VAE: a small AutoencoderKL (64 px -> 16 x 16 x 4 latents), trained first on reconstruction; its scaling factor
    is set so the latents have unit variance, as SD's 0.18215 does for SD's VAE;
  - UNet: a UNet2DConditionModel of a few million parameters, trained with v-prediction on a zero-terminal-SNR
    schedule on the cached latents of procedural pictures, the caption dropped 10 % of the time (classifier-free
    guidance works), the weights averaged (EMA).
`--init_from FOLDER` continues from a saved toy model instead: its text encoder and VAE are kept as they are (the
latents must not move under a trained UNet) and the UNet trains on, with a new warm-up and cosine, on batches
drawn with another --seed. `--shape_weight` (default 4) counts the shape's pixels more in the loss: what lifted
small shapes, which a plain mean over the picture let the model draw as blobs (an earlier model, 4,784 steps
without it: 68 % in all, shape right in 47 % of small ones).
`--family sd3` trains the flow-matching counterpart instead (default folder toy/model_sd3): an SD3-shaped pipeline
on the UNet model's VAE (its latent space; the VAE is not what this model shows), two small frozen CLIPs with
projections in CLIP-L's and CLIP-G's places and no T5 (SD3 may leave it out), and a 6-layer SD3 transformer over
2 x 2 latent patches (3.5 M parameters, 0.48 s per step of 32 on 2 cores), trained by rectified flow with SD3's
logit-normal noise levels (no shift: `--shift`, 64 px pictures), the same caption dropout, shape weight and EMA.
SD3 rather than FLUX.1: its pipeline draws with classifier-free guidance, as the UNet model does, so a model trained
from scratch with caption dropout draws well; a FLUX.1-dev-shaped one draws with an embedded guidance value that
needs guidance distillation from a teacher, and a schnell-shaped one needs step distillation.
The shipped SD3 model (toy/model_sd3) is four runs of the script, each later one continuing the one before (the
transformer learns slower per step than the UNet: 31 % after the first run, 73 % after the second, 88 % after the
third, 86 % after the fourth; 201 min in all on 2 cores). The fourth saves SD3's own drawing
shift, 3: drawn at shift 1 it reads 88.5 % of 384 generations at another seed, at 3 90.1 % (0.5: 84.4 %, 2: 89.8 %,
4: 89.3 %, 6: 88.5 %). At guidance 5, as the UNet model draws, it reads 85.9 % of the standard 128 (seed 99) and
89.3 % of 896 (seeds 99, 1234, 4321); more training does not lift that (a fifth run, trained at shift 3: 88 %), nor
do 50 sampler steps (89.8 % of 384). It draws best with less guidance: on 384 at seed 1234, guidance 1.5 / 2 / 2.5 /
3 / 4 / 5 / 6 / 7 / 9 read 91.7 / 93.0 / 93.0 / 91.7 / 90.6 / 90.1 / 88.5 / 85.9 / 79.2 %; checked at the other
seeds (99, 4321 and a new one, 7), guidance 2 reads 91.4 % of the standard 128 and 91.2 % of all 1,280 (2.5: 89.8 %
and 91.0 %; 3: 89.8 % and 90.6 %; 5: 85.9 % and 89.3 %), so its held-out accuracy is measured at 2
(HELD_OUT_GUIDANCE; the UNet model, on 384 at seed 1234: 2 / 3 / 5 / 7 read 93.2 / 94.0 / 93.8 / 93.5 %, so it stays
at 5). Everything else draws the SD3 model at 5, as the UNet model: at 2 its base model draws fewer of the toy
DreamBench's world prompts right (0.75 against 1.00) and a short DreamBooth LoRA less of its subject.

    python toy/make_toy_model.py --family sd3 --minutes 45 --output_dir /tmp/sd3_a
    python toy/make_toy_model.py --family sd3 --init_from /tmp/sd3_a --seed 3 --minutes 60 --output_dir /tmp/sd3_b
    python toy/make_toy_model.py --family sd3 --init_from /tmp/sd3_b --seed 4 --minutes 45 --output_dir /tmp/sd3_c
    python toy/make_toy_model.py --family sd3 --init_from /tmp/sd3_c --seed 5 --minutes 45 --draw_shift 3

It draws with max_sequence_length=77 (the pipeline's default is 256), the text length it was trained with, as every
script here does for SD3 unless --t5_max_sequence_length says otherwise.
Some caption combinations (HELD_OUT) are never shown, so the model is tested on combinations it has not seen:
generations from them are read by toy/toy_scorer.py, and the share with the right shape and colour is printed.
"""

import argparse
import os
import random
import sys
import time

import torch
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "examples")]

import make_toy_data  # noqa: E402

HIDDEN = 64  # text width = UNet cross-attention width
LATENT_FACTOR = 4  # the VAE's 64 px -> 16 x 16
SHIPPED = {"sd1": os.path.join(HERE, "model"), "sd3": os.path.join(HERE, "model_sd3")}  # the toy models, by family
# The guidance held-out accuracy draws each toy model at, its best (the scans in the docstring above); the demo, the
# toy DreamBench and the tests draw both at 5.
HELD_OUT_GUIDANCE = {"sd1": 5.0, "sd3": 2.0}


def held_out(attributes):
    """True for the caption combinations training never sees: a fixed fifth of (shape, colour, background)."""
    key = f"{attributes['shape']}|{attributes['colour']}|{attributes['background']}"
    return random.Random(key).random() < 0.2


def build_components(seed=0):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import make_demo

    tokenizer = make_demo.tiny_tokenizer(words=make_toy_data.TOY_WORDS)
    tokenizer.model_max_length = 16  # the longest caption is 13 tokens: short contexts make cross-attention cheap
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval().requires_grad_(False)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=64)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(64, 128, 128),  # attention at 8 x 8 and 4 x 4 only: 0.46 s per step of 32 on 2 cores
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=HIDDEN,
        attention_head_dim=8)
    return tokenizer, text_encoder, vae, unet


def build_sd3_components(vae_from, seed=0):
    """SD3's parts in small: two CLIP text encoders with projections in CLIP-L's and CLIP-G's places (their
    penultimate states side by side are the context, their projections the pooled vector; no T5, which SD3 may
    leave out: the pipeline pads with zeros), the UNet model's trained VAE (its latent space: the VAE is not what is
    being shown here), and an SD3 transformer over 2 x 2 latent patches."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    import make_demo

    tokenizer = make_demo.tiny_tokenizer(words=make_toy_data.TOY_WORDS)
    tokenizer.model_max_length = 16
    encoders = []
    for index in range(2):
        torch.manual_seed(seed + index)
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)).eval().requires_grad_(False))
    vae = AutoencoderKL.from_pretrained(vae_from, subfolder="vae").eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # SD3's VAE has a shift; this one's latents are centred already
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
        num_layers=6, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=2 * HIDDEN,
        caption_projection_dim=128, pooled_projection_dim=2 * 32, pos_embed_max_size=32)
    return tokenizer, encoders, vae, transformer


def pictures(count, seed):
    """(pixels in [-1, 1], captions, attributes, shape masks at latent size (N, 1, 16, 16) in [0, 1]) of `count`
    pictures whose combinations training may see."""
    import numpy as np

    images, captions, attributes, masks, index = [], [], [], [], 0
    with tqdm(total=count, desc="drawing pictures", unit="img") as bar:
        while len(images) < count:
            image, text, found, mask = make_toy_data.toy_sample(index, seed, with_mask=True)
            index += 1
            if held_out(found):
                continue
            images.append(image)
            captions.append(text)
            attributes.append(found)
            masks.append(np.asarray(mask, dtype=np.float32) / 255)
            bar.update(1)
    import toy_scorer

    masks = torch.nn.functional.avg_pool2d(torch.from_numpy(np.stack(masks))[:, None], LATENT_FACTOR)
    return toy_scorer.to_pixels(images), captions, attributes, masks


def train_vae(vae, pixels, steps, batch_size=16, learning_rate=2e-3):
    """Reconstruction (L1 + L2, a touch of KL) with a short warm-up and a cosine decay. A weaker VAE blurs small
    shapes' colours, which caps what any UNet on its latents can draw (measured with the toy scorer: 800 steps at
    1e-3 gave reconstructions whose colour it read right 29 % of the time; 800 at 2e-3, 99 %)."""
    import math

    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(1)
    vae.train()
    for step in tqdm(range(steps), desc="training the VAE", unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = (reconstruction - batch).abs().mean() + ((reconstruction - batch) ** 2).mean() \
            + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return vae.eval()


@torch.no_grad()
def encode_texts(tokenizer, text_encoder, captions):
    unique = sorted(set(captions))
    embeds = {}
    for start in range(0, len(unique), 256):
        chunk = unique[start:start + 256]
        ids = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        for caption, value in zip(chunk, text_encoder(ids)[0]):
            embeds[caption] = value
    return embeds


def train_denoiser(model, latents, conditions, empty, noising, forward, steps, batch_size, learning_rate, seconds,
                   ema_decay=0.999, snapshot=None, seed=2, ema_warmup=True, shape_masks=None, shape_weight=0.0):
    """Train `model` for `steps` or `seconds`, whichever ends first. `conditions`: per-picture tensors (the
    caption's context, for SD3 its pooled vector too), `empty`: the empty caption's, used 10 % of the time
    (classifier-free guidance works); `noising(x0, noise, generator)` -> (noisy latents, timesteps, target) is
    the objective, `forward(model, noisy, timesteps, conditions)` the prediction. The learning rate warms up, then
    follows a cosine to zero over the time budget (so a run that stops at its budget has cooled down), and an
    exponential moving average of the weights is what is returned (sharper pictures than the raw weights).
    `snapshot`: a .safetensors path the average is written to every 10 minutes, to look at a run in progress.
    `ema_warmup` False: the average starts at the given weights at full decay (they already are an average).
    `shape_weight` W: the loss counts the shape's latent pixels (`shape_masks`) 1 + W times, normalised to the
    batch's mean weight. A small shape covers a few latent pixels of 256, so in a plain mean its outline (what
    tells a triangle from a circle) hardly registers next to the flat background."""
    import math

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-2)
    warmup = min(500, steps // 10 + 1)
    started = time.monotonic()

    def rate(step):
        progress = max(step / steps, (time.monotonic() - started) / seconds)
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    generator = torch.Generator().manual_seed(seed)
    average = [p.detach().clone() for p in model.parameters()]
    next_snapshot = started + 600
    model.train()
    bar = tqdm(range(steps), desc=f"training the {type(model).__name__}", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate * rate(step)
        index = torch.randint(0, len(latents), (batch_size,), generator=generator)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        noisy, timesteps, target = noising(x0, noise, generator)
        cond = [condition[index].clone() for condition in conditions]
        dropped = torch.rand(batch_size, generator=generator) < 0.1  # caption dropout: guidance works
        for condition, nothing in zip(cond, empty):
            condition[dropped] = nothing
        error = (forward(model, noisy, timesteps, cond) - target) ** 2
        if shape_weight:
            weight = 1 + shape_weight * shape_masks[index]
            loss = (error * weight).mean() / weight.mean()
        else:
            loss = error.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step)) if ema_warmup else ema_decay
        with torch.no_grad():
            torch._foreach_lerp_(average, [p.detach() for p in model.parameters()], 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        if snapshot and time.monotonic() > next_snapshot:
            from safetensors.torch import save_file

            names = [name for name, _ in model.named_parameters()]
            save_file({n: v.contiguous() for n, v in zip(names, average)}, snapshot)
            next_snapshot += 600
        if time.monotonic() - started > seconds:
            print(f"time budget reached after {step + 1} steps")
            break
    with torch.no_grad():
        for parameter, value in zip(model.parameters(), average):
            parameter.copy_(value)
    return model.eval()


def v_prediction(scheduler):
    """The UNet's objective: a DDPM timestep, the noisy latent, the velocity target."""
    def noising(x0, noise, generator):
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        return scheduler.add_noise(x0, noise, t), t, scheduler.get_velocity(x0, noise, t)
    return noising


def flow_matching(shift):
    """SD3's objective (rectified flow): a noise level s from the logit-normal of the SD3 paper, shifted towards
    noise by `shift`, x_s = (1 - s) x0 + s noise, the velocity noise - x0 as target; the timestep is 1000 s."""
    def noising(x0, noise, generator):
        s = torch.sigmoid(torch.randn(len(x0), generator=generator))
        s = shift * s / (1 + (shift - 1) * s)
        level = s.view(-1, 1, 1, 1)
        return (1 - level) * x0 + level * noise, s * 1000, noise - x0
    return noising


def held_out_accuracy(pipe, count=128, seed=99, guidance_scale=5.0, **drawing):
    """Share of generations from unseen caption combinations whose shape and colour the toy scorer reads right."""
    import toy_scorer

    scorer = toy_scorer.load_scorer()
    wanted, index = [], 0
    while len(wanted) < count:
        _, text, found = make_toy_data.toy_sample(index, seed, full=True)
        index += 1
        if held_out(found):
            wanted.append((text, found))
    images = []
    for start in range(0, count, 16):
        chunk = wanted[start:start + 16]
        images += pipe([t for t, _ in chunk], height=64, width=64, num_inference_steps=25,
                       guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed + start),
                       **drawing).images
    read = toy_scorer.predict(scorer, images)
    right = [r["shape"] == a["shape"] and r["colour"] == a["colour"] for r, (_, a) in zip(read, wanted)]
    return sum(right) / len(right), images, wanted


def make_unet_model(args, pixels, captions, masks, seconds):
    """The SD 1.x-shaped model: the VAE trained first, then the UNet on its latents (v-prediction, zero terminal
    SNR). Returns its StableDiffusionPipeline and the options it draws with (none beyond the usual)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UniPCMultistepScheduler

    from common import files

    tokenizer, text_encoder, vae, unet = build_components()
    if args.init_from:  # the saved weights into freshly built parts, so the configs stay exactly these
        from safetensors.torch import load_file

        for part, name in ((text_encoder, "text_encoder/model.safetensors"),
                           (vae, "vae/diffusion_pytorch_model.safetensors"),
                           (unet, "unet/diffusion_pytorch_model.safetensors")):
            part.load_state_dict(load_file(os.path.join(args.init_from, name)))
        vae.register_to_config(
            scaling_factor=files.read_json(os.path.join(args.init_from, "vae", "config.json"))["scaling_factor"])
    print(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, "
          f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M, text {len(tokenizer)} tokens")
    started = time.monotonic()
    if not args.init_from:
        vae = train_vae(vae, pixels, args.vae_steps)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    if not args.init_from:
        vae.register_to_config(scaling_factor=1.0 / latents.std().item())
    print(f"VAE latents: std {latents.std().item():.3f}, scaling_factor {vae.config.scaling_factor:.4f}")
    latents = latents * vae.config.scaling_factor
    embeds = encode_texts(tokenizer, text_encoder, captions + [""])

    # Zero terminal SNR with v-prediction (Lin et al. 2023): at the last timestep the latent is pure noise, so
    # what a picture shows must come from its caption. With SD's usual schedule the last noisy latent still
    # carries the picture's mean colours, and a small model learns to copy them from the noise instead of
    # reading the colour words (a first run drew the right shape but a chance colour).
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                              timestep_spacing="trailing", clip_sample=False, steps_offset=1)
    seconds -= time.monotonic() - started  # the budget counts the VAE's time too
    unet = train_denoiser(unet, latents, [torch.stack([embeds[c] for c in captions])], [embeds[""]],
                          v_prediction(scheduler), lambda model, noisy, t, cond: model(noisy, t, cond[0]).sample,
                          args.steps, args.batch_size, args.learning_rate, seconds, snapshot=args.snapshot,
                          seed=args.seed, ema_warmup=not args.init_from, shape_masks=masks,
                          shape_weight=args.shape_weight)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=UniPCMultistepScheduler.from_config(scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False), {}


def make_sd3_model(args, pixels, captions, masks, seconds):
    """The SD3-shaped model: the UNet model's VAE as it is, an SD3 transformer trained by flow matching on its
    latents, captions encoded by the pipeline's own encode_prompt. Returns its StableDiffusion3Pipeline and the
    options it draws with."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from common import families

    # Without a T5 the pipeline pads the context with max_sequence_length zeros: as long as the training scripts
    # use by default for SD3, so the model is trained on the context it will be given.
    drawing = {"max_sequence_length": families.SD3.t5_default_length}

    tokenizer, encoders, vae, transformer = build_sd3_components(args.vae_from)
    if args.init_from:  # the saved weights into freshly built parts (the VAE is --vae_from's either way)
        from safetensors.torch import load_file

        for part, name in ((encoders[0], "text_encoder/model.safetensors"),
                           (encoders[1], "text_encoder_2/model.safetensors"),
                           (transformer, "transformer/diffusion_pytorch_model.safetensors")):
            part.load_state_dict(load_file(os.path.join(args.init_from, name)))
    print(f"transformer {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f} M parameters, VAE from "
          f"{args.vae_from}, text {len(tokenizer)} tokens")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=args.draw_shift or args.shift),
        text_encoder=encoders[0], text_encoder_2=encoders[1], text_encoder_3=None, tokenizer=tokenizer,
        tokenizer_2=tokenizer, tokenizer_3=None)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i:i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
        latents = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
        unique = sorted(set(captions)) + [""]
        context, pooled = [], []
        for start in tqdm(range(0, len(unique), 256), desc="encoding captions", unit="batch"):
            embeds, _, vectors, _ = pipe.encode_prompt(unique[start:start + 256], None, None,
                                                       do_classifier_free_guidance=False, **drawing)
            context.append(embeds)
            pooled.append(vectors)
        context, pooled = torch.cat(context), torch.cat(pooled)
    row = {caption: i for i, caption in enumerate(unique)}
    rows = torch.tensor([row[c] for c in captions])

    def forward(model, noisy, t, cond):
        return model(hidden_states=noisy, timestep=t, encoder_hidden_states=cond[0],
                     pooled_projections=cond[1]).sample

    pipe.transformer = train_denoiser(
        transformer, latents, [context[rows], pooled[rows]], [context[-1], pooled[-1]], flow_matching(args.shift),
        forward, args.steps, args.batch_size, args.learning_rate, seconds, snapshot=args.snapshot, seed=args.seed,
        ema_warmup=not args.init_from, shape_masks=masks, shape_weight=args.shape_weight)
    return pipe, drawing


def main(argv=None):
    from common import images

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="sd1", choices=["sd1", "sd3"],
                        help="sd1: the UNet model (toy/model); sd3: the SD3-shaped flow-matching model (toy/model_sd3)")
    parser.add_argument("--output_dir", default=None, help="default: toy/model (sd1) or toy/model_sd3 (sd3)")
    parser.add_argument("--pictures", type=int, default=20000)
    parser.add_argument("--vae_steps", type=int, default=1600, help="sd1: the VAE's training steps")
    parser.add_argument("--vae_from", default=os.path.join(HERE, "model"),
                        help="sd3: the model whose trained VAE it uses (default: the UNet model)")
    parser.add_argument("--steps", "--unet_steps", type=int, default=12000, help="the denoiser's steps at most")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--shift", type=float, default=1.0,
                        help="sd3: the noise-level shift of training and sampling (1.0: none; 64 px pictures have "
                             "little to gain from SD3's 3.0, chosen for 1024 px)")
    parser.add_argument("--draw_shift", type=float, default=None,
                        help="sd3: the shift the saved scheduler draws (and DreamBooth trains) with; default --shift")
    parser.add_argument("--minutes", type=float, default=60.0, help="stop the training at this time budget")
    parser.add_argument("--snapshot", default=None, help="write the denoiser's averaged weights here every 10 minutes")
    parser.add_argument("--init_from", default=None,
                        help="a saved toy model to continue: keeps its text encoder and VAE, trains its denoiser further")
    parser.add_argument("--seed", type=int, default=2, help="draws the denoiser's batches, noise and timesteps")
    parser.add_argument("--shape_weight", type=float, default=4.0,
                        help="extra loss weight on the shape's pixels (0: a plain mean over the picture)")
    parser.add_argument("--held_out", type=int, default=128, help="generations the held-out accuracy is measured on")
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or SHIPPED[args.family]
    started = time.monotonic()
    pixels, captions, _, masks = pictures(args.pictures, seed=0)
    seconds = args.minutes * 60 - (time.monotonic() - started)
    make = make_unet_model if args.family == "sd1" else make_sd3_model
    pipe, drawing = make(args, pixels, captions, masks, seconds)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(args.output_dir, safe_serialization=True)
    accuracy, drawn, wanted = held_out_accuracy(pipe, args.held_out, guidance_scale=HELD_OUT_GUIDANCE[args.family],
                                                **drawing)
    images.contact_sheet(drawn, [f"{a['colour']} {a['shape']}" for _, a in wanted],
                         args.output_dir.rstrip("/") + "_held_out_samples.png", thumb=96)  # beside, not in, the model
    print(f"held-out caption combinations: shape and colour right in {accuracy:.0%} of {len(wanted)} generations")
    print(f"saved {args.output_dir} in {(time.monotonic() - started) / 60:.1f} min")
    return accuracy

if __name__ == "__main__":
    main()
