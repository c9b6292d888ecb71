"""Build the demo under demo/: a toy subject (toy/make_toy_data.py) and the configs to train a LoRA of it on the
toy model (toy/model), a small pipeline that draws the toy world of coloured shapes.

    python examples/make_demo.py demo/        # then: make demo runs masks, class images, caches, training, evaluation
    python examples/make_demo.py demo_sd3/ toy/model_sd3    # the same on the flow-matching toy model

Point the same configs at a real model and real photos to train for real.

The tiny randomly initialised models here (build_tiny_model) are what the tests build their fixtures from
(tests/conftest.py): they draw noise, but every part of a real model's structure is there.
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


def bpe_pieces(word, ranks):
    """How CLIP's BPE splits `word` under merges ranked by `ranks`: the best-ranked adjacent pair merges first."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def tiny_tokenizer(words=TINY_WORDS):
    """A real CLIP BPE tokenizer over a hand-made vocabulary: every byte, every byte at a word end, and merges
    that make each of `words` one token. Merges are added at the lowest rank while splitting each word as the
    tokenizer will, so a later word's merges never break an earlier word apart (a merge like "d"+"i" learnt for
    "diamond" would otherwise win over "m"+"e" inside "medium")."""
    from transformers import CLIPTokenizer

    alphabet = byte_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet]
    ranks = {}
    for word in words:
        parts = bpe_pieces(word, ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            if parts[0] + parts[1] not in vocab:
                vocab.append(parts[0] + parts[1])
            parts = bpe_pieces(word, ranks)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=list(ranks),
                              model_max_length=77)
    split = [word for word in words if len(tokenizer.tokenize(word)) != 1]
    assert not split, f"tiny_tokenizer: {split} are not single tokens"
    return tokenizer


# Qwen3's chat template, reduced to what the pipelines ask of it (user messages, the generation prompt, thinking off)
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


def byte_bpe_pieces(word, ranks):
    """How a byte-level BPE (GPT-2's, Qwen's) splits `word` under merges ranked by `ranks`."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def tiny_qwen_tokenizer(words=TINY_WORDS):
    """A real Qwen2 byte-level BPE tokenizer over a hand-made vocabulary: every byte, and merges that make each of
    `words` one token (with and without the leading space, Ġ) and the chat roles; Qwen's special tokens and a chat
    template that writes Qwen3's format."""
    from transformers import Qwen2TokenizerFast

    vocab, ranks = byte_alphabet(), {}
    for word in ["Ġ" + w for w in words] + list(words) + ["user", "assistant", "system"]:
        parts = byte_bpe_pieces(word, ranks)
        while len(parts) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            if parts[0] + parts[1] not in vocab:
                vocab.append(parts[0] + parts[1])
            parts = byte_bpe_pieces(word, ranks)
    tokenizer = Qwen2TokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, merges=list(ranks),
                                   errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tokenizer.chat_template, tokenizer.model_max_length = QWEN_CHAT_TEMPLATE, 512
    return tokenizer


def tiny_qwen3(tokenizer, layers=28, seed=0):
    """Qwen3 in small: as many layers as the pipelines tap (FLUX.2 klein reads 9, 18 and 27), 16 wide."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                        head_dim=8, max_position_embeddings=1024,
                                        pad_token_id=tokenizer.pad_token_id)).eval()


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


def tiny_flow_vae(shift_factor, scaling_factor, seed=0):
    """The SD3 / FLUX.1 VAE's shape in small: 16 latent channels, no quant convs, its own shift and scale."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor)


def tiny_t5_tokenizer(words=TINY_WORDS):
    """A real T5 (unigram) tokenizer over a hand-made vocabulary: each of `words` one piece, anything else spelled
    out in letters and digits."""
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in words]
    pieces += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_t5(tokenizer, seed=0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))


def tiny_sd3_transformer(seed=0):
    """Two joint blocks; the pooled text is both CLIPs' (32 + 32), the context T5's width (32)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                 caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32)


def tiny_flux_transformer(guidance_embeds, seed=0):
    """One double-stream and one single-stream block; latents arrive packed (2x2 patches: 4 x 16 channels)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))


def tiny_chroma_transformer(seed=0):
    """FLUX.1's shape in small (one double-stream, one single-stream block) with Chroma's guidance-free modulation
    network; no pooled projection."""
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    axes_dims_rope=(4, 4, 8), approximator_hidden_dim=32, approximator_layers=1,
                                    approximator_num_channels=16)


