"""Family: what every family file fills in, with the defaults most families share. The interface is listed in
common/families/__init__.py; each family's file says how it differs.

An object of a family's class is a base model: `models.resolve_model` reads the configs in its folder, asks the
registry which family claims them, and builds that family's object from them (`info` in the scripts). Traits that
are plain data are class attributes, read by name; what a family computes is a method.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch

# Flags that mean something for some families only, and who takes them (for the refusal's message). A family takes
# those its `flags` names; given for a model of another family (set to other than their default), they are refused
# rather than silently ignored.
FAMILY_FLAGS = {
    "preview_vae": "families with a Tiny AutoEncoder for their VAE (IF's in-progress image is the picture; none is "
                   "known for FLUX.2's VAE)",
    "validation_preview": "families with a Tiny AutoEncoder for their latents (not FLUX.2: none is known for its VAE), "
                          "or in pixel space (IF)",
    "t5_max_sequence_length": "SD3, FLUX.1 and Chroma (IF's T5 reads 77 tokens, fixed by its pipeline)",
    "flux_guidance_value": "a guidance-distilled FLUX.1 (dev)",
    "data_aesthetic_score": "the SDXL refiner",
    "refiner_training_strength": "the SDXL refiner",
    "lora_format": "the families with a kohya / ComfyUI layout written here that diffusers reads back (not IF, Chroma "
                   "or FLUX.2 klein)",
    "validation_resolution": "models that draw from a prompt alone (an SDXL refiner refines, and IF stage II "
                             "enlarges, the subject's pictures at their own sizes)",
    "if_noise_level": "DeepFloyd IF stage II",
}
DRAWS_FROM_A_PROMPT = frozenset({"preview_vae", "validation_preview", "lora_format", "validation_resolution"})


def map_conditioning(function, cond):
    """`function` applied to every tensor of a conditioning dict (to slice, expand or move it)."""
    return {key: map_conditioning(function, value) if isinstance(value, dict) else function(value)
            for key, value in cond.items()}


@dataclass
class Family:
    """A base model of one family: its configs (read from its folder), the run's settings it depends on, and what
    sets its family apart."""

    ref: str  # what the user gave: folder, hub id or file
    folder: str  # a local diffusers folder holding it
    model_index: dict
    model_config: dict  # the UNet's or transformer's config
    scheduler_config: dict
    vae_config: dict = None
    vae_folder: str = None  # --pretrained_vae_model_name_or_path: a folder holding the VAE used instead of vae/
    variant: str = None
    text_dtype: torch.dtype = torch.float32  # cached text embeddings are stored in the compute dtype
    text_encoder_precisions: dict = field(default_factory=dict)  # {"text_encoder_2": "int8-quanto", ...}
    allow_pickle: bool = False  # --allow_pickle: load .bin/.pt weights (a pickle can run code) where no safetensors
    t5_max_length: int = 0  # --t5_max_sequence_length, or the family's default (0: no T5)

    # --- Plain data: each family file sets what differs.
    family: ClassVar[str]  # its name: in messages, metadata, cache identities
    title: ClassVar[str]  # what a person calls it ("SDXL refiner")
    denoiser: ClassVar[str] = "unet"  # the trained model's subfolder: "unet" or "transformer"
    transformer_class: ClassVar[str] = None  # a transformer family: the class its transformer config names
    objective: ClassVar[str] = "noise"  # objectives.py: "noise" (DDPM, eps / v) or "flow" (flow matching, velocity)
    pixels: ClassVar[bool] = False  # no VAE: the denoiser works on the picture itself, in [-1, 1] (DeepFloyd IF)
    draws_from_pictures: ClassVar[bool] = False  # validation starts from the subject's pictures (refiner, upscaler)
    bucket_step: ClassVar[int] = 64  # bucket sides are multiples of this: VAE factor x the denoiser's downsampling
    size_multiple: ClassVar[int] = 8  # what its pipeline draws: width and height multiples of this
    guidance_scale: ClassVar[float] = 7.5  # default validation / evaluation guidance
    negative_prompt: ClassVar[bool] = True  # its pipeline takes a negative prompt
    t5_default_length: ClassVar[int] = 0  # default --t5_max_sequence_length (0: no T5)
    # (tokenizer, text encoder) in pipeline order; those a LoRA may train (--train_text_encoder: CLIP's)
    text_encoders: ClassVar[tuple] = (("tokenizer", "text_encoder"),)
    trainable_text_encoders: ClassVar[tuple] = ("text_encoder",)
    dtype_keys: ClassVar[tuple] = ("encoder_hidden_states",)  # conditioning held in the compute dtype
    pipeline: ClassVar[str]  # the diffusers pipeline that draws with it (and converts its single-file checkpoints)
    pipeline_options: ClassVar[dict] = {}  # what that pipeline is built with besides the components
    single_file_options: ClassVar[dict] = {}  # ... and what its from_single_file needs
    preview_vae: ClassVar[str] = None  # the Tiny AutoEncoder that previews its latents
    flags: ClassVar[frozenset] = DRAWS_FROM_A_PROMPT  # which of FAMILY_FLAGS it takes
    foreign_text_caches: ClassVar[tuple] = ()  # families whose text embeddings its text cache folder must not hold
    class_images_refusal: ClassVar[str] = None  # why make_regularisation.py cannot draw class images with it
    # kohya / ComfyUI LoRA layout: "modules" (its diffusers module names, as kohya writes UNet LoRAs), a table of the
    # original checkpoint's fused modules (SD3, FLUX), or None (no tool reads one); and its text encoders' prefixes
    kohya_layout: ClassVar[object] = "modules"
    kohya_text_encoder_prefixes: ClassVar[dict] = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    kohya_version: ClassVar[str] = None  # kohya's ss_base_model_version, where it has one
    modelspec: ClassVar[str]  # Stability's modelspec.architecture
    hub_tag: ClassVar[str]  # the Hugging Face hub tag of the family

    # --- Detection

    @classmethod
    def detects(cls, model_index, config):
        """Whether a model folder with this model_index.json and denoiser config is of this family."""
        return False

    @staticmethod
    def detects_single_file(keys):
        """Whether an original-format (LDM / A1111, BFL) checkpoint with these tensor names is of this family."""
        return False

    @classmethod
    def from_single_file(cls, path, args):
        """Its diffusers pipeline from an original-format checkpoint (diffusers' from_single_file; the parts the file
        lacks from --single_file_config)."""
        import diffusers

        return getattr(diffusers, cls.pipeline).from_single_file(
            path, config=args.single_file_config, local_files_only=args.local_files_only, **cls.single_file_options,
            **cls.single_file_components(path, args.single_file_config, args.local_files_only))

    @classmethod
    def single_file_components(cls, path, config, local_files_only):
        """Components from_single_file takes from elsewhere because the file lacks them."""
        return {}

    def configure(self, args):
        """Read the run's flags this family depends on (called once by models.resolve_model)."""
        self.t5_max_length = getattr(args, "t5_max_sequence_length", None) or self.t5_default_length

    def refuse_flags(self, args, default):
        """Flags of other families (FAMILY_FLAGS; `default(name)`: the flag's default), and --train_text_encoder
        where there is no CLIP encoder to train, are errors."""
        for name, applies_to in FAMILY_FLAGS.items():
            if getattr(args, name, None) != default(name) and name not in self.flags:
                raise SystemExit(f"--{name} applies to {applies_to}; {self.ref} is {self.family}: leave it out")
        if getattr(args, "train_text_encoder", False) and not self.trainable_text_encoders:
            readers = ", ".join(self.model_index[encoder][1] for _, encoder in self.text_parts)
            raise SystemExit(f"--train_text_encoder trains a LoRA on CLIP text encoders; {self.ref} ({self.family}) "
                             f"reads its captions with {readers} alone, which stays frozen (and cached): leave the "
                             "flag out")

    def notes(self, guidance_scale):
        """What the run's console says about this model's settings (`guidance_scale`: validation's)."""
        return []

    # --- What the model is

    @property
    def prediction_type(self):
        """epsilon | v_prediction (the scheduler's) | flow (velocity)."""
        return "flow" if self.objective == "flow" else self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def num_train_timesteps(self):
        return self.scheduler_config.get("num_train_timesteps", 1000)

    @property
    def training_timesteps(self):
        """The DDPM timesteps training draws from: all of them, or a refiner's low-noise end."""
        return self.num_train_timesteps

    @property
    def vae_scale_factor(self):
        """Pixels per latent cell: 8 for SD's VAEs, 1 in pixel space (IF)."""
        return 1 if self.pixels else 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def native_resolution(self):
        return self.model_config.get("sample_size", 128) * self.vae_scale_factor  # FLUX: no sample_size, 1024 px

    @property
    def text_parts(self):
        """The family's (tokenizer, text encoder) that this model has (SD3 may come without its T5)."""
        return [part for part in self.text_encoders if (self.model_index.get(part[1]) or [None])[0] is not None]

    # --- Text

    def encode_text(self, tokenizers, encoders, prompts):
        """Prompt embeddings exactly as the family's diffusers pipeline computes them in encode_prompt, with
        gradients where the encoders have trainable weights (--train_text_encoder). `tokenizers`, `encoders`: one
        per text_parts. Returns {"prompt_embeds": (B, L, D)} plus what the family adds ("pooled_prompt_embeds")."""
        raise NotImplementedError

    def encode_prompt(self, tokenizers, encoders, prompts):
        """encode_text without gradients: what the caches and every frozen use read."""
        with torch.no_grad():
            return self.encode_text(tokenizers, encoders, prompts)

    # --- Latents

    def latent_scaling(self):
        """(shift, scale): the denoiser sees (vae latent - shift) * scale (IF sees the pixels as they are)."""
        if self.pixels:
            return 0.0, 1.0
        return self.vae_config.get("shift_factor") or 0.0, self.vae_config.get("scaling_factor", 0.18215)

    def normalise(self, latents):
        """VAE latents (or IF's pictures), as cached, in the denoiser's space (B, C, H, W)."""
        shift, scale = self.latent_scaling()
        return (latents - shift) * scale

    # --- Conditioning and the denoiser

    def conditioning(self, texts, transforms, picture=None):
        """The denoiser's keyword arguments besides the noisy latents and timesteps, for a batch: each sample's text
        embeddings (`texts`: {"prompt_embeds", ...} each), what its crop (`transforms`) adds, and what
        picture_conditioning made from its clean picture (`picture`)."""
        return {"encoder_hidden_states": torch.stack([text["prompt_embeds"] for text in texts]), **(picture or {})}

    def picture_conditioning(self, pictures, generator, fixed=False):
        """Conditioning made from the clean pictures themselves (IF stage II's low-resolution input), drawn from
        `generator`; `fixed`: at the level validation draws at (the eval loss). {} for most families."""
        return {}

    def on_device(self, cond, device, dtype):
        """A batch's conditioning on `device`: dtype_keys in the compute dtype, the rest (pooled text the denoiser
        embeds itself, time ids, guidance, labels) as they are."""
        moved = map_conditioning(lambda tensor: tensor.to(device), cond)
        for key in self.dtype_keys:
            if key in cond:
                moved[key] = cond[key].to(device, dtype)
        return moved

    def predict(self, model, noisy, timesteps, cond):
        """The denoiser's prediction for noisy latents (B, C, H, W) at `timesteps` (B,) (integer timesteps for a
        noise-prediction model, noise levels in (0, 1) for a flow model) with a batch's conditioning, in the
        latents' shape, so a latent-space mask weights its loss unchanged."""
        raise NotImplementedError

    @property
    def tokens_per_latent(self):
        """Latent cells per denoiser token (the flow shift's mu counts tokens)."""
        return self.model_config.get("patch_size", 2) ** 2

    def flow_mu(self, tokens):
        """A resolution-dependent shift's mu for an image of `tokens` tokens, as FLUX.1's pipeline computes it from
        the scheduler's config."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.scheduler_config
        return calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                               config.get("base_shift", 0.5), config.get("max_shift", 1.15))

    # --- Drawing

    def drawing_call_options(self):
        """What every call of the family's pipeline takes besides the prompt and sizes (T5's length as trained)."""
        return {"max_sequence_length": self.t5_max_length} if self.t5_default_length else {}

    def drawing_options(self, size):
        """The pipeline's keyword arguments for the picture's size (width, height; a number: a square)."""
        width, height = (size, size) if isinstance(size, int) else size
        return {**self.drawing_call_options(), "height": height, "width": width}

    def pipeline_components(self):
        """Components its pipeline is built with besides the denoiser, scheduler, VAE and text encoders."""
        return {}

    @staticmethod
    def preview_latents(latents, latent_size):
        """The pipeline's in-progress latents as a (B, C, H, W) latent (`latent_size`: its height and width)."""
        return latents

    # --- LoRA

    @classmethod
    def lora_targets(cls, model, preset):
        """The --lora_target preset's modules for peft: name suffixes, or a regular expression over full names."""
        raise NotImplementedError

    # --- What the card says

    @property
    def modelspec_architecture(self):
        return self.modelspec

    def card_loading(self, call, adapter):
        """The card's diffusers example: extra lines after loading (`adapter`: lora, lycoris or full) and the call."""
        return [], call
