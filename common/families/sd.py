"""Stable Diffusion 1.x and 2.x: a UNet on 4-channel latents, one CLIP text encoder, epsilon or v prediction."""

from common.families import encoders
from common.families.unet import UNetFamily


class SD1(UNetFamily):
    """SD 1.x: CLIP-L's last hidden state; everything else with one CLIP text encoder and a plain UNet is SD 1.x."""

    family = "sd1"
    title = "SD 1.x"
    pipeline = "StableDiffusionPipeline"
    pipeline_options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    single_file_options = {"safety_checker": None, "requires_safety_checker": False}
    preview_vae = "madebyollin/taesd"
    kohya_text_encoder_prefixes = {"text_encoder": "lora_te_"}
    kohya_version = "sd_v1"
    modelspec = "stable-diffusion-v1"
    hub_tag = "stable-diffusion"

    @classmethod
    def detects(cls, model_index, config):
        return "transformer" not in model_index and cls.plain_text_to_image(config)

    @staticmethod
    def detects_single_file(keys):
        return any(k.startswith("cond_stage_model.transformer.") for k in keys)

    def encode_text(self, tokenizers, encoders_, prompts):
        """The text encoder's last hidden state (SD 2's shipped encoder is already cut to the penultimate layer)."""
        return {"prompt_embeds": encoders.clip_last(tokenizers[0], encoders_[0], prompts).float()}


class SD2(SD1):
    """SD 2.x: OpenCLIP-H, whose shipped encoder is already cut to the penultimate layer; 1024-wide cross-attention
    or, for small models, linear attention projections (an SD 2 trait SD 1 UNets lack)."""

    family = "sd2"
    title = "SD 2.x"
    kohya_version = "sd_v2"
    modelspec = "stable-diffusion-v2-512"

    @classmethod
    def detects(cls, model_index, config):
        return super().detects(model_index, config) and (config.get("cross_attention_dim") == 1024
                                                         or bool(config.get("use_linear_projection")))

    @staticmethod
    def detects_single_file(keys):
        return any(k.startswith("cond_stage_model.model.") for k in keys)

    @property
    def modelspec_architecture(self):
        return "stable-diffusion-v2-768-v" if self.prediction_type == "v_prediction" else self.modelspec
