"""Build the demo: a tiny randomly initialised SD-shaped model and a small synthetic subject, under demo/.

    python examples/make_demo.py demo/        # then: make demo does the caching and training

The model is random: it draws noise, before and after training. The demo proves that every step of the real
workflow runs (discovery, buckets, caches, LoRA training, checkpoints, validation images, the saved LoRA) in a
couple of minutes on a CPU. Point the same config at a real model to train for real.

The tiny-model builders here are also what the tests build their fixtures from (tests/conftest.py).
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

# SDXL's second text encoder is wider than its first, as in the real model (1280 vs 768): single-file loading tells
# the two apart by width.
SDXL_TE2_WIDTH = 48
# Words that get whole tokens in the tiny vocabulary; anything else is spelled out in byte-level characters.
TINY_WORDS = ("a", "photo", "of", "ohwx", "sks", "dog", "man", "toy", "robot", "on", "the", "beach", "in", "snow",
              "picture", "subjectname", "an", "dreambooth", "red", "blue", "green")


def byte_alphabet():
    """CLIP's byte-to-unicode table: 256 printable characters standing for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_tokenizer(words=TINY_WORDS):
    """A real CLIP BPE tokenizer over a hand-made vocabulary: every byte, every byte at a word end, and merges
    that make each of `words` one token."""
    from transformers import CLIPTokenizer

    alphabet = byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = (parts[0], parts[1])
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges, model_max_length=77)


