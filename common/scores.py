"""Scores: the stable eval loss, and CLIP-T / CLIP-I / DINO as in the DreamBooth paper.

Used by train_dreambooth.py (the eval loss every --eval_steps_interval steps; --evaluation_type clip on
validation images), evaluate.py (both, for every checkpoint) and rare_tokens.py (CLIP, for look-alike names).
Training and evaluate.py measure with the same StableEvalLoss on the same examples, so their numbers agree exactly.
"""

import contextlib
from dataclasses import dataclass

import torch

from common import caches, families, files

# The DreamBench prompt templates (Ruiz et al. 2023): 25 per subject kind; {instance} is e.g. "ohwx dog".
DREAMBENCH_SETTINGS = ["in the jungle", "in the snow", "on the beach", "on a cobblestone street",
                       "on top of pink fabric", "on top of a wooden floor", "with a city in the background",
                       "with a mountain in the background", "with a blue house in the background",
                       "on top of a purple rug in a forest"]
DREAMBENCH_OBJECT = ["with a wheat field in the background", "with a tree and autumn leaves in the background",
                     "with the Eiffel Tower in the background", "floating on top of water",
                     "floating in an ocean of milk", "on top of green grass with sunflowers around it",
                     "on top of a mirror", "on top of the sidewalk in a crowded street", "on top of a dirt road",
                     "on top of a white rug"]
DREAMBENCH_LIVE = ["wearing a red hat", "wearing a santa hat", "wearing a rainbow scarf",
                   "wearing a black top hat and a monocle", "in a chef outfit", "in a firefighter outfit",
                   "in a police outfit", "wearing pink glasses", "wearing a yellow shirt", "in a purple wizard outfit"]
DREAMBENCH_ATTRIBUTES = ["red", "purple", "shiny", "wet", "cube shaped"]


# ---------------------------------------------------------------------------------------------------------------------
# The stable eval loss

PICTURE_SEED = 2 ** 40  # where the noise streams of conditioning made from the eval pictures start (IF stage II)


def eval_examples(entries, info, text_dir, eval_seed=0):
    """StableEvalLoss's examples from cached entries: the latent distribution's mean (no sampling, so the same every
    time) and the denoiser's conditioning for the first caption, with what the family makes from the picture
    itself (IF stage II's low-resolution input at --if_noise_level, its noise fixed per example). Masks are not
    used: eval loss is over the image."""
    texts = caches.load_text_embeddings([entry.captions[0] for entry in entries], info, text_dir)
    examples = []
    for i, entry in enumerate(entries):
        latents = info.normalise(files.load_tensors(entry.cache_path)["mean"][None])
        # its noise a stream of its own (drawn as example i's eval noise is, it would be that noise)
        generator = torch.Generator().manual_seed(PICTURE_SEED + eval_seed * 1_000_003 + i)
        picture = info.picture_conditioning(latents, generator, fixed=True)
        examples.append({"latents": latents, "picture": picture, "caption": entry.captions[0],
                         "transform": entry.transform,
                         "cond": info.conditioning([texts[entry.captions[0]]], [entry.transform], picture)})
    return examples


@dataclass
class StableEvalLoss:
    """A loss that can be compared across steps, checkpoints and runs: every example is noised at the same
    `timesteps` fixed timesteps (objective.eval_timesteps: DDPM timesteps, or flow noise levels) with the same fixed
    noise (from `seed`), in eval mode, and the global RNG is left exactly as it was (a training run that evaluates
    draws what one that does not would draw). Training (every --eval_steps_interval steps) and evaluate.py measure
    with it on the same examples, so their numbers agree exactly.

    `examples`: eval_examples'. `autocast`: a context manager for mixed precision (training passes
    accelerator.autocast)."""

    info: object
    objective: object
    examples: list
    timesteps: int = 8
    seed: int = 0
    autocast: object = contextlib.nullcontext

    @torch.no_grad()
    def __call__(self, model, embed=None):
        """{"mean": float, "per_timestep": {t: float}} of `model`. `embed`: with trained text encoders, an
        adapters.TextReader: each caption is encoded by them now."""
        info, timesteps = self.info, self.objective.eval_timesteps(self.timesteps)
        device, dtype = model.device, model.dtype
        was_training = model.training
        model.eval()
        totals = torch.zeros(len(timesteps))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for i, example in enumerate(self.examples):
                latents = example["latents"].float().expand(len(timesteps), -1, -1, -1)
                noise = torch.randn(latents.shape[1:],
                                    generator=torch.Generator().manual_seed(self.seed * 1_000_003 + i))
                noise = noise.expand_as(latents)
                noisy = self.objective.add_noise(latents, noise, timesteps)
                target = self.objective.target(latents, noise, timesteps)
                cond = example["cond"] if embed is None else info.conditioning(
                    embed([example["caption"]]), [example["transform"]], example["picture"])
                cond = families.map_conditioning(lambda t: t.expand(len(timesteps), *t.shape[1:]), cond)
                with self.autocast():
                    pred = info.predict(model, noisy.to(device, dtype), timesteps.to(device),
                                        info.on_device(cond, device, dtype))
                totals += ((pred.float().cpu() - target) ** 2).mean(dim=(1, 2, 3))
        model.train(was_training)
        per_timestep = totals / max(1, len(self.examples))
        return {"mean": per_timestep.mean().item(),
                "per_timestep": {self.objective.label(t): value.item() for t, value in zip(timesteps, per_timestep)}}


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and the paper's scores


