"""FLUX.2 klein (4B / 9B): a Flux2Transformer2DModel reading Qwen3's hidden states of three layers, stacked; latents
of its own VAE patchified 2x2 and normalised by the VAE's batch-norm statistics, packed into tokens with 4-D
position ids (time, row, column, layer); the text's ids count along the layer axis."""

import os

import torch
from safetensors import safe_open

from common.families import encoders
from common.families.base import DRAWS_FROM_A_PROMPT, Family
from common.families.mmdit import all_linear_layers, suffix_pattern

OUT_LAYERS = (9, 18, 27)  # the pipeline's text_encoder_out_layers
TEXT_LENGTH = 512  # the pipeline's max_sequence_length
DRAWING_STEPS = 50  # the pipeline's num_inference_steps, which its shift's mu depends on (compute_empirical_mu)
_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "single_transformer_blocks.*.attn.to_qkv_mlp_proj",
              "single_transformer_blocks.*.attn.to_out"]
# --lora_target presets. A single block's to_qkv_mlp_proj is one Linear for its attention's q, k, v and its MLP's
# input (diffusers' FLUX.2 examples adapt it by default); attention_ff adds the double blocks' feed-forward.
LORA_TARGETS = {
    "attention": _ATTENTION,
    "attention_ff": _ATTENTION + ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"],
    "all": None,
}


def patchify(latents):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch's values as channels, channel-major, as the pipeline does."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents):
    b, c, h, w = latents.shape
    return latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def position_ids(count, rows=1, columns=1, layers=1):
    """4-D ids (time 0, row, column, layer) of `count` items laid out over rows x columns x layers, row-major."""
    grid = torch.cartesian_prod(torch.arange(1), torch.arange(rows), torch.arange(columns), torch.arange(layers))
    return grid[None].expand(count, -1, -1)