def tiny_flux2_pipeline(seed=0):
    """FLUX.2 klein in small: Qwen3 (hidden states of layers 9, 18 and 27 stacked: 3 x 16 wide), the FLUX.2 VAE's
    shape (8x down, 4 latent channels, patchified 2x2 into 16 and batch-norm normalised: its running statistics set
    away from 0 / 1 so they matter), a transformer of one block of each kind on 16-channel tokens."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)

    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4,
                             norm_num_groups=8, sample_size=64, use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 16))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                          guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=tiny_qwen3(tokenizer), tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)


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
    """Save a tiny random diffusers pipeline of the given family (sd1, sd2, sdxl, sdxl-refiner, sd3, flux,
    flux-schnell, chroma, if, if-ii; sd3-no-t5: SD3 without its optional T5) to `folder` (with `tokenizer`, e.g. the
    real CLIP vocabulary, instead of the tiny hand-made one)."""
    from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)

    tokenizer = tokenizer or tiny_tokenizer()
    if family == "flux2-klein":
        tiny_flux2_pipeline().save_pretrained(folder, safe_serialization=True)
        return folder
    if family.startswith(("sd3", "flux", "chroma")):
        pipe = tiny_flow_pipeline(family, tokenizer)
        pipe.save_pretrained(folder, safe_serialization=True)
        return folder
    if family in ("if", "if-ii"):
        (tiny_if_pipeline() if family == "if" else tiny_if_upscaler()).save_pretrained(folder, safe_serialization=True)
        return folder
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


def tiny_flow_pipeline(family, tokenizer):
    """SD3 (CLIP-L + CLIP-G + T5; shift 3.0) or FLUX.1 (CLIP-L pooled + T5): dev with its guidance embedding and
    resolution-dependent shift, schnell with neither."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    t5_tokenizer = tiny_t5_tokenizer()
    if family.startswith("sd3"):
        t5 = None if family == "sd3-no-t5" else t5_tokenizer
        return StableDiffusion3Pipeline(
            transformer=tiny_sd3_transformer(), vae=tiny_flow_vae(0.0609, 1.5305),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=tiny_text_encoder(tokenizer, projection=True, hidden_act="gelu", seed=1),
            text_encoder_2=tiny_text_encoder(tokenizer, projection=True, hidden_act="gelu", seed=2),
            text_encoder_3=tiny_t5(t5_tokenizer) if t5 else None, tokenizer=tokenizer, tokenizer_2=tokenizer,
            tokenizer_3=t5)
    dev = family in ("flux", "chroma")  # a resolution-dependent shift
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15) if dev \
        else FlowMatchEulerDiscreteScheduler(shift=1.0)
    if family == "chroma":  # T5 alone (its mask reaches the transformer), FLUX.1's VAE
        return ChromaPipeline(transformer=tiny_chroma_transformer(), vae=tiny_flow_vae(0.1159, 0.3611),
                              scheduler=scheduler, text_encoder=tiny_t5(t5_tokenizer), tokenizer=t5_tokenizer)
    return FluxPipeline(transformer=tiny_flux_transformer(guidance_embeds=dev), vae=tiny_flow_vae(0.1159, 0.3611),
                        scheduler=scheduler, text_encoder=tiny_text_encoder(tokenizer, hidden_act="quick_gelu"),
                        text_encoder_2=tiny_t5(t5_tokenizer), tokenizer=tokenizer, tokenizer_2=t5_tokenizer)


def tiny_if_pipeline(seed=0):
    """DeepFloyd IF stage I: no VAE, a pixel-space UNet (3 channels in, 6 out: the noise and the range of its
    learned variance) reading T5's sequence through its encoder_hid_dim projection, on IF's cosine DDPM schedule."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
        act_fn="gelu", norm_num_groups=16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                              beta_end=0.02, thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5,
                              prediction_type="epsilon", variance_type="learned_range")
    return IFPipeline(tokenizer=tokenizer, text_encoder=tiny_t5(tokenizer), unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)


def tiny_if_upscaler(seed=0):
    """DeepFloyd IF stage II: stage I's UNet with 6 channels in (the noisy picture and the enlarged low-resolution
    one) and the low-resolution picture's noise level as a timestep class embedding; its own noising scheduler."""
    from diffusers import DDPMScheduler, IFSuperResolutionPipeline

    stage_1 = tiny_if_pipeline(seed)
    torch.manual_seed(seed)
    unet = type(stage_1.unet).from_config(stage_1.unet.config, sample_size=32, in_channels=6,
                                          class_embed_type="timestep")
    noising = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                            beta_end=0.02)
    return IFSuperResolutionPipeline(tokenizer=stage_1.tokenizer, text_encoder=stage_1.text_encoder, unet=unet,
                                     scheduler=stage_1.scheduler, image_noising_scheduler=noising,
                                     safety_checker=None, feature_extractor=None, watermarker=None,
                                     requires_safety_checker=False)


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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_MODEL = os.path.join(ROOT, "toy", "model")
DEMO_SUBJECT = 0  # toy/make_toy_data.py SUBJECTS[0]: a red circle with yellow stripes