def dreambench_prompts(kind):
    """The 25 DreamBench prompt templates for an `object` or a `live` subject."""
    middle = DREAMBENCH_OBJECT if kind == "object" else DREAMBENCH_LIVE
    return ([f"a {{instance}} {place}" for place in DREAMBENCH_SETTINGS + middle]
            + [f"a {attribute} {{instance}}" for attribute in DREAMBENCH_ATTRIBUTES])


def fill_prompt(template, instance, class_prompt):
    """(the prompt to generate from, the prompt CLIP-T scores against): the second names the class, not the
    identifier, because CLIP does not know the identifier (the DreamBooth paper's convention)."""
    generate = template.replace("{instance}", instance).replace("{class}", class_prompt)
    score = template.replace("{instance}", class_prompt).replace("{class}", class_prompt)
    if instance and "{instance}" not in template and instance in generate:  # a literal prompt naming the subject
        score = generate.replace(instance, class_prompt)
    return generate, score


class Scorer:
    """CLIP (image and text) and DINO (ViT, CLS token) embeddings, L2-normalised, for the paper's three scores:
    CLIP-T = mean cosine(image, its prompt); CLIP-I and DINO = mean pairwise cosine(generated, real images).
    Models by local folder or hub id, safetensors only unless `allow_pickle`; either may be None (not loaded, its
    scores skipped): DINO alone needs no CLIP."""

    def __init__(self, clip_model, dino_model=None, device="cpu", allow_pickle=False):
        from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

        if not (clip_model or dino_model):
            raise ValueError("a Scorer needs a CLIP model, a DINO model or both")
        self.device = device
        # Both refused (pickle-only weights) before either loads.
        clip_weights = files.safe_weights(clip_model, allow_pickle) if clip_model else {}
        dino_weights = files.safe_weights(dino_model, allow_pickle) if dino_model else {}
        self.clip = self.clip_processor = self.dino = self.dino_processor = None
        if clip_model:
            self.clip = CLIPModel.from_pretrained(clip_model, **clip_weights).to(device).eval()
            self.clip_processor = CLIPProcessor.from_pretrained(clip_model)
        if dino_model:
            self.dino = ViTModel.from_pretrained(dino_model, add_pooling_layer=False, **dino_weights).to(device).eval()
            self.dino_processor = AutoImageProcessor.from_pretrained(dino_model)

    @staticmethod
    def _normalised(output):
        features = output.pooler_output if hasattr(output, "pooler_output") else output  # transformers 5 / 4
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def clip_images(self, images):
        pixels = self.clip_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return self._normalised(self.clip.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def clip_texts(self, texts):
        tokens = self.clip_processor(text=list(texts), padding=True, truncation=True, return_tensors="pt")
        return self._normalised(self.clip.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                            attention_mask=tokens["attention_mask"].to(self.device)))

    @torch.no_grad()
    def dino_images(self, images):
        pixels = self.dino_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        cls = self.dino(pixel_values=pixels).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls.float(), dim=-1).cpu()

    def scores(self, images, score_prompts, real_clip=None, real_dino=None):
        """{"clip_t", "clip_i", "dino"} for generated `images` (each with its scoring prompt) against the real
        subject images' embeddings (from clip_images / dino_images, computed once); each score whose model and
        real embeddings are there."""
        result = {}
        if self.clip is not None:
            image_embeds = self.clip_images(images)
            result["clip_t"] = (image_embeds * self.clip_texts(score_prompts)).sum(-1).mean().item()
            if real_clip is not None:
                result["clip_i"] = (image_embeds @ real_clip.T).mean().item()
        if self.dino is not None and real_dino is not None:
            result["dino"] = (self.dino_images(images) @ real_dino.T).mean().item()
        return result
