"""FLUX.1 dev / schnell: an MMDiT whose latents enter as 2x2 patches (tokens) with position ids; CLIP-L's pooled
vector and T5's sequence; dev embeds its (distilled) guidance, schnell has none."""

import torch
from safetensors import safe_open

from common.families import encoders
from common.families.base import FAMILY_FLAGS
from common.families.mmdit import CONTEXT_QKV, QKV, MMDiTFamily

# kohya's layout of Black Forest Labs' checkpoint: block prefix -> (original prefix, {original Linear: the diffusers
# modules it holds, in row order}); a single block's linear1 also holds its MLP's input.
ORIGINAL_LAYOUT = {
    "transformer_blocks.{}.": ("double_blocks.{}.", {
        "img_attn.qkv": ["attn." + p for p in QKV], "txt_attn.qkv": ["attn." + p for p in CONTEXT_QKV],
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
}


def pack(latents):
    """FLUX's tokens: each 2x2 patch of a (B, C, H, W) latent as one token of C x 4 channels, (B, H/2 x W/2, 4C)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(tokens, height, width):
    """pack's inverse: (B, H/2 x W/2, 4C) tokens back to a (B, C, H, W) latent."""
    b, _, channels = tokens.shape
    return tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        b, channels // 4, height, width)


def image_ids(height, width, device=None):
    """FLUX's position of each token of a packed (height, width) latent: (0, row, column)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


class Flux(MMDiTFamily):

    family = "flux"
    transformer_class = "FluxTransformer2DModel"
    title = "FLUX.1"
    text_encoders = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    trainable_text_encoders = ("text_encoder",)
    t5_default_length = 512
    guidance_scale = 3.5
    pipeline = "FluxPipeline"
    preview_vae = "madebyollin/taef1"
    kohya_layout = ORIGINAL_LAYOUT
    kohya_version = "flux1"
    modelspec = "flux-1-dev"
    hub_tag = "flux"
    guidance = None  # the guidance value a guidance-distilled model trains with (--flux_guidance_value)

    @staticmethod
    def detects_single_file(keys):
        """Black Forest Labs' double blocks (Chroma's files have them too, beside its distilled guidance layer)."""
        return any(k.split("model.diffusion_model.")[-1].startswith("double_blocks.") for k in keys) and not any(
            "distilled_guidance_layer." in k or "stream_modulation" in k for k in keys)  # Chroma's, FLUX.2's

    @property
    def guidance_embeds(self):
        """A guidance-distilled model (dev): the guidance value is an input of the transformer."""
        return bool(self.model_config.get("guidance_embeds"))

    flags = MMDiTFamily.flags | {"t5_max_sequence_length", "flux_guidance_value"}

    def refuse_flags(self, args, default):
        """--flux_guidance_value is a guidance-distilled model's (dev): schnell has no guidance input."""
        if not self.guidance_embeds and getattr(args, "flux_guidance_value", None) != default("flux_guidance_value"):
            raise SystemExit(f"--flux_guidance_value applies to {FAMILY_FLAGS['flux_guidance_value']}; {self.ref} is "
                             f"{self.family} without guidance embedding (schnell): leave it out")
        super().refuse_flags(args, default)

    def configure(self, args):
        super().configure(args)
        if not self.guidance_embeds:  # schnell: 256 T5 tokens, as its pipeline card
            self.t5_max_length = getattr(args, "t5_max_sequence_length", None) or 256
        self.guidance = getattr(args, "flux_guidance_value", 1.0) if self.guidance_embeds else None

    def notes(self, guidance_scale):
        if not self.guidance_embeds:
            return []
        return [f"guidance-distilled model: trained with guidance {self.guidance:g} (--flux_guidance_value); "
                f"validation draws with {guidance_scale:g}"]

    @property
    def modelspec_architecture(self):
        return self.modelspec if self.guidance_embeds else "flux-1-schnell"

    @property
    def tokens_per_latent(self):
        return 4

    def encode_text(self, tokenizers, encoders_, prompts):
        """T5's sequence; CLIP's pooled output."""
        pooled = encoders.clip_pooled(tokenizers[0], encoders_[0], prompts)
        sequence = encoders.t5(tokenizers[1], encoders_[1], prompts, self.t5_max_length)
        return {"prompt_embeds": sequence.float(), "pooled_prompt_embeds": pooled.float()}

    def conditioning(self, texts, transforms, picture=None):
        """Besides the text: a guidance-distilled model's guidance value per sample."""
        cond = super().conditioning(texts, transforms, picture)
        if self.guidance is not None:
            cond["guidance"] = torch.full((len(texts),), float(self.guidance))
        return cond

    def predict(self, model, noisy, timesteps, cond):
        """The latents go in packed, with each token's position, and come out unpacked; the text's positions are 0."""
        timestep = timesteps.to(noisy.dtype if noisy.is_floating_point() else torch.float32)
        height, width = noisy.shape[-2:]
        text_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=noisy.device)
        tokens = model(hidden_states=pack(noisy), timestep=timestep, img_ids=image_ids(height, width, noisy.device),
                       txt_ids=text_ids, return_dict=False, **cond)[0]
        return unpack(tokens, height, width)

    @staticmethod
    def preview_latents(latents, latent_size):
        """The pipeline's packed latents as a (B, C, H, W) latent, for a preview."""
        return unpack(latents, *latent_size)

    @classmethod
    def from_single_file(cls, path, args):
        """A FLUX.1 file in Black Forest Labs' layout holds the transformer alone (in its own precision, kept: bf16 for
        the released models; an fp8 file is widened to bf16, for training); the VAE, text encoders and scheduler
        come from --single_file_config, in the same precision."""
        import diffusers

        with safe_open(path, framework="pt") as handle:
            key = next(k for k in handle.keys() if k.endswith("img_in.weight"))
            width, dtype = handle.get_slice(key).get_shape()[0], handle.get_tensor(key).dtype
        dtype = {torch.float32: torch.float32, torch.float16: torch.float16}.get(dtype, torch.bfloat16)  # fp8 -> bf16
        if width != 3072:  # diffusers' converter fixes every FLUX.1's width, 3072
            raise SystemExit(f"{path}: a FLUX transformer {width} wide; diffusers' converter reads the FLUX.1 width "
                             "(3072) only. Convert it to a diffusers folder with the tool that made it, and pass the "
                             "folder")
        if not args.single_file_config:
            raise SystemExit(f"{path} holds the FLUX transformer alone: give --single_file_config the diffusers folder "
                             "or hub id of the same model (black-forest-labs/FLUX.1-dev or FLUX.1-schnell) for the "
                             "VAE, text encoders and scheduler")
        transformer = diffusers.FluxTransformer2DModel.from_single_file(
            path, config=args.single_file_config, subfolder="transformer", torch_dtype=dtype,
            local_files_only=args.local_files_only)
        return diffusers.FluxPipeline.from_pretrained(args.single_file_config, transformer=transformer,
                                                      torch_dtype=dtype, local_files_only=args.local_files_only)
