"""SDXL base and refiner: a UNet with 'text_time' added conditioning (the pooled text and the picture's size and
crop, or the refiner's aesthetic score), two CLIP text encoders (the refiner has the second alone)."""

import torch

from common.families import encoders
from common.families.base import DRAWS_FROM_A_PROMPT
from common.families.unet import UNetFamily


def has_first_text_encoder(model_index):
    return (model_index.get("text_encoder") or [None])[0] is not None


class SDXL(UNetFamily):
    """The SDXL base model."""

    family = "sdxl"
    title = "SDXL base model"
    text_encoders = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    pipeline = "StableDiffusionXLPipeline"
    preview_vae = "madebyollin/taesdxl"
    foreign_text_caches = ("sdxl-refiner",)  # the refiner encodes with the second encoder alone
    kohya_version = "sdxl_base_v1-0"
    modelspec = "stable-diffusion-xl-v1-base"
    hub_tag = "stable-diffusion-xl"

    @classmethod
    def detects(cls, model_index, config):
        return (config.get("addition_embed_type") == "text_time" and has_first_text_encoder(model_index)
                and not model_index.get("requires_aesthetics_score"))

    @staticmethod
    def detects_single_file(keys):
        return any(k.startswith("conditioner.embedders.1.") for k in keys)

    def encode_text(self, tokenizers, encoders_, prompts):
        """The penultimate hidden states of both encoders concatenated; the second's projected pooled vector."""
        sequences, pooled = [], []
        for tokenizer, encoder in zip(tokenizers, encoders_):
            sequence, vector = encoders.clip_penultimate(tokenizer, encoder, prompts)
            sequences.append(sequence)
            if vector is not None:
                pooled.append(vector)
        return {"prompt_embeds": torch.cat(sequences, dim=-1).float(),
                "pooled_prompt_embeds": torch.cat(pooled, dim=-1).float()}

    def time_ids(self, transform):
        """SDXL's micro-conditioning: original size, crop top-left, target size, each as (height, width)."""
        width, height = transform["original_size"]
        left, top = transform["crop_box"][:2]
        target_w, target_h = transform["target_size"]
        return torch.tensor([height, width, top, left, target_h, target_w], dtype=torch.float32)

    def conditioning(self, texts, transforms, picture=None):
        """The text as encoder_hidden_states; the pooled text and each sample's time ids as added_cond_kwargs."""
        return {**super().conditioning(texts, transforms, picture),
                "added_cond_kwargs": {"text_embeds": encoders.stacked(texts, "pooled_prompt_embeds"),
                                      "time_ids": torch.stack([self.time_ids(t) for t in transforms])}}


class SDXLRefiner(SDXL):
    """The SDXL refiner: text encoder 2 only, an aesthetic score instead of the target size, trained on the low-noise
    end of the schedule it serves (--refiner_training_strength), validated by refining subject pictures (img2img)."""

    family = "sdxl-refiner"
    title = "SDXL refiner"
    text_encoders = (("tokenizer_2", "text_encoder_2"),)
    trainable_text_encoders = ("text_encoder_2",)
    pipeline = "StableDiffusionXLImg2ImgPipeline"
    pipeline_options = {"tokenizer": None, "text_encoder": None, "requires_aesthetics_score": True}
    draws_from_pictures = True
    flags = DRAWS_FROM_A_PROMPT - {"validation_resolution"} | {"data_aesthetic_score", "refiner_training_strength"}
    foreign_text_caches = ("sdxl",)
    class_images_refusal = ("an SDXL refiner: it refines images and cannot draw class images from a prompt. Make them "
                            "with the SDXL base model (the refiner trains on the same folder).")
    kohya_version = None
    modelspec = "stable-diffusion-xl-v1-refiner"
    source_label = "refined from"
    aesthetic_score = 7.0  # --data_aesthetic_score
    strength = 0.2  # --refiner_training_strength

    @classmethod
    def detects(cls, model_index, config):
        return config.get("addition_embed_type") == "text_time" and (
            model_index.get("requires_aesthetics_score") or not has_first_text_encoder(model_index))

    @staticmethod
    def detects_single_file(keys):
        """OpenCLIP-G as the first (only) embedder; the base has CLIP-L first and OpenCLIP-G second."""
        return any(k.startswith("conditioner.embedders.0.model.") for k in keys) and not SDXL.detects_single_file(keys)

    def configure(self, args):
        super().configure(args)
        self.aesthetic_score = getattr(args, "data_aesthetic_score", 7.0)
        self.strength = getattr(args, "refiner_training_strength", 0.2)

    def refuse_flags(self, args, default):
        if getattr(args, "train_text_encoder", False):
            raise SystemExit(f"--train_text_encoder: {self.ref} is an SDXL refiner, trained on the last, low-noise "
                             "part of the schedule, where the caption barely steers the picture; train the text "
                             "encoders with the base model's LoRA instead")
        super().refuse_flags(args, default)

    def notes(self, guidance_scale):
        return [f"SDXL refiner: text encoder 2 only, --refiner_training_strength {self.strength:g}, aesthetic score "
                f"{self.aesthetic_score:g}"]

    @property
    def training_timesteps(self):
        return max(2, round(self.num_train_timesteps * self.strength))

    def time_ids(self, transform):
        """The refiner's: original size, crop top-left and the aesthetic score (5 values)."""
        width, height = transform["original_size"]
        left, top = transform["crop_box"][:2]
        return torch.tensor([height, width, top, left, self.aesthetic_score], dtype=torch.float32)

    def drawing_options(self, size):
        """img2img on a subject picture at the strength it trains on (`size` is the picture's own)."""
        return {**self.drawing_call_options(), "strength": self.strength, "aesthetic_score": self.aesthetic_score}

    def source_picture(self, picture):
        """What it refines in validation: the subject picture as training saw it."""
        return picture

    def sources_note(self, count):
        return (f"{self.family} does not draw from a prompt alone; {count} subject image(s) are refined at strength "
                f"{self.strength:g}, with their captions as prompts")

    def card_loading(self, call, adapter):
        return [], call.replace(").images", ", image=picture).images") + "  # picture: the one to refine"
