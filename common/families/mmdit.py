"""What SD3 and FLUX.1 share: a transformer with joint (image and text stream) attention, trained by flow matching
on 16-channel latents in 2x2 patches, conditioned on a pooled text vector; their LoRA presets."""

import torch

from common.families import encoders
from common.families.base import Family

# --lora_target presets. The joint attention has a text (context) stream beside the image stream: add_*_proj,
# to_add_out. attention_ff adds both streams' feed-forward and FLUX's single-stream blocks' MLP and output projections;
# all: every linear layer of the transformer.
JOINT_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                   "attn.add_v_proj", "attn.to_add_out"]
LORA_TARGETS = {
    "attention": JOINT_ATTENTION,
    "attention_ff": JOINT_ATTENTION + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                                       "proj_mlp", "single_transformer_blocks.*.proj_out"],
    "all": None,
}
# kohya's layout names the modules of the original checkpoints, where q, k and v are one fused Linear: each
# original Linear lists the diffusers modules it holds, in the order their rows are stacked.
QKV = ["to_q", "to_k", "to_v"]
CONTEXT_QKV = ["add_q_proj", "add_k_proj", "add_v_proj"]


def all_linear_layers(model):
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def suffix_pattern(names):
    """A regular expression over full module names matching each name as a suffix ('*': a block's number)."""
    return r"(.*\.)?(" + "|".join(name.replace(".", r"\.").replace("*", r"\d+") for name in names) + ")"


class MMDiTFamily(Family):
    """A joint-attention transformer (SD3, FLUX.1), told apart by its transformer's class."""

    denoiser = "transformer"
    objective = "flow"
    bucket_step = 16  # VAE factor 8 x patch 2
    size_multiple = 16
    dtype_keys = ("encoder_hidden_states", "pooled_projections")

    @classmethod
    def detects(cls, model_index, config):
        return "transformer" in model_index and config.get("_class_name") == cls.transformer_class

    def conditioning(self, texts, transforms, picture=None):
        """The text sequence and the pooled text vector (pooled_projections)."""
        return {**super().conditioning(texts, transforms, picture),
                "pooled_projections": encoders.stacked(texts, "pooled_prompt_embeds")}

    @classmethod
    def lora_targets(cls, model, preset):
        names = LORA_TARGETS[preset]
        return all_linear_layers(model) if names is None else suffix_pattern(names)

    @classmethod
    def original_layout(cls, model):
        """[(original module name, [the diffusers modules it fuses, in row order])] for kohya's layout: each
        (block prefix, original prefix, table) of kohya_layout, for every block of that kind."""
        layout = []
        for blocks, (original_blocks, table) in cls.kohya_layout.items():
            for i in range(len(getattr(model, blocks.split(".")[0])) if blocks else 1):
                layout += [(original_blocks.format(i) + original, [blocks.format(i) + part for part in parts])
                           for original, parts in table.items()]
        return layout
