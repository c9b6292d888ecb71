"""Model families: one file per family, everything that sets it apart behind one interface (base.Family).

    sd.py  SD 1.x / 2.x    sdxl.py  SDXL base, refiner    sd3.py  SD3 / SD3.5    flux.py  FLUX.1 dev / schnell
    chroma.py  Chroma    flux2.py  FLUX.2 klein    deepfloyd.py  IF stage I / II
    shared: unet.py (the UNet call, presets), mmdit.py (SD3 / FLUX.1-like transformers), encoders.py (CLIP and T5 as
    the pipelines read them)

An object of a family's class is one base model (`info` in the scripts; models.resolve_model makes it). Code outside
this folder asks it, and never compares its name. Plain data (class attributes, read by name):
    family, title, denoiser ("unet" | "transformer"), transformer_class, objective ("noise" | "flow"), pixels,
    draws_from_pictures, bucket_step, size_multiple, guidance_scale, negative_prompt, t5_default_length,
    text_encoders, trainable_text_encoders, pipeline, pipeline_options, preview_vae, flags (which of FAMILY_FLAGS
    it takes), kohya_layout, card fields
What it computes (methods):
    detects(model_index, config), detects_single_file(keys), from_single_file(path, args)    which models are its
    configure(args), refuse_flags(args, default), notes(guidance)           the run's flags it reads or refuses
    encode_text / encode_prompt(tokenizers, encoders, prompts)              exactly as its pipeline's encode_prompt
    normalise(latents)                                                      cached VAE latents -> denoiser space
    conditioning(texts, transforms, picture), picture_conditioning(...), on_device(cond, device, dtype)
    predict(model, noisy, timesteps, cond)                                  the denoiser call (packing inside)
    training_timesteps, tokens_per_latent, flow_mu(tokens)                  what objectives.py needs
    drawing_options(size), drawing_call_options(), pipeline_components()    drawing with its pipeline
    source_picture, sources_note, source_label                              (draws_from_pictures) what it starts from
    lora_targets(model, preset), original_layout(model)                     LoRA presets, kohya's fused layout
    modelspec_architecture, card_loading(call, adapter)                     what the card and metadata say

Adding a family: its file here (a subclass of base.Family, or of unet.UNetFamily / mmdit.MMDiTFamily), one line in
REGISTRY, and its tiny pipeline in examples/make_demo.py's build_tiny_model (the tests build their models there);
the family-parametrised tests then cover it.
"""

from safetensors import safe_open

from common.families.base import FAMILY_FLAGS, Family, map_conditioning  # noqa: F401 (the interface)
from common.families.chroma import Chroma
from common.families.deepfloyd import IF, IFStageII
from common.families.flux import Flux
from common.families.flux2 import Flux2Klein
from common.families.sd import SD1, SD2
from common.families.sd3 import SD3
from common.families.sdxl import SDXL, SDXLRefiner

# Every family, asked in this order; SD 1.x last: it takes any plain CLIP text-to-image UNet the others do not.
REGISTRY = [SD3, Flux, Chroma, Flux2Klein, IFStageII, IF, SDXLRefiner, SDXL, SD2, SD1]
BY_NAME = {family.family: family for family in REGISTRY}


def detect(model_index, config, where):
    """The family class of a model folder, from its model_index.json and its denoiser's config (never its name), so
    tiny test models are detected like real ones."""
    try:
        found = next((family for family in REGISTRY if family.detects(model_index, config)), None)
    except ValueError as err:  # a near miss, said by the family it nearly is
        raise SystemExit(f"{where}: {err}") from None
    if found is not None:
        return found
    if "transformer" in model_index:
        trained = ", ".join(f.transformer_class for f in REGISTRY if f.transformer_class)
        raise SystemExit(f"{where}: a {config.get('_class_name')} transformer is not a model this tool trains (it "
                         f"trains {trained} and SD 1.x/2.x/SDXL UNets)")
    raise SystemExit(f"{where}: this UNet (addition_embed_type={config.get('addition_embed_type')}, "
                     f"in_channels={config.get('in_channels')}) is not an SD 1.x/2.x/SDXL text-to-image model; "
                     "inpainting and other variants are not supported")


def detect_single_file(path):
    """The family class of an original-format (LDM / A1111, BFL) checkpoint, from its tensor names."""
    with safe_open(path, framework="pt") as handle:
        keys = set(handle.keys())
    found = next((family for family in REGISTRY if family.detects_single_file(keys)), None)
    if found is None:
        raise SystemExit(f"{path}: not a Stable Diffusion checkpoint this tool recognises (no text-encoder tensors "
                         "found)")
    return found
