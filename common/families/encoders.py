"""The text encoders several families share, read as their diffusers pipelines read them: CLIP and T5.

Each reader tokenises to a fixed length (padding and truncation as the pipelines do) and returns what its family
uses; gradients flow where the encoder has trainable weights (--train_text_encoder).
"""

import torch


def token_ids(tokenizer, prompts, max_length, device):
    """(input ids, attention mask) on `device`, padded and truncated to `max_length`."""
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return tokens.input_ids.to(device), tokens.attention_mask.to(device)


def clip_last(tokenizer, encoder, prompts):
    """CLIP's last hidden state (SD 1.x / 2.x), with the attention mask where the encoder's config asks for one."""
    ids, mask = token_ids(tokenizer, prompts, tokenizer.model_max_length, encoder.device)
    return encoder(ids, attention_mask=mask if getattr(encoder.config, "use_attention_mask", False) else None)[0]


def clip_penultimate(tokenizer, encoder, prompts):
    """(penultimate hidden state, projected pooled vector or None): a CLIPTextModelWithProjection's first output is
    text_embeds, the pooled vector SDXL and SD3 use; a CLIPTextModel has none."""
    ids, _ = token_ids(tokenizer, prompts, tokenizer.model_max_length, encoder.device)
    output = encoder(ids, output_hidden_states=True)
    return output.hidden_states[-2], output[0] if output[0].ndim == 2 else None


def clip_pooled(tokenizer, encoder, prompts):
    """CLIP's pooled output (a CLIPTextModel, no projection), as FLUX.1 reads it."""
    ids, _ = token_ids(tokenizer, prompts, tokenizer.model_max_length, encoder.device)
    return encoder(ids, output_hidden_states=True).pooler_output


def t5(tokenizer, encoder, prompts, max_length, masked=False):
    """T5's last hidden state: without an attention mask, as the SD3 and FLUX.1 pipelines run it, or (`masked`)
    with its padding masked, as DeepFloyd IF's does."""
    ids, mask = token_ids(tokenizer, prompts, max_length, encoder.device)
    return encoder(ids, attention_mask=mask)[0] if masked else encoder(ids)[0]


def stacked(texts, key):
    """One key of each sample's text embeddings, stacked into a batch."""
    return torch.stack([text[key] for text in texts])