class Flux2Klein(Family):

    family = "flux2-klein"
    title = "FLUX.2 klein"
    denoiser = "transformer"
    transformer_class = "Flux2Transformer2DModel"
    objective = "flow"
    bucket_step = 16  # VAE factor 8 x patch 2
    size_multiple = 16
    guidance_scale = 4.0  # its pipeline's (classifier-free guidance; a distilled model draws without it)
    negative_prompt = False  # its pipeline guides against the empty caption, always
    trainable_text_encoders = ()  # Qwen3, an LLM: read once into the cache, never trained
    pipeline = "Flux2KleinPipeline"
    flags = DRAWS_FROM_A_PROMPT - {"lora_format", "preview_vae", "validation_preview"}
    kohya_layout = None
    modelspec = "flux-2-klein"
    hub_tag = "flux2"
    bn_mean = bn_std = None  # the VAE's batch-norm statistics, (1, 4C, 1, 1)

    @classmethod
    def detects(cls, model_index, config):
        if "transformer" not in model_index or config.get("_class_name") != cls.transformer_class:
            return False
        if (model_index.get("text_encoder") or [None, None])[1] != "Qwen3ForCausalLM":
            raise ValueError("a FLUX.2 transformer with a Mistral text encoder: FLUX.2 dev, which this tool does not "
                             "train yet (FLUX.2 klein, with Qwen3, it does)")
        return True

    @staticmethod
    def detects_single_file(keys):
        """Black Forest Labs' FLUX.2 layout: double blocks modulated by shared stream modulations."""
        return any("double_stream_modulation_img." in k or "single_stream_modulation." in k for k in keys)

    @classmethod
    def from_single_file(cls, path, args):
        raise SystemExit(f"{path}: a FLUX.2 checkpoint in Black Forest Labs' layout; this tool does not convert those "
                         "yet. Pass the diffusers folder or hub id instead (black-forest-labs/FLUX.2-klein-base-4B, "
                         "...-9B)")

    def configure(self, args):
        """The VAE's batch-norm statistics, read from its weights (a few numbers; the VAE itself is not loaded)."""
        super().configure(args)
        folder = self.vae_folder or os.path.join(self.folder, "vae")
        name = "diffusion_pytorch_model" + (f".{self.variant}" if self.variant and not self.vae_folder else "")
        path = os.path.join(folder, name + ".safetensors")
        try:
            with safe_open(path, framework="pt") as handle:
                mean, var = handle.get_tensor("bn.running_mean"), handle.get_tensor("bn.running_var")
        except (OSError, KeyError) as err:  # safetensors says SafetensorError, an OSError; a missing key KeyError
            raise SystemExit(f"{path}: cannot read the FLUX.2 VAE's batch-norm statistics (bn.running_mean, "
                             f"bn.running_var) there ({err}); point --pretrained_model_name_or_path (or "
                             "--pretrained_vae_model_name_or_path) at a complete FLUX.2 model") from None
        self.bn_mean = mean.float().view(1, -1, 1, 1)
        self.bn_std = torch.sqrt(var.float() + self.vae_config.get("batch_norm_eps", 1e-4)).view(1, -1, 1, 1)

    @property
    def distilled(self):
        """A step-distilled klein: its pipeline draws without classifier-free guidance."""
        return bool(self.model_index.get("is_distilled"))

    def notes(self, guidance_scale):
        if not self.distilled:
            return []
        return [f"warning: {self.ref} is a step-distilled FLUX.2 klein (is_distilled): a LoRA trained on it tends to "
                "undo the distillation and draw blurred, broken pictures. Train on its base model "
                "(black-forest-labs/FLUX.2-klein-base-4B or -base-9B) and draw the LoRA on this one"]

    def card_loading(self, call, adapter):
        """Its pipeline's first argument is an image to edit: the prompt is named."""
        return [], call.replace('pipe("', 'pipe(prompt="')

    @property
    def tokens_per_latent(self):
        return 4

    def flow_mu(self, tokens):
        """The shift's mu as its pipeline computes it for the image's token count (at its default step count)."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return compute_empirical_mu(tokens, DRAWING_STEPS)

    def encode_text(self, tokenizers, encoders_, prompts):
        """Each caption through Qwen3's chat template (a user message; generation prompt; thinking off), padded to
        512 tokens, read with its attention mask; the hidden states of layers 9, 18 and 27 side by side per token.
        The transformer reads all 512 positions, as the pipeline gives them (no mask)."""
        tokenizer, encoder = tokenizers[0], encoders_[0]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False) for prompt in prompts]
        ids, mask = encoders.token_ids(tokenizer, texts, TEXT_LENGTH, encoder.device)
        # logits_to_keep=1: the hidden states are all that is read; the vocabulary's logits for 512 positions are not
        output = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                         logits_to_keep=1)
        stacked = torch.stack([output.hidden_states[k] for k in OUT_LAYERS], dim=1)  # (B, 3, L, D)
        b, layers, length, width = stacked.shape
        return {"prompt_embeds": stacked.permute(0, 2, 1, 3).reshape(b, length, layers * width).float()}

    def normalise(self, latents):
        """Patchified, normalised by the VAE's batch norm, and put back in the VAE's (B, C, H, W) grid, so a mask on
        that grid weights the loss unchanged."""
        return unpatchify((patchify(latents) - self.bn_mean) / self.bn_std)

    def predict(self, model, noisy, timesteps, cond):
        """Patchified and packed in with each token's 4-D id, the text's ids along the layer axis; unpacked and
        unpatchified out."""
        patches = patchify(noisy)
        b, channels, rows, columns = patches.shape
        tokens = patches.reshape(b, channels, rows * columns).permute(0, 2, 1)
        text = cond["encoder_hidden_states"]
        out = model(hidden_states=tokens, timestep=timesteps.to(noisy.dtype if noisy.is_floating_point()
                                                                 else torch.float32),
                    guidance=None, encoder_hidden_states=text,
                    txt_ids=position_ids(b, layers=text.shape[1]).to(noisy.device),
                    img_ids=position_ids(b, rows, columns).to(noisy.device), return_dict=False)[0]
        out = out[:, :tokens.shape[1]].permute(0, 2, 1).reshape(b, channels, rows, columns)
        return unpatchify(out)

    def drawing_call_options(self):
        return {"max_sequence_length": TEXT_LENGTH, "text_encoder_out_layers": OUT_LAYERS}

    def pipeline_components(self):
        return {"is_distilled": self.distilled}

    @classmethod
    def lora_targets(cls, model, preset):
        names = LORA_TARGETS[preset]
        return all_linear_layers(model) if names is None else suffix_pattern(names)
