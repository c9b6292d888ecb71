"""DeepFloyd IF stage I and II: pixel-space UNets (no VAE) that read T5 with its attention mask and predict the noise
and the range of a learned variance; stage II enlarges a picture 4x, reading it beside the noisy one."""

import torch

from common.families import encoders
from common.families.unet import UNetFamily

TEXT_LENGTH = 77  # IF's T5 reads 77 tokens: the length it was trained with, fixed in its pipeline


class IF(UNetFamily):
    """Stage I: a 64 px UNet. Its UNet predicts the noise and, after it, the range of its learned variance. Only the
    noise half is trained (UNetFamily.predict keeps it; as diffusers' IF DreamBooth does): the variance term of IF's
    own loss needs the full variational bound, and a LoRA on a few images learns the subject from the noise alone;
    the trained model then draws with a fixed variance (models.drawing_scheduler)."""

    family = "if"
    title = "DeepFloyd IF stage I"
    trainable_text_encoders = ()  # T5 alone, which stays frozen
    pixels = True
    bucket_step = 8
    guidance_scale = 7.0
    pipeline = "IFPipeline"
    pipeline_options = {"safety_checker": None, "feature_extractor": None, "watermarker": None,
                        "requires_safety_checker": False}
    flags = frozenset({"validation_resolution", "validation_preview"})
    kohya_layout = None  # no tool reads kohya's layout for IF
    modelspec = "deepfloyd-if-i"
    hub_tag = "deepfloyd-if"

    @classmethod
    def detects(cls, model_index, config):
        """No VAE, a UNet that projects its text (encoder_hid_dim) and predicts twice the channels it denoises."""
        if not ("vae" not in model_index and config.get("encoder_hid_dim") and config.get("out_channels") == 6):
            return False
        if IFStageII.detects_unet(config):
            return False
        if config.get("in_channels") != 3:
            raise ValueError(f"an IF-like UNet with {config.get('in_channels')} input channels and "
                             f"class_embed_type={config.get('class_embed_type')}: neither DeepFloyd IF stage I "
                             "(3 channels) nor stage II (6, with a timestep class embedding)")
        return True

    def encode_text(self, tokenizers, encoders_, prompts):
        """T5's sequence of the caption lower-cased and stripped, its padding masked inside T5; the UNet reads all 77
        positions, as IF's pipeline gives them."""
        prompts = [prompt.lower().strip() for prompt in prompts]
        return {"prompt_embeds": encoders.t5(tokenizers[0], encoders_[0], prompts, TEXT_LENGTH, masked=True).float()}

    def drawing_call_options(self):
        """The caption read as the training read it (lower-cased; its pipeline's default also strips URLs and
        punctuation where bs4 and ftfy are installed)."""
        return {"clean_caption": False}

    def card_loading(self, call, adapter):
        if adapter == "full":  # a full fine-tune is saved with the fixed variance already
            return [], call
        fixed = 'pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, variance_type="fixed_small")'
        return [fixed], call


