"""Chroma: FLUX.1-schnell's transformer remade (8.9 B; its modulation from a small 'distilled guidance' network of
the timestep alone), read with T5 alone, no pooled CLIP vector and no embedded guidance. Its latents are FLUX.1's,
packed the same way; it draws with classifier-free guidance."""

import torch

from common.families import encoders
from common.families.base import DRAWS_FROM_A_PROMPT, Family
from common.families.flux import image_ids, pack, unpack
from common.families.mmdit import MMDiTFamily


class Chroma(MMDiTFamily):

    family = "chroma"
    title = "Chroma"
    transformer_class = "ChromaTransformer2DModel"
    text_encoders = (("tokenizer", "text_encoder"),)
    trainable_text_encoders = ()  # T5 alone, which stays frozen (and cached)
    t5_default_length = 512  # its pipeline's max_sequence_length
    guidance_scale = 5.0  # its pipeline's: true classifier-free guidance, with a negative prompt
    pipeline = "ChromaPipeline"
    pipeline_options = {"image_encoder": None, "feature_extractor": None}
    preview_vae = "madebyollin/taef1"  # FLUX.1's VAE
    dtype_keys = ("encoder_hidden_states", "attention_mask")  # the pipeline's mask is in the text's dtype
    # kohya's / ComfyUI's layout: diffusers 0.42.1 has no converter that reads a Chroma LoRA in it back, so none is
    # written (a file nothing here can check)
    flags = DRAWS_FROM_A_PROMPT - {"lora_format"} | {"t5_max_sequence_length"}
    kohya_layout = None
    modelspec = "chroma"
    hub_tag = "chroma"

    @staticmethod
    def detects_single_file(keys):
        return any("distilled_guidance_layer." in k for k in keys)

    def refuse_flags(self, args, default):
        if getattr(args, "gradient_checkpointing", False):
            raise SystemExit(f"--gradient_checkpointing: {self.ref} is Chroma, and diffusers 0.42.1's checkpointed "
                             "single-stream blocks are called without the text's attention mask, so the trained "
                             "forward pass would differ from the one its pipeline draws with; train without it (a "
                             "quantised base, --base_model_precision int8-quanto, saves more memory)")
        super().refuse_flags(args, default)

    @classmethod
    def from_single_file(cls, path, args):
        raise SystemExit(f"{path}: a Chroma checkpoint in its original layout; this tool does not convert those yet. "
                         "Pass the diffusers folder or hub id instead (lodestones/Chroma1-HD, lodestones/Chroma1-Base)")

    @property
    def tokens_per_latent(self):
        return 4

    def encode_text(self, tokenizers, encoders_, prompts):
        """T5's sequence read with its attention mask, as its pipeline reads it, and the mask the transformer gets:
        every real token and the first padding one (the pipeline's `mask_indices <= seq_lengths`), in the text's
        dtype."""
        ids, mask = encoders.token_ids(tokenizers[0], prompts, self.t5_max_length, encoders_[0].device)
        sequence = encoders_[0](ids, attention_mask=mask)[0]
        positions = torch.arange(mask.shape[1], device=mask.device)[None]
        text_mask = (positions <= mask.sum(dim=1, keepdim=True)).to(sequence.dtype)
        return {"prompt_embeds": sequence.float(), "attention_mask": text_mask.float()}

    def conditioning(self, texts, transforms, picture=None):
        """The text sequence and its mask; no pooled vector."""
        return {**Family.conditioning(self, texts, transforms, picture),
                "attention_mask": encoders.stacked(texts, "attention_mask")}

    def predict(self, model, noisy, timesteps, cond):
        """FLUX.1's packed tokens and ids; the text's mask reaches the transformer with the image tokens' appended
        (as the pipeline's _prepare_attention_mask: diffusers 0.42.1 passes this 0/1 mask on to attention, where
        scaled dot-product attention adds a float mask to the scores; the LoRA trains on what the pipeline draws
        with)."""
        cond = dict(cond)
        text_mask = cond.pop("attention_mask")
        height, width = noisy.shape[-2:]
        tokens = pack(noisy)
        mask = torch.cat([text_mask, torch.ones(len(tokens), tokens.shape[1], dtype=torch.bool,
                                                device=text_mask.device)], dim=1)
        text_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=noisy.device)
        out = model(hidden_states=tokens, timestep=timesteps.to(noisy.dtype if noisy.is_floating_point() else
                                                                torch.float32),
                    img_ids=image_ids(height, width, noisy.device), txt_ids=text_ids, attention_mask=mask,
                    return_dict=False, **cond)[0]
        return unpack(out, height, width)

    @staticmethod
    def preview_latents(latents, latent_size):
        return unpack(latents, *latent_size)