def write_toy_subject(root, count=5, held_out=3):
    """The demo subject: `count` pictures in subject/, the same as cut-outs (transparent around the shape, as a
    person would cut out a photo for make_masks.py --method alpha) in cutouts/, and `held_out` other pictures of
    it in held_out/ for the eval loss."""
    sys.path.insert(0, os.path.join(ROOT, "toy"))
    import make_toy_data

    for folder in ("subject", "cutouts", "held_out"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for i, (image, mask, _) in enumerate(make_toy_data.subject_samples(DEMO_SUBJECT, count, seed=0)):
        image.save(os.path.join(root, "subject", f"ohwx_{i:02d}.png"))
        cutout = image.copy()
        cutout.putalpha(mask)
        cutout.save(os.path.join(root, "cutouts", f"ohwx_{i:02d}.png"))
    for i, (image, _, _) in enumerate(make_toy_data.subject_samples(DEMO_SUBJECT, held_out, seed=1)):
        image.save(os.path.join(root, "held_out", f"ohwx_{i:02d}.png"))


def main(argv=None):
    """demo/: the toy subject's pictures, cut-outs and held-out pictures, and the data config and training config
    for a LoRA on the toy model (toy/model). make demo runs the rest: make_masks.py (cut-outs -> subject_masks/),
    make_regularisation.py (class pictures -> class/), cache_latents.py, train_dreambooth.py, evaluate.py."""
    argv = sys.argv[1:] if argv is None else argv
    root = os.path.abspath(argv[0] if argv else "demo")
    model = argv[1] if len(argv) > 1 else TOY_MODEL  # toy/model_sd3: make demo FAMILY=sd3
    model = os.path.abspath(model) if os.path.isdir(model) else model
    os.makedirs(root, exist_ok=True)
    write_toy_subject(root)
    cache = os.path.join(root, "cache")
    datasets = [
        {"id": "subject", "type": "local", "instance_data_dir": os.path.join(root, "subject"),
         "caption_strategy": "instanceprompt", "instance_prompt": "a ohwx shape", "resolution": 64,
         "resolution_type": "pixel", "repeats": 9, "cache_dir_vae": os.path.join(cache, "vae", "subject"),
         "conditioning_data": "subject-masks"},
        {"id": "subject-masks", "type": "local", "dataset_type": "conditioning", "conditioning_type": "mask",
         "instance_data_dir": os.path.join(root, "subject_masks")},
        {"id": "class", "type": "local", "is_regularisation_data": True, "instance_data_dir": os.path.join(root, "class"),
         "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel",
         "cache_dir_vae": os.path.join(cache, "vae", "class")},
        {"id": "held-out", "type": "local", "dataset_type": "eval", "instance_data_dir": os.path.join(root, "held_out"),
         "caption_strategy": "instanceprompt", "instance_prompt": "a ohwx shape", "resolution": 64,
         "resolution_type": "pixel", "cache_dir_vae": os.path.join(cache, "vae", "held_out")},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": os.path.join(cache, "text")},
    ]
    with open(os.path.join(root, "multidatabackend.json"), "w", encoding="utf-8") as handle:
        json.dump(datasets, handle, indent=2)
    config = {
        "pretrained_model_name_or_path": model,
        "data_backend_config": os.path.join(root, "multidatabackend.json"),
        "output_dir": os.path.join(root, "output"),
        "seed": 42,
        "train_batch_size": 4,
        "max_train_steps": 300,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 20,
        "lora_rank": 8,
        "lora_target": "all",  # the stripes are fine detail, drawn by the convolutions at full latent size
        "prior_loss_target": "base_model",
        "prior_loss_weight": 2.0,  # the toy DreamBench sweep's best (docs/benchmarks.md)
        "checkpointing_steps": 100,
        "checkpoints_total_limit": 3,
        "validation_prompt": ["a ohwx shape", "a ohwx shape on a green background", "a large ohwx shape at the left"],
        "validation_steps": 100,
        "num_validation_images": 2,
        "validation_num_inference_steps": 20,
        "validation_guidance_scale": 5.0,
        "validation_resolution": 64,
        "eval_steps_interval": 50,
    }
    with open(os.path.join(root, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    print(f"demo subject pictures, cut-outs and configs written to {root} (model: {model})")


if __name__ == "__main__":
    main()