class IFStageII(IF):
    """Stage II: enlarges a picture 4x; its UNet takes that picture, enlarged back and noised, beside the noisy one
    (6 channels in) and the level of that noise as its class label. Buckets: 4 x stage I's 8 px."""

    family = "if-ii"
    title = "DeepFloyd IF stage II"
    bucket_step = 32
    size_multiple = 32
    guidance_scale = 4.0
    pipeline = "IFSuperResolutionPipeline"
    draws_from_pictures = True
    flags = frozenset({"if_noise_level", "validation_preview"})
    dtype_keys = ("encoder_hidden_states", "upscaled")
    class_images_refusal = ("DeepFloyd IF stage II: it enlarges pictures and cannot draw class images from a prompt. "
                            "Make them with stage I (DeepFloyd/IF-I-*) and enlarge them with stage II's pipeline, or "
                            "use photos of the class; at the size stage II trains, they serve as they are.")
    modelspec = "deepfloyd-if-ii"
    source_label = "enlarged from"
    factor = 4  # how many times it enlarges
    low_resolution = None  # LowResolution, for the run's --if_noise_level

    @staticmethod
    def detects_unet(config):
        return config.get("in_channels") == 6 and config.get("class_embed_type") == "timestep"

    @classmethod
    def detects(cls, model_index, config):
        return ("vae" not in model_index and bool(config.get("encoder_hid_dim")) and config.get("out_channels") == 6
                and cls.detects_unet(config))

    def configure(self, args):
        super().configure(args)
        self.low_resolution = LowResolution(self.noising_scheduler(), self.factor, getattr(args, "if_noise_level", 250))

    def noising_scheduler(self):
        """The scheduler that noises the picture it enlarges, as the model's folder names it."""
        import diffusers

        return getattr(diffusers, self.model_index["image_noising_scheduler"][1]).from_pretrained(
            self.folder, subfolder="image_noising_scheduler")

    def picture_conditioning(self, pictures, generator, fixed=False):
        return self.low_resolution(pictures, generator, level=self.low_resolution.max_level if fixed else None)

    def predict(self, model, noisy, timesteps, cond):
        """The enlarged low-resolution picture is read as channels beside the noisy one, as its pipeline gives it."""
        cond = dict(cond)
        inputs = torch.cat([noisy, cond.pop("upscaled").to(noisy.dtype)], dim=1)
        return model(inputs, timesteps, **cond).sample[:, :noisy.shape[1]]

    def pipeline_components(self):
        return {"image_noising_scheduler": self.noising_scheduler()}

    def drawing_options(self, size):
        """Each source drawn `upscale` times its size (render.render), noised at --if_noise_level."""
        return {**self.drawing_call_options(), "noise_level": self.low_resolution.max_level, "upscale": self.factor}

    def source_picture(self, picture):
        """What it enlarges in validation: the subject picture shrunk by its factor (each block of pixels averaged:
        the low-resolution photo it enlarges back to that size)."""
        return picture.reduce(self.factor)

    def sources_note(self, count):
        return (f"{self.family} does not draw from a prompt alone; {count} subject image(s) are shrunk {self.factor}x "
                f"and enlarged back, noised at level {self.low_resolution.max_level}, with their captions as prompts")

    def card_loading(self, call, adapter):
        lines, call = super().card_loading(call, adapter)
        return lines, call.replace(").images", ", image=picture).images") + "  # picture: stage I's, to enlarge"


class LowResolution:
    """IF stage II's second input, made from the picture it learns to draw: shrunk by the model's factor (each
    factor x factor block averaged, as a smaller photo is), enlarged back as its pipeline enlarges the picture it is
    given (bilinear, corners aligned), and noised by its image-noising scheduler at a level the UNet gets as its
    class label. Training draws the level per sample, uniformly from 0 to `max_level` (--if_noise_level), so the
    model serves every level up to the one it is drawn with; the eval loss, validation and evaluate.py use
    `max_level` itself (the pipeline's noise_level)."""

    def __init__(self, scheduler, factor, max_level):
        self.scheduler, self.factor, self.max_level = scheduler, factor, max_level
        if not 0 <= max_level < self.scheduler.config.num_train_timesteps:
            raise SystemExit(f"--if_noise_level {max_level}: the image-noising scheduler's levels are 0 to "
                             f"{self.scheduler.config.num_train_timesteps - 1}; the pipeline's default is 250")

    def __call__(self, pictures, generator, level=None):
        """{"upscaled": (B, 3, H, W), "class_labels": (B,)} for `pictures` (B, 3, H, W) in [-1, 1], drawn from
        `generator`: the level (unless given) and the noise."""
        pictures = pictures.float()
        small = torch.nn.functional.avg_pool2d(pictures, self.factor)
        upscaled = torch.nn.functional.interpolate(small, pictures.shape[-2:], mode="bilinear", align_corners=True)
        levels = torch.full((len(pictures),), level) if level is not None else \
            torch.randint(0, self.max_level + 1, (len(pictures),), generator=generator)
        noise = torch.randn(upscaled.shape, generator=generator)
        return {"upscaled": self.scheduler.add_noise(upscaled, noise, levels), "class_labels": levels}
