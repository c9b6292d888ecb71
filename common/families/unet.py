"""What the UNet families (SD 1.x / 2.x, SDXL, DeepFloyd IF) share: the UNet call and its LoRA presets."""

from typing import ClassVar

from common.families.base import Family

# --lora_target presets: module-name suffixes peft adapts. IF's attention also projects the text into keys and values
# of its own (add_k_proj, add_v_proj; SD's UNets have none).
_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
LORA_TARGETS = {
    "attention": _ATTENTION,
    "attention_ff": _ATTENTION + ["ff.net.0.proj", "ff.net.2"],
    "all": _ATTENTION + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut",
                         "time_emb_proj"],
}


class UNetFamily(Family):
    """A UNet trained by noise prediction on the DDPM schedule."""

    denoiser: ClassVar[str] = "unet"
    objective: ClassVar[str] = "noise"

    @staticmethod
    def plain_text_to_image(config):
        """An SD-style text-to-image UNet: no added conditioning, 4 latent channels in (not an inpainting UNet)."""
        return config.get("addition_embed_type") is None and config.get("in_channels", 4) == 4

    def predict(self, model, noisy, timesteps, cond):
        # IF's UNet predicts twice the channels it denoises (see deepfloyd.py); for SD's the slice keeps them all.
        return model(noisy, timesteps, **cond).sample[:, :noisy.shape[1]]

    @classmethod
    def lora_targets(cls, model, preset):
        return LORA_TARGETS[preset]
