"""SD3 / SD3.5: an MMDiT called with timestep = noise level x 1000; CLIP-L, CLIP-G and (optionally) T5."""

import torch
from safetensors import safe_open

from common.families import encoders
from common.families.mmdit import CONTEXT_QKV, QKV, MMDiTFamily

# kohya's layout of the original (Stability MMDiT) checkpoint: block prefix -> (original prefix, {original Linear:
# the diffusers modules it holds}).
ORIGINAL_LAYOUT = {
    "transformer_blocks.{}.": ("joint_blocks.{}.", {
        "x_block.attn.qkv": ["attn." + p for p in QKV], "context_block.attn.qkv": ["attn." + p for p in CONTEXT_QKV],
        "x_block.attn.proj": ["attn.to_out.0"], "context_block.attn.proj": ["attn.to_add_out"],
        "x_block.attn2.qkv": ["attn2." + p for p in QKV], "x_block.attn2.proj": ["attn2.to_out.0"],
        "x_block.mlp.fc1": ["ff.net.0.proj"], "x_block.mlp.fc2": ["ff.net.2"],
        "context_block.mlp.fc1": ["ff_context.net.0.proj"], "context_block.mlp.fc2": ["ff_context.net.2"],
        "x_block.adaLN_modulation.1": ["norm1.linear"], "context_block.adaLN_modulation.1": ["norm1_context.linear"]}),
    "": ("", {
        "context_embedder": ["context_embedder"],
        "t_embedder.mlp.0": ["time_text_embed.timestep_embedder.linear_1"],
        "t_embedder.mlp.2": ["time_text_embed.timestep_embedder.linear_2"],
        "y_embedder.mlp.0": ["time_text_embed.text_embedder.linear_1"],
        "y_embedder.mlp.2": ["time_text_embed.text_embedder.linear_2"],
        "final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"]}),
}
# Text encoders a single file may leave out (Stability ships some files without them): (key prefix, class).
SINGLE_FILE_TEXT_ENCODERS = {"text_encoder": ("text_encoders.clip_l.", "CLIPTextModelWithProjection"),
                             "text_encoder_2": ("text_encoders.clip_g.", "CLIPTextModelWithProjection"),
                             "text_encoder_3": ("text_encoders.t5xxl.", "T5EncoderModel")}


class SD3(MMDiTFamily):

    family = "sd3"
    transformer_class = "SD3Transformer2DModel"
    title = "SD3"
    text_encoders = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"),
                     ("tokenizer_3", "text_encoder_3"))
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    t5_default_length = 77  # as diffusers' SD3 DreamBooth example
    guidance_scale = 7.0
    pipeline = "StableDiffusion3Pipeline"
    preview_vae = "madebyollin/taesd3"
    flags = MMDiTFamily.flags | {"t5_max_sequence_length"}
    kohya_layout = ORIGINAL_LAYOUT
    kohya_version = "sd3"
    modelspec = "stable-diffusion-3"
    hub_tag = "sd3"

    @staticmethod
    def detects_single_file(keys):
        return any(k.startswith("model.diffusion_model.joint_blocks.") for k in keys)

    def encode_text(self, tokenizers, encoders_, prompts):
        """The two CLIPs' penultimate states concatenated, zero-padded to T5's width and followed along the sequence
        by T5's (as many zeros where the model has no T5); pooled = both CLIPs' pooled vectors."""
        parts = {encoder_name: pair for (_, encoder_name), pair in zip(self.text_parts, zip(tokenizers, encoders_))}
        sequences, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            sequence, vector = encoders.clip_penultimate(*parts[name], prompts)
            sequences.append(sequence)
            pooled.append(vector)
        if "text_encoder_3" in parts:
            t5 = encoders.t5(*parts["text_encoder_3"], prompts, self.t5_max_length)
        else:  # as its pipeline: max_sequence_length zeros of the transformer's context width
            t5 = torch.zeros(len(prompts), self.t5_max_length, self.model_config["joint_attention_dim"],
                             device=sequences[0].device, dtype=sequences[0].dtype)
        clip = torch.cat(sequences, dim=-1)
        embeds = torch.cat([torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=-2)
        return {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": torch.cat(pooled, dim=-1).float()}

    def predict(self, model, noisy, timesteps, cond):
        timestep = timesteps.to(noisy.dtype if noisy.is_floating_point() else torch.float32) * 1000.0
        return model(hidden_states=noisy, timestep=timestep, return_dict=False, **cond)[0]

    @classmethod
    def single_file_components(cls, path, config, local_files_only):
        """The text encoders a single file lacks, loaded from `config` (--single_file_config; None where that model
        has none either: SD3 without T5), as from_single_file takes them."""
        import transformers

        with safe_open(path, framework="pt") as handle:
            missing = [name for name, (prefix, _) in SINGLE_FILE_TEXT_ENCODERS.items()
                       if not any(k.startswith(prefix) for k in handle.keys())]
        if missing and not config:
            raise SystemExit(f"{path} holds no {', '.join(missing)}: give --single_file_config the diffusers folder "
                             "or hub id of the same model to take them from")
        loaded = {}
        for name in missing:
            try:
                loaded[name] = getattr(transformers, SINGLE_FILE_TEXT_ENCODERS[name][1]).from_pretrained(
                    config, subfolder=name, local_files_only=local_files_only)
            except OSError:  # the model has none (SD3 without its optional T5)
                loaded[name] = loaded[name.replace("text_encoder", "tokenizer")] = None
        return loaded