def tiny_text_encoder(tokenizer, projection=False, hidden_act="quick_gelu", seed=0, hidden_size=32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=3, max_position_embeddings=77, projection_dim=32, hidden_act=hidden_act,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_vae(seed=0):
    """Four blocks like the real VAE, so the latent grid is 1/8 of the image, with very few channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=64)


def tiny_unet(family, sample_size=8, seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    shared = dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
                  block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    if family == "sd1":
        return UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=4, **shared)
    if family == "sd2":  # SD 2 traits: linear projections in the transformer blocks, per-block head dims
        return UNet2DConditionModel(cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
                                    **shared)
    # SDXL: text_time added conditioning; the refiner has 5 time ids (aesthetic score) and only encoder 2.
    # Cross-attention takes both encoders' widths (32 + 48), the refiner's only the second's.
    time_ids = 5 if family == "sdxl-refiner" else 6
    cross = SDXL_TE2_WIDTH if family == "sdxl-refiner" else 32 + SDXL_TE2_WIDTH
    return UNet2DConditionModel(cross_attention_dim=cross, attention_head_dim=(2, 4), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=time_ids * 8 + 32,
                                transformer_layers_per_block=(1, 2), **shared)


def build_tiny_model(folder, family="sd1", prediction_type="epsilon", sample_size=8, tokenizer=None):
    """Save a tiny random diffusers pipeline of the given family (sd1, sd2, sdxl, sdxl-refiner) to `folder`
    (with `tokenizer`, e.g. the real CLIP vocabulary, instead of the tiny hand-made one)."""
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)

    tokenizer = tokenizer or tiny_tokenizer()
    vae, unet = tiny_vae(), tiny_unet(family, sample_size)
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    prediction_type=prediction_type, steps_offset=1, timestep_spacing="leading")
    if family in ("sd1", "sd2"):
        encoder = tiny_text_encoder(tokenizer, hidden_act="quick_gelu" if family == "sd1" else "gelu")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **schedule),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=tiny_text_encoder(tokenizer, hidden_act="gelu", seed=1),
            text_encoder_2=tiny_text_encoder(tokenizer, projection=True, hidden_act="gelu", seed=2,
                                             hidden_size=SDXL_TE2_WIDTH),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(**schedule))
    elif family == "sdxl-refiner":
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, tokenizer=None, tokenizer_2=tokenizer,
            text_encoder_2=tiny_text_encoder(tokenizer, projection=True, hidden_act="gelu", seed=2,
                                             hidden_size=SDXL_TE2_WIDTH),
            unet=unet, scheduler=EulerDiscreteScheduler(**schedule), requires_aesthetics_score=True)
    else:
        raise ValueError(f"unknown family {family!r}")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def draw_subject(width, height, seed, cutout=False):
    """A made-up subject: a yellow-and-purple checked disc with a red stripe, on a varying background,
    at a varying place and size. Deterministic from the seed. With cutout=True the background is transparent
    (RGBA), as a person would cut out a photo for make_masks.py --method alpha."""
    rng = np.random.default_rng(seed)
    background = tuple(int(v) for v in rng.integers(40, 220, 3))
    image = Image.new("RGB", (width, height), background)
    alpha = Image.new("L", (width, height), 0)
    draw, draw_alpha = ImageDraw.Draw(image), ImageDraw.Draw(alpha)
    radius = int(min(width, height) * rng.uniform(0.22, 0.38))
    cx = int(rng.uniform(radius, width - radius))
    cy = int(rng.uniform(radius, height - radius))
    cell = max(4, radius // 3)
    for y in range(cy - radius, cy + radius, cell):
        for x in range(cx - radius, cx + radius, cell):
            inside = (x + cell / 2 - cx) ** 2 + (y + cell / 2 - cy) ** 2 <= radius ** 2
            if inside:
                colour = (240, 210, 40) if ((x - cx) // cell + (y - cy) // cell) % 2 else (120, 40, 160)
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
                draw_alpha.rectangle([x, y, x + cell - 1, y + cell - 1], fill=255)
    draw.rectangle([cx - radius, cy - 3, cx + radius, cy + 3], fill=(220, 30, 30))
    draw_alpha.rectangle([cx - radius, cy - 3, cx + radius, cy + 3], fill=255)
    if cutout:
        image.putalpha(alpha)
    return image


def make_subject_images(folder, sizes=((192, 192),) * 4 + ((128, 256),) * 2 + ((256, 128),) * 2, cutouts=None):
    """The subject's photos in `folder`; with `cutouts`, the same pictures with transparent backgrounds there."""
    os.makedirs(folder, exist_ok=True)
    for i, (width, height) in enumerate(sizes):
        draw_subject(width, height, seed=i).save(os.path.join(folder, f"subject_{i:02d}.png"))
        if cutouts:
            os.makedirs(cutouts, exist_ok=True)
            draw_subject(width, height, seed=i, cutout=True).save(os.path.join(cutouts, f"subject_{i:02d}.png"))
    return folder


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    root = os.path.abspath(argv[0] if argv else "demo")
    os.makedirs(root, exist_ok=True)
    if not os.path.isfile(os.path.join(root, "model", "model_index.json")):
        build_tiny_model(os.path.join(root, "model"), "sd1", sample_size=24)
    make_subject_images(os.path.join(root, "subject"), cutouts=os.path.join(root, "cutouts"))
    # make demo turns the cut-outs into demo/subject_masks/ with make_masks.py --method alpha (masked loss).
    datasets = [
        {"id": "subject", "type": "local", "instance_data_dir": os.path.join(root, "subject"),
         "caption_strategy": "instanceprompt", "instance_prompt": "a photo of ohwx toy", "resolution": 192,
         "resolution_type": "pixel_area", "repeats": 4, "cache_dir_vae": os.path.join(root, "cache", "vae", "subject"),
         "conditioning_data": "subject-masks"},
        {"id": "subject-masks", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
         "instance_data_dir": os.path.join(root, "subject_masks")},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": os.path.join(root, "cache", "text")},
    ]
    with open(os.path.join(root, "multidatabackend.json"), "w", encoding="utf-8") as handle:
        json.dump(datasets, handle, indent=2)
    config = {
        "pretrained_model_name_or_path": os.path.join(root, "model"),
        "data_backend_config": os.path.join(root, "multidatabackend.json"),
        "output_dir": os.path.join(root, "output"),
        "seed": 42,
        "train_batch_size": 2,
        "max_train_steps": 40,
        "learning_rate": 1e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 5,
        "lora_rank": 8,
        "snr_gamma": 5.0,
        "checkpointing_steps": 20,
        "checkpoints_total_limit": 2,
        "validation_prompt": ["a photo of ohwx toy", "a photo of ohwx toy on the beach"],
        "validation_steps": 20,
        "num_validation_images": 2,
        "validation_num_inference_steps": 10,
        "validation_resolution": 192,
        "eval_split": 2,
        "eval_steps_interval": 10,
    }
    with open(os.path.join(root, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    print(f"demo model, subject images and config written to {root}")


if __name__ == "__main__":
    main()
